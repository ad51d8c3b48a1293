"""Communicators behind one protocol, and the automatic choice among them.

``get_comm()`` picks, in order:

1. ``ITERAVG_COMM=horovod|mpi|local`` if set (an explicit choice; failure to create it is an error);
2. Horovod if the process was started by ``horovodrun`` (``HOROVOD_RANK`` / ``HOROVOD_HOSTNAME`` set);
3. under plain ``mpirun`` (``OMPI_COMM_WORLD_SIZE`` / ``PMI_SIZE`` / ``PMIX_RANK`` set): Horovod if it imports,
   else mpi4py -- agreed by every rank before any collective (``agreement.py``);
4. otherwise the single-process ``LocalComm`` -- no launcher, MPI or Horovod is imported.

Multi-rank communicators run every collective under a deadline (``watchdog.py``: ``ITERAVG_COLLECTIVE_TIMEOUT``,
``set_timeout``, ``phase``).

The communicator is a process-wide singleton (one per backend), because MPI and Horovod are initialised
once per process.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Union

from .agreement import agreed_backend
from .base import CommError, Communicator, ReduceOp, describe
from .local import LocalComm
from .watchdog import current_phase, get_timeout, phase, set_timeout

__all__ = ["Communicator", "CommError", "ReduceOp", "LocalComm", "get_comm", "resolve_comm", "detect_backend", "describe",
           "phase", "current_phase", "set_timeout", "get_timeout"]

_BACKENDS = ("horovod", "mpi", "local")
_instances: Dict[str, Communicator] = {}


#: Where launchers put this process's rank: horovodrun, Open MPI's mpirun, MPICH / PMI, PMIx, SLURM's srun.
RANK_ENV = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def launcher_rank() -> int:
    """This process's rank as the launcher's environment says (0 without a launcher), without initialising MPI or
    Horovod: for deciding who prints before any communicator exists (usage errors, construction warnings)."""
    for key in RANK_ENV:
        text = os.environ.get(key, "").strip()
        if text.isdigit():
            return int(text)
    return 0


def _launched_by_horovodrun() -> bool:
    return "HOROVOD_RANK" in os.environ or "HOROVOD_HOSTNAME" in os.environ


def _launched_by_mpirun() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))


def _horovod_importable() -> bool:
    try:
        import horovod.mxnet  # noqa: F401
    except Exception:
        return False
    return True


def detect_backend() -> str:
    """The backend ``get_comm()`` would create, from ``ITERAVG_COMM`` and the launcher's environment."""
    forced = os.environ.get("ITERAVG_COMM", "").strip().lower()
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"ITERAVG_COMM must be one of {', '.join(_BACKENDS)}, got {forced!r}")
        return forced
    if _launched_by_horovodrun():
        return "horovod"
    if _launched_by_mpirun():
        return "horovod" if _horovod_importable() else "mpi"
    return "local"


def get_comm(backend: Optional[str] = None) -> Communicator:
    """The process-wide communicator for ``backend`` (default: ``detect_backend()``, agreed by every rank of an
    ``mpirun`` job: ``agreement.py``)."""
    backend = (backend or agreed_backend(detect_backend)).lower()
    if backend not in _BACKENDS:
        raise ValueError(f"comm must be one of {', '.join(_BACKENDS)} or a Communicator, got {backend!r}")
    if backend not in _instances:
        if backend == "horovod":
            from .horovod import HorovodComm

            _instances[backend] = HorovodComm()
        elif backend == "mpi":
            from .mpi import MPIComm

            _instances[backend] = MPIComm()
        else:
            _instances[backend] = LocalComm()
    return _instances[backend]


def resolve_comm(comm: Union[None, str, Communicator]) -> Communicator:
    """Accept what users pass as ``comm=``: ``None`` (auto), a backend name, or a communicator object."""
    if comm is None or isinstance(comm, str):
        return get_comm(comm)
    if not isinstance(comm, Communicator):
        raise ValueError(f"comm must be None, 'horovod', 'mpi', 'local' or a Communicator, got {comm!r}")
    return comm
