"""Zero-copy numpy views of CPU NDArrays, and flat NDArray buffers with such views.

Why: an MXNet op per tensor costs several times the memory-bandwidth bound on CPU, while numpy working
directly on the NDArray's memory (the C API's ``MXNDArrayGetData``) runs at close to it. The caller must
make sure MXNet is done with the array (``wait_to_read`` / ``mx.nd.waitall()``) before reading or writing
through the view, because MXNet's engine does not see numpy's accesses.

Two more things numpy-side code must know about MXNet, both handled here:

* oneDNN may later reorder the array in place into a blocked layout (an inference-mode Conv / FullyConnected
  forward does); ``DefaultLayout.refresh`` undoes that for many arrays in one C call before each access.
* MXNet's scalar operators compute with the scalar as parsed back from a string (``mxnet_scalar``), which is
  what GluonTS's ``alpha * (x - avg)`` uses; matching its bits means using the same double.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet.base import _LIB, check_call


def can_view(nd: mx.nd.NDArray) -> bool:
    """Only dense CPU arrays have host memory numpy can use."""
    return nd.context.device_type in ("cpu", "cpu_pinned", "cpu_shared") and nd.stype == "default"


def numpy_view(nd: mx.nd.NDArray) -> np.ndarray:
    """A writable numpy array sharing ``nd``'s memory. Keep ``nd`` alive for as long as the view is used.

    ``MXNDArrayGetData`` first puts a oneDNN-blocked array back into the default layout, so the view is valid
    now; an inference forward may block it again later (see ``DefaultLayout``).
    """
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


# -- oneDNN: many arrays back to the default layout in one call ---------------------------------------------


def _load_layout_kernel() -> Optional[Callable[..., int]]:
    """``iteravg_mx_default_layout`` from ``_ndkernel.c`` (built by setup.py), or None (then a ctypes loop)."""
    if os.environ.get("ITERAVG_NO_KERNEL", "0").strip() not in ("", "0"):
        return None
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_ndkernel{suffix}"
        if path.exists():
            try:
                fn = ctypes.CDLL(str(path)).iteravg_mx_default_layout
            except (OSError, AttributeError):
                return None
            fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            fn.restype = ctypes.c_int64
            return fn
    return None


_LAYOUT_KERNEL = _load_layout_kernel()
_GETDATA = ctypes.cast(_LIB.MXNDArrayGetData, ctypes.c_void_p).value


class DefaultLayout:
    """Brings a fixed list of CPU NDArrays back to MXNet's default layout before numpy touches their memory.

    Why: MXNet's default CPU build (oneDNN) reorders Conv / FullyConnected / Deconvolution weights in place into
    a blocked layout during an inference-mode forward; the bytes under a cached numpy view are then permuted,
    and writing through the view corrupts the weights. ``MXNDArrayGetData`` reorders such an array back in its
    own buffer, so ``refresh()`` calls it on every array -- in one C call when ``_ndkernel`` is built (a ctypes
    loop otherwise) -- and returns whether any data pointer moved (then the caller must rebuild its views).
    Call it after ``mx.nd.waitall()``: the reorder is an engine operation that may still be queued.
    """

    def __init__(self, arrays: Sequence[mx.nd.NDArray]) -> None:
        self._arrays = list(arrays)  # keeps the handles alive
        self._handles = np.array([a.handle.value for a in self._arrays], dtype=np.uintp)
        self._out = np.zeros(len(self._arrays), dtype=np.uintp)
        self.pointers = np.zeros(len(self._arrays), dtype=np.uintp)  # what the caller's views were built on
        self.refresh()
        self.pointers[:] = self._out

    def refresh(self) -> bool:
        """Reorder every array to the default layout; True if some data pointer differs from ``pointers``."""
        n = len(self._arrays)
        if n == 0:
            return False
        if _LAYOUT_KERNEL is not None:
            rc = _LAYOUT_KERNEL(n, self._handles.ctypes.data, self.pointers.ctypes.data, self._out.ctypes.data,
                                _GETDATA)
            if rc < 0:
                check_call(-1)  # raises MXNetError with MXGetLastError()'s message
            return rc > 0
        ptr = ctypes.c_void_p()
        for i, a in enumerate(self._arrays):
            check_call(_LIB.MXNDArrayGetData(a.handle, ctypes.byref(ptr)))
            self._out[i] = ptr.value or 0
        return bool((self._out != self.pointers).any())

    def adopt(self) -> None:
        """Record the pointers of the last ``refresh()`` as the ones the caller's views are now built on."""
        self.pointers[:] = self._out


# -- MXNet's scalar arguments --------------------------------------------------------------------------------


def mxnet_scalar(value: float) -> float:
    """The double MXNet's scalar operators (``x * alpha``, ``x + alpha``) really compute with for ``value``.

    Why: MXNet 1.x passes operator arguments as strings: Python sends ``str(value)`` (shortest round-trip) and
    the C++ side parses it with dmlc-core's ``ParseFloat<double>`` (3rdparty/dmlc-core/include/dmlc/strtonum.h),
    which is not correctly rounded: integer part + (first 19 fraction digits as an integer) / 10^digits, then
    an exponent applied by repeated multiplication. For about 1 in 9 fold weights ``(eta+1)/(eta+k)`` the
    result is 1 ulp off the Python float, so GluonTS's float64 averages differ from exact arithmetic by 1 ulp
    in many elements. Folding with ``mxnet_scalar(alpha)`` reproduces GluonTS's bits. float32 / float16
    tensors then cast this double to their dtype exactly as MXNet's ``DType(alpha)`` does.
    """
    v = float(value)
    if not np.isfinite(v):
        return v
    text = str(v)
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    mantissa, _, exponent = text.lower().partition("e")
    whole, _, frac = mantissa.partition(".")
    predec = 0
    for ch in whole:
        predec = (predec * 10 + int(ch)) & 0xFFFFFFFFFFFFFFFF  # uint64 wrap-around, as in C
    out = float(predec)
    if frac:
        digits = frac[:19]  # kStrtofMaxDigits: later digits are ignored
        out += float(int(digits)) / float(10 ** len(digits))
    if exponent:
        neg = exponent.startswith("-")
        expon = min(int(exponent.lstrip("+-")), 308)
        scale = 1.0
        while expon >= 8:
            scale *= 1e8
            expon -= 8
        while expon > 0:
            scale *= 10.0
            expon -= 1
        out = out / scale if neg else out * scale
    return sign * out
