"""Horovod communicator (``horovod.mxnet``), for ``horovodrun`` with the MPI or the Gloo controller.

Horovod's MXNet ops take NDArrays. The averaged state's buffers are NDArrays already (``native``), so the
large collectives run in place with no copy; small arrays (metrics, fingerprints) are wrapped on the fly.

Every collective runs under the watchdog (``watchdog.py``): past the deadline the stuck rank prints where every
rank is and leaves with ``os._exit``, which makes ``horovodrun`` (MPI or Gloo controller) or ``mpirun`` stop the
whole job. Horovod's own stall inspector (``HOROVOD_STALL_CHECK_TIME_SECONDS``) still warns on rank 0 meanwhile.
"""

from __future__ import annotations

import os
import sys
from typing import Any, List

import numpy as np

from .base import CommError, ReduceOp, check_rank
from .watchdog import Watchdog


class HorovodComm:
    name = "horovod"

    def __init__(self) -> None:
        try:
            import horovod.mxnet as hvd  # noqa: WPS433 -- lazy: Horovod is optional
            import mxnet as mx  # noqa: WPS433
        except ImportError as exc:
            raise CommError(
                "ITERAVG_COMM=horovod needs Horovod built with MXNet support (see scripts/install.sh)"
            ) from exc
        self._hvd = hvd
        self._mx = mx
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
        nd = self._mx.nd.array(np.frombuffer(row, dtype=np.uint8).astype(np.int32).reshape(1, -1), dtype="int32")
        out = self._hvd.allgather(nd, name="iteravg.watchdog.hello").asnumpy().astype(np.uint8)
        return [bytes(r) for r in out.reshape(self.size, -1)]

    def _nd(self, array: np.ndarray, native: Any) -> Any:
        if native is not None:
            return native
        return self._mx.nd.array(array, dtype=array.dtype, ctx=self._mx.cpu())

    def _back(self, array: np.ndarray, nd: Any, native: Any) -> None:
        if native is not None:
            nd.wait_to_read()
        else:
            np.copyto(array, nd.asnumpy().reshape(array.shape))

    def allreduce_(self, array: np.ndarray, *, op: ReduceOp, name: str, native: Any = None) -> None:
        if op not in self._ops:
            raise ValueError(f"op must be sum, mean, min or max, got {op!r}")
        nd = self._nd(array, native)
        wd = self.watchdog
        if wd is not None:
            wd.begin(name)
        try:
            self._hvd.allreduce_(nd, op=self._ops[op], name=name)
            self._back(array, nd, native)
        finally:
            if wd is not None:
                wd.end()

    def broadcast_(self, array: np.ndarray, *, root: int, name: str, native: Any = None) -> None:
        check_rank(root, self.size)
        nd = self._nd(array, native)
        wd = self.watchdog
        if wd is not None:
            wd.begin(name)
        try:
            self._hvd.broadcast_(nd, root_rank=root, name=name)
            self._back(array, nd, native)
        finally:
            if wd is not None:
                wd.end()

    def allgather(self, row: np.ndarray, *, name: str) -> np.ndarray:
        row = np.ascontiguousarray(row).reshape(1, -1)
        wd = self.watchdog
        if wd is not None:
            wd.begin(name)
        try:
            out = self._hvd.allgather(self._nd(row, None), name=name).asnumpy()
        finally:
            if wd is not None:
                wd.end()
        return out.reshape(self.size, -1).astype(row.dtype, copy=False)

    def barrier(self, *, name: str) -> None:
        flag = np.ones(1, dtype=np.int32)
        self.allreduce_(flag, op="sum", name=name)
        if int(flag[0]) != self.size:
            raise CommError(f"barrier {name!r} saw {int(flag[0])} of {self.size} ranks")

    def shutdown(self) -> None:
        if not self._shut:
            self._shut = True
            if self.watchdog is not None:
                self.watchdog.stop()
            self._hvd.shutdown()
