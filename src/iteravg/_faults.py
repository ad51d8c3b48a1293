"""Every test-only fault switch, in one place, so production modules only ask "should I fail here?".

Switches (environment variables, read at the moment of use; unset means off):

``ITERAVG_FAULT=kill-at:STAGE[:NAME]``
    The snapshot writer SIGKILLs itself at ``STAGE`` (``tmp-created``, ``file-<k>``, ``state-written``,
    ``renamed``, ``latest-switched``, ``pruning``), for every snapshot or only the one named ``NAME``.
``ITERAVG_FAULT=crash-before-publish[:NAME]``
    The writer ``os._exit(17)``s after the snapshot's files are written and synced, before it is published.
``ITERAVG_FAULT=diverge-after-allreduce:R``
    Rank R flips the lowest bit of its averaged buffer right after the sync's allreduce (the repair path).
``ITERAVG_STOP_AFTER_EPOCH=k``
    The MXNet training loop stops with ``StoppedEarly`` (CLI exit 3) right after epoch k's snapshot.
"""

from __future__ import annotations

import os
import signal
from typing import Optional, Sequence

__all__ = ["FAULT_ENV", "STOP_ENV", "snapshot_stage", "pruning_fault", "diverging_rank", "stop_after_epoch"]

FAULT_ENV = "ITERAVG_FAULT"
STOP_ENV = "ITERAVG_STOP_AFTER_EPOCH"


def _fault() -> str:
    return os.environ.get(FAULT_ENV, "")


def snapshot_stage(stage: str, names: Sequence[str]) -> None:
    """Called by the snapshot writer at each stage; dies there if a switch names it."""
    fault = _fault()
    if not fault:
        return
    if stage == "state-written" and (fault == "crash-before-publish"
                                     or any(fault == f"crash-before-publish:{n}" for n in names)):
        os._exit(17)  # simulate a crash after writing, before publishing
    if fault == f"kill-at:{stage}" or any(fault == f"kill-at:{stage}:{n}" for n in names):
        os.kill(os.getpid(), signal.SIGKILL)


def pruning_fault() -> bool:
    """Whether a kill during pruning is asked for (the writer then half-deletes a snapshot first)."""
    return _fault().startswith("kill-at:pruning")


def diverging_rank() -> Optional[int]:
    """The rank that must corrupt its average after the allreduce, or None."""
    fault = _fault()
    if fault.startswith("diverge-after-allreduce:"):
        return int(fault.split(":", 1)[1])
    return None


def stop_after_epoch() -> int:
    """The epoch after which the training loop stops (0 = off); a malformed value is a ``ValueError``."""
    text = os.environ.get(STOP_ENV, "").strip()
    try:
        value = int(text or 0)
    except ValueError:
        raise ValueError(f"{STOP_ENV} must be an epoch number, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{STOP_ENV} must be >= 0, got {value}")
    return value
