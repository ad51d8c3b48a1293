"""mpi4py communicator, for plain ``mpirun`` jobs where Horovod is not built or not wanted.

Collectives work directly on the numpy buffers (no copies); ``mean`` is an MPI sum followed by a local
multiplication by ``1/size``, which every rank computes identically from the same sum.

MPI has no half-precision type: float16 is reduced in float32 (upcast, MPI sum, then one rounding back to
float16, the same code on every rank) and moved bit for bit as bytes by broadcasts and allgathers. Every dtype an
MXNet model can hold (float16/32/64, integers) therefore syncs.

Every collective runs under the watchdog (``watchdog.py``); an uncaught exception on any rank calls ``MPI_Abort``
after its traceback (as ``python -m mpi4py`` does), so one failing rank ends the job in seconds.
"""

from __future__ import annotations

from typing import Any, List

import numpy as np

from .base import CommError, ReduceOp, check_rank
from .watchdog import Watchdog, install_abort_on_exception

#: Dtypes MPI cannot reduce natively, and the dtype they are reduced in.
_UPCAST = {np.dtype(np.float16): np.dtype(np.float32)}


class MPIComm:
    name = "mpi"

    def __init__(self) -> None:
        try:
            from mpi4py import MPI  # noqa: WPS433 -- lazy: importing MPI initialises it
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise CommError("ITERAVG_COMM=mpi needs mpi4py (pip install mpi4py)") from exc
        self._MPI = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self._ops = {"sum": MPI.SUM, "mean": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}
        self.watchdog = None
        if self.size > 1:
            install_abort_on_exception(self._abort, self.rank, self.size, "MPI_Abort")
            self.watchdog = Watchdog(self.rank, self.size, "mpi", self._abort, "MPI_Abort")
            self.watchdog.connect(self._allgather_bytes)

    def _abort(self, code: int) -> None:
        self._comm.Abort(code)

    def _allgather_bytes(self, row: bytes) -> List[bytes]:
        out = np.empty((self.size, len(row)), dtype=np.uint8)
        self._comm.Allgather(np.frombuffer(row, dtype=np.uint8), out)
        return [bytes(r) for r in out]

    def allreduce_(self, array: np.ndarray, *, op: ReduceOp, name: str, native: Any = None) -> None:
        if op not in self._ops:
            raise ValueError(f"op must be sum, mean, min or max, got {op!r}")
        if not array.flags.c_contiguous:
            raise ValueError(f"collective {name!r} needs a contiguous buffer")
        wide = _UPCAST.get(array.dtype)
        buf = array if wide is None else array.astype(wide)
        wd = self.watchdog
        if wd is not None:
            wd.begin(name)
        try:
            self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._ops[op])
        finally:
            if wd is not None:
                wd.end()
        if op == "mean" and self.size > 1:
            np.multiply(buf, buf.dtype.type(1.0 / self.size), out=buf)
        if wide is not None:
            np.copyto(array, buf, casting="same_kind")

    def broadcast_(self, array: np.ndarray, *, root: int, name: str, native: Any = None) -> None:
        check_rank(root, self.size)
        raw = array.view(np.uint8) if array.flags.c_contiguous else array  # bit for bit, any dtype
        wd = self.watchdog
        if wd is not None:
            wd.begin(name)
        try:
            self._comm.Bcast(raw, root=root)
        finally:
            if wd is not None:
                wd.end()

    def allgather(self, row: np.ndarray, *, name: str) -> np.ndarray:
        row = np.ascontiguousarray(row).reshape(-1)
        out = np.empty((self.size, row.size), dtype=row.dtype)
        wd = self.watchdog
        if wd is not None:
            wd.begin(name)
        try:
            self._comm.Allgather(row.view(np.uint8), out.view(np.uint8))
        finally:
            if wd is not None:
                wd.end()
        return out

    def barrier(self, *, name: str) -> None:
        wd = self.watchdog
        if wd is not None:
            wd.begin(name)
        try:
            self._comm.Barrier()
        finally:
            if wd is not None:
                wd.end()

    def shutdown(self) -> None:
        # mpi4py finalises MPI at interpreter exit; finalising here would break later use by the caller.
        if self.watchdog is not None:
            self.watchdog.stop()
