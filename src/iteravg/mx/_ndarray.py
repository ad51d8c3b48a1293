"""Zero-copy numpy views of CPU NDArrays, and flat NDArray buffers with such views.

Why: an MXNet op per tensor costs several times the memory-bandwidth bound on CPU, while numpy working
directly on the NDArray's memory (the C API's ``MXNDArrayGetData``) runs at close to it. The caller must
make sure MXNet is done with the array (``wait_to_read`` / ``mx.nd.waitall()``) before reading or writing
through the view, because MXNet's engine does not see numpy's accesses.
"""

from __future__ import annotations

import ctypes
from typing import Any, Tuple

import mxnet as mx
import numpy as np
from mxnet.base import _LIB, check_call


def can_view(nd: mx.nd.NDArray) -> bool:
    """Only dense CPU arrays have host memory numpy can use."""
    return nd.context.device_type in ("cpu", "cpu_pinned", "cpu_shared") and nd.stype == "default"


def numpy_view(nd: mx.nd.NDArray) -> np.ndarray:
    """A writable numpy array sharing ``nd``'s memory. Keep ``nd`` alive for as long as the view is used."""
    if not can_view(nd):
        raise ValueError(f"cannot view a {nd.stype} array on {nd.context} from numpy")
    nd.wait_to_read()
    dtype = np.dtype(nd.dtype)
    count = int(np.prod(nd.shape, dtype=np.int64)) if nd.shape else 1
    if count == 0:
        return np.empty(nd.shape, dtype=dtype)
    ptr = ctypes.c_void_p()
    check_call(_LIB.MXNDArrayGetData(nd.handle, ctypes.byref(ptr)))
    raw = (ctypes.c_ubyte * (count * dtype.itemsize)).from_address(ptr.value)
    return np.frombuffer(raw, dtype=dtype).reshape(nd.shape)


def flat_allocator(n: int, dtype: np.dtype) -> Tuple[np.ndarray, Any]:
    """``core.averaged.Allocator`` backed by a CPU NDArray, so Horovod can reduce it in place."""
    nd = mx.nd.zeros((max(int(n), 1),), dtype=np.dtype(dtype).name, ctx=mx.cpu())
    return numpy_view(nd)[:n], nd
