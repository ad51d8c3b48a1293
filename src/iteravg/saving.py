"""What a failed snapshot does to training: stop it (``on_save_error="raise"``, the default) or not (``"warn"``).

Why a choice: a full or read-only disk is not the model's fault. A long job may prefer to keep training and retry
at the next snapshot (the previous snapshots stay intact and loadable) rather than lose the hours since the last
one; a short job, or one that must never run without a fresh checkpoint, prefers to stop at once. Either way every
rank learns of the failure together (rank 0 writes, the outcome is agreed), so all ranks take the same branch.

With ``"warn"`` rank 0 logs the failure once per run of failures (the first), and once more when a snapshot is
written again; only storage failures (``checkpoint.SnapshotWriteError``: disk full, quota, read-only, permission)
are tolerated, anything else still raises.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Tuple, TypeVar

from . import collectives
from .checkpoint import SnapshotWriteError
from .comm import Communicator

__all__ = ["ON_SAVE_ERROR", "check_on_save_error", "SaveErrors"]

ON_SAVE_ERROR = ("raise", "warn")
T = TypeVar("T")
logger = logging.getLogger("iteravg")


def check_on_save_error(value: object) -> str:
    if value not in ON_SAVE_ERROR:
        raise ValueError(f"on_save_error must be 'raise' or 'warn', got {value!r}")
    return str(value)


class SaveErrors:
    """Runs rank 0's snapshot writes under the ``on_save_error`` policy; remembers a run of failures."""

    def __init__(self, on_save_error: str = "raise") -> None:
        self.on_save_error = check_on_save_error(on_save_error)
        #: Snapshots that failed since the last one that was written.
        self.failed = 0

    def run(self, comm: Communicator, write: Callable[[], T], what: str,
            on_save_error: Optional[str] = None) -> Tuple[bool, Optional[T]]:
        """(written, rank 0's result) -- the same ``written`` on every rank. Raises on every rank unless the policy
        is ``"warn"`` and the storage refused the write."""
        policy = self.on_save_error if on_save_error is None else check_on_save_error(on_save_error)
        try:
            result = collectives.run_on_root(comm, write, what)
        except SnapshotWriteError as exc:
            if policy == "raise":
                raise
            if not self.failed and comm.rank == 0:
                logger.warning("iteravg: %s -- training goes on without this snapshot (on_save_error='warn'); the "
                               "next snapshot is tried as usual", exc)
            self.failed += 1
            return False, None
        if self.failed and comm.rank == 0:
            logger.warning("iteravg: snapshot written again after %d failed snapshot(s)", self.failed)
        self.failed = 0
        return True, result
