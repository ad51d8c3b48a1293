"""Horovod communicator, for ``horovodrun`` with the MPI or the Gloo controller (and Horovod under ``mpirun``).

Horovod's collectives take a framework's tensors, so one of its framework bindings moves iteravg's numpy arrays.
``choose_binding()`` picks it, so that a job that never touched MXNet does not load it:

1. ``ITERAVG_HOROVOD_BINDING=torch|mxnet`` if set;
2. the binding the program already imported (``horovod.mxnet`` or ``horovod.torch``): one Horovod runtime per
   process, the one the user's own ``hvd.init()`` started;
3. ``mxnet`` if the program already imported MXNet (an MXNet / GluonTS job: its averaged buffers are NDArrays,
   passed as ``native`` and reduced in place);
4. ``torch`` if ``horovod.torch`` imports (Horovod built with PyTorch): numpy arrays are wrapped with
   ``torch.from_numpy`` (zero copy) and CPU torch tensors passed as ``native`` are reduced in place;
5. otherwise ``mxnet`` (Horovod built without PyTorch support).

Every rank picks the same binding: the choice depends only on what the program imported before the
communicator was created and on the installation, and every rank of a job runs the same program on the same
installation.

Every collective runs under the watchdog (``watchdog.py``): past the deadline the stuck rank prints where every
rank is and leaves with ``os._exit``, which makes ``horovodrun`` (MPI or Gloo controller) or ``mpirun`` stop the
whole job. Horovod's own stall inspector (``HOROVOD_STALL_CHECK_TIME_SECONDS``) still warns on rank 0 meanwhile.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, List

import numpy as np

from .base import CommError, ReduceOp, barrier_by_allreduce, check_rank
from .watchdog import Watchdog

BINDINGS = ("torch", "mxnet")
BINDING_ENV = "ITERAVG_HOROVOD_BINDING"


def choose_binding() -> str:
    """``"torch"`` or ``"mxnet"``: which Horovod binding this process uses (rules in the module docstring).

    May import ``horovod.torch`` (rule 4), which the communicator would import next anyway."""
    forced = os.environ.get(BINDING_ENV, "").strip().lower()
    if forced:
        if forced not in BINDINGS:
            raise ValueError(f"{BINDING_ENV} must be torch or mxnet, got {forced!r}")
        return forced
    for name in ("mxnet", "torch"):
        if f"horovod.{name}" in sys.modules:
            return name
    if "mxnet" in sys.modules or not _torch_library_present():
        return "mxnet"
    try:
        hvd = importlib.import_module("horovod.torch")
    except Exception:  # torch missing, or not the torch Horovod was built against (undefined symbols)
        return "mxnet"
    return "torch" if hasattr(hvd, "allreduce_") else "mxnet"


def _torch_library_present() -> bool:
    """Whether Horovod's PyTorch library was built, found without importing anything: ``import horovod.torch``
    succeeds without it (printing a warning and leaving out the collectives), after loading torch."""
    spec = importlib.util.find_spec("horovod")
    roots = (spec.submodule_search_locations or []) if spec is not None else []
    return any(any(Path(root, "torch").glob("mpi_lib_v2*")) for root in roots)


class _MXNetBinding:
    """``horovod.mxnet``: NDArrays; ``native`` NDArrays are reduced in place, other arrays go through a copy."""

    name = "mxnet"

    def __init__(self) -> None:
        import horovod.mxnet as hvd  # noqa: WPS433 -- lazy: Horovod is optional
        import mxnet as mx  # noqa: WPS433

        self.hvd, self._mx = hvd, mx

    def wrap(self, array: np.ndarray, native: Any) -> Any:
        if isinstance(native, self._mx.nd.NDArray):
            return native
        return self._mx.nd.array(array, dtype=array.dtype, ctx=self._mx.cpu())

    def back(self, array: np.ndarray, tensor: Any, native: Any) -> None:
        if tensor is native:
            tensor.wait_to_read()
        else:
            np.copyto(array, tensor.asnumpy().reshape(array.shape))

    def gathered(self, tensor: Any) -> np.ndarray:
        return tensor.asnumpy()


class _TorchBinding:
    """``horovod.torch``: CPU tensors; numpy arrays are wrapped without a copy, ``native`` tensors reduced in place."""

    name = "torch"

    def __init__(self) -> None:
        import horovod.torch as hvd  # noqa: WPS433 -- lazy: Horovod is optional
        import torch  # noqa: WPS433

        if not hasattr(hvd, "allreduce_"):  # the package imports without its library, collectives left out
            raise ImportError("horovod.torch has no collectives: Horovod was built without PyTorch")
        self.hvd, self._torch = hvd, torch

    def wrap(self, array: np.ndarray, native: Any) -> Any:
        if isinstance(native, self._torch.Tensor) and native.device.type == "cpu":
            return native
        if array.flags.c_contiguous and array.flags.writeable:
            return self._torch.from_numpy(array)  # shares array's memory: the collective writes straight into it
        return self._torch.from_numpy(np.ascontiguousarray(array).copy())

    def back(self, array: np.ndarray, tensor: Any, native: Any) -> None:
        if tensor is not native and not np.may_share_memory(array, tensor.numpy()):  # the copy made by wrap
            np.copyto(array, tensor.numpy().reshape(array.shape))

    def gathered(self, tensor: Any) -> np.ndarray:
        return tensor.numpy()


def load_binding(name: str) -> Any:
    """The binding adapter ``name`` ("torch" or "mxnet"); ImportError if Horovod was not built with it."""
    return _TorchBinding() if name == "torch" else _MXNetBinding()


class HorovodComm:
    name = "horovod"

    def __init__(self) -> None:
        binding = choose_binding()
        try:
            self._binding = load_binding(binding)
        except ImportError as exc:
            raise CommError(
                f"ITERAVG_COMM=horovod needs Horovod built with {'PyTorch' if binding == 'torch' else 'MXNet'} "
                f"support for its {binding} binding (see scripts/install.sh)"
            ) from exc
        #: "torch" or "mxnet": the Horovod binding that moves the arrays.
        self.binding = binding
        hvd = self._hvd = self._binding.hvd
        if not hvd.is_initialized():
            hvd.init()
        self.rank = hvd.rank()
        self.size = hvd.size()
        self._ops = {"sum": hvd.Sum, "mean": hvd.Average, "min": hvd.Min, "max": hvd.Max}
        self._shut = False
        self.watchdog = None
        if self.size > 1:
            self.watchdog = Watchdog(self.rank, self.size, "horovod", self._abort, "os._exit; the launcher stops the rest")
            self.watchdog.connect(self._allgather_bytes)

    @staticmethod
    def _abort(code: int) -> None:
        sys.stderr.flush()
        os._exit(code)

    def _allgather_bytes(self, row: bytes) -> List[bytes]:
        words = np.frombuffer(row, dtype=np.uint8).astype(np.int32).reshape(1, -1)
        out = self._gather(words, name="iteravg.watchdog.hello").astype(np.uint8)
        return [bytes(r) for r in out.reshape(self.size, -1)]

    def _gather(self, row: np.ndarray, *, name: str) -> np.ndarray:
        return self._binding.gathered(self._hvd.allgather(self._binding.wrap(row, None), name=name))

    def allreduce_(self, array: np.ndarray, *, op: ReduceOp, name: str, native: Any = None) -> None:
        if op not in self._ops:
            raise ValueError(f"op must be sum, mean, min or max, got {op!r}")
        tensor = self._binding.wrap(array, native)
        wd = self.watchdog
        if wd is not None:
            wd.begin(name)
        try:
            self._hvd.allreduce_(tensor, op=self._ops[op], name=name)
            self._binding.back(array, tensor, native)
        finally:
            if wd is not None:
                wd.end()

    def broadcast_(self, array: np.ndarray, *, root: int, name: str, native: Any = None) -> None:
        check_rank(root, self.size)
        tensor = self._binding.wrap(array, native)
        wd = self.watchdog
        if wd is not None:
            wd.begin(name)
        try:
            self._hvd.broadcast_(tensor, root_rank=root, name=name)
            self._binding.back(array, tensor, native)
        finally:
            if wd is not None:
                wd.end()

    def allgather(self, row: np.ndarray, *, name: str) -> np.ndarray:
        row = np.ascontiguousarray(row).reshape(1, -1)
        wd = self.watchdog
        if wd is not None:
            wd.begin(name)
        try:
            out = self._gather(row, name=name)
        finally:
            if wd is not None:
                wd.end()
        return out.reshape(self.size, -1).astype(row.dtype, copy=False)

    def barrier(self, *, name: str) -> None:
        barrier_by_allreduce(self, name)

    def shutdown(self) -> None:
        if not self._shut:
            self._shut = True
            if self.watchdog is not None:
                self.watchdog.stop()
            self._hvd.shutdown()
