"""The one small protocol every communicator implements.

Adapters are thin: they move numpy arrays and nothing else. Which collective is issued when, and under which
name, is decided in ``iteravg.collectives`` only, so all ranks issue the same names in the same order.

``native`` (optional) is a framework handle that shares memory with ``array`` (e.g. the MXNet NDArray behind a
flat buffer); adapters that need framework tensors (Horovod) use it to work in place instead of copying.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Protocol, runtime_checkable

import numpy as np

ReduceOp = Literal["sum", "mean", "min", "max"]


@runtime_checkable
class Communicator(Protocol):
    #: "local", "horovod", "mpi" or "torch".
    name: str
    rank: int
    size: int

    def allreduce_(self, array: np.ndarray, *, op: ReduceOp, name: str, native: Any = None) -> None:
        """Reduce ``array`` across ranks in place. ``mean`` is the sum times ``1/size``."""

    def broadcast_(self, array: np.ndarray, *, root: int, name: str, native: Any = None) -> None:
        """Overwrite ``array`` on every rank with root's ``array``."""

    def allgather(self, row: np.ndarray, *, name: str) -> np.ndarray:
        """Stack every rank's 1-D ``row`` (same length and dtype on all ranks) into ``(size, len)``."""

    def barrier(self, *, name: str) -> None:
        """Return only when every rank has reached the same barrier."""

    def shutdown(self) -> None:
        """Release the communication backend; safe to call twice."""


class CommError(RuntimeError):
    """A communicator could not be created or used (wrong launcher, backend not built, peer lost)."""


def check_rank(root: int, size: int, what: str = "root") -> None:
    if not 0 <= root < size:
        raise ValueError(f"{what} must be a rank in [0, {size}), got {root}")


def describe(comm: Optional[Communicator]) -> str:
    return "none" if comm is None else f"{comm.name} rank {comm.rank}/{comm.size}"


def barrier_by_allreduce(comm: Communicator, name: str) -> None:
    """A barrier for backends whose own barrier has no deadline hook: a counted ``sum`` allreduce, which also
    proves every rank took part (the count is the world size)."""
    flag = np.ones(1, dtype=np.int32)
    comm.allreduce_(flag, op="sum", name=name)
    if int(flag[0]) != comm.size:
        raise CommError(f"barrier {name!r} saw {int(flag[0])} of {comm.size} ranks")
