"""mpi4py communicator, for plain ``mpirun`` jobs where Horovod is not built or not wanted.

Collectives work directly on the numpy buffers (no copies); ``mean`` is an MPI sum followed by a local
multiplication by ``1/size``, which every rank computes identically from the same sum.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import CommError, ReduceOp, check_rank


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

    def allreduce_(self, array: np.ndarray, *, op: ReduceOp, name: str, native: Any = None) -> None:
        if op not in self._ops:
            raise ValueError(f"op must be sum, mean, min or max, got {op!r}")
        if not array.flags.c_contiguous:
            raise ValueError(f"collective {name!r} needs a contiguous buffer")
        self._comm.Allreduce(self._MPI.IN_PLACE, array, op=self._ops[op])
        if op == "mean" and self.size > 1:
            np.multiply(array, array.dtype.type(1.0 / self.size), out=array)

    def broadcast_(self, array: np.ndarray, *, root: int, name: str, native: Any = None) -> None:
        check_rank(root, self.size)
        self._comm.Bcast(array, root=root)

    def allgather(self, row: np.ndarray, *, name: str) -> np.ndarray:
        row = np.ascontiguousarray(row).reshape(-1)
        out = np.empty((self.size, row.size), dtype=row.dtype)
        self._comm.Allgather(row, out)
        return out

    def barrier(self, *, name: str) -> None:
        self._comm.Barrier()

    def shutdown(self) -> None:
        # mpi4py finalises MPI at interpreter exit; finalising here would break later use by the caller.
        pass
