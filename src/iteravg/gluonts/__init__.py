"""iteravg for GluonTS users: GluonTS's MXNet ``Trainer``, data-parallel under ``horovodrun`` and ``mpirun``.

Change one import::

    # from gluonts.mx.trainer import Trainer
    from iteravg.gluonts import Trainer

and pass it to any MXNet estimator. On one process it is GluonTS's Trainer; under a multi-rank launcher it
broadcasts the initial parameters, averages gradients every step, reduces epoch losses across ranks before the
callbacks see them, and keeps every rank's network bitwise identical (see ``docs/gluonts.md``).

``Trainer`` imports GluonTS lazily, so ``iteravg.gluonts.guard`` (used by ``iteravg.mx``) works without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Trainer", "GluonTSVersionError", "check_replicas_in_sync", "IndependentReplicasError", "is_root"]


def is_root() -> bool:
    """True on the rank that should write files (the serialised predictor, reports): rank 0, or the only process."""
    from ..comm import get_comm

    return get_comm().rank == 0


def __getattr__(name: str) -> Any:  # PEP 562: import GluonTS only when the Trainer is asked for
    if name in ("Trainer", "GluonTSVersionError"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("check_replicas_in_sync", "IndependentReplicasError"):
        from . import guard

        return getattr(guard, name)
    raise AttributeError(f"module 'iteravg.gluonts' has no attribute {name!r}")
