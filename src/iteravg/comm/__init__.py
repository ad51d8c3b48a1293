"""Communicators behind one protocol, and the automatic choice among them.

``get_comm()`` picks, in order:

1. ``ITERAVG_COMM=horovod|mpi|torch|local`` if set (an explicit choice; failure to create it is an error);
2. ``torch`` if this process already initialised ``torch.distributed``'s default process group (it is reused);
3. Horovod if the process was started by ``horovodrun`` (``HOROVOD_RANK`` / ``HOROVOD_HOSTNAME`` set);
4. under plain ``mpirun`` (``OMPI_COMM_WORLD_SIZE`` / ``PMI_SIZE`` / ``PMIX_RANK`` set): Horovod if the binding
   it would use imports (``horovod.choose_binding``: ``horovod.torch`` unless the job imported MXNet), else mpi4py
   -- agreed by every rank before any collective (``agreement.py``);
5. ``torch`` under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; world size > 1);
6. mpi4py inside a SLURM ``srun`` step of more than one task (``SLURM_STEP_NUM_TASKS``) without MPI's variables;
7. otherwise the single-process ``LocalComm`` -- no launcher, MPI, Horovod or torch is imported.

A process whose launcher says it has peers never carries on alone: when the communicator cannot be built, or has
another size than the launcher declared (``launcher_world_size``), ``get_comm`` raises ``CommError`` naming the
launcher's variables (``ITERAVG_COMM=local`` is the explicit way to average each process on its own).

Multi-rank communicators run every collective under a deadline (``watchdog.py``: ``ITERAVG_COLLECTIVE_TIMEOUT``,
``set_timeout``, ``phase``).

The communicator is a process-wide singleton (one per backend), because MPI and Horovod are initialised
once per process.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Dict, Optional, Tuple, Union

from .agreement import agreed_backend
from .base import CommError, Communicator, ReduceOp, describe
from .local import LocalComm
from .watchdog import current_phase, get_timeout, phase, set_timeout

__all__ = ["Communicator", "CommError", "ReduceOp", "LocalComm", "get_comm", "resolve_comm", "detect_backend", "describe",
           "phase", "current_phase", "set_timeout", "get_timeout", "launcher_rank", "launcher_world_size"]

_BACKENDS = ("horovod", "mpi", "torch", "local")
_instances: Dict[str, Communicator] = {}
logger = logging.getLogger("iteravg")


#: Where launchers put this process's rank: horovodrun, Open MPI's mpirun, MPICH / PMI, PMIx, SLURM's srun, torchrun.
RANK_ENV = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "RANK")
#: Where launchers put the number of processes, in the same order of precedence.
SIZE_ENV = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "WORLD_SIZE")


def launcher_rank() -> int:
    """This process's rank as the launcher's environment says (0 without a launcher), without initialising MPI or
    Horovod: for deciding who prints before any communicator exists (usage errors, construction warnings)."""
    for key in RANK_ENV:
        text = os.environ.get(key, "").strip()
        if text.isdigit():
            return int(text)
    return 0


def launcher_world_size() -> Optional[Tuple[int, str]]:
    """(number of processes, the variable that says so) as the launcher's environment declares, or None."""
    for key in SIZE_ENV:
        text = os.environ.get(key, "").strip()
        if text.isdigit():
            return int(text), key
    return None


def _launched_by_horovodrun() -> bool:
    return "HOROVOD_RANK" in os.environ or "HOROVOD_HOSTNAME" in os.environ


def _launched_by_mpirun() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))


def _launched_by_torchrun() -> bool:
    from .torch import torchrun_world_size  # noqa: WPS433 -- imports nothing heavy

    size = torchrun_world_size()
    return size is not None and size > 1


def _launched_by_srun() -> bool:
    text = os.environ.get("SLURM_STEP_NUM_TASKS", "").strip()  # set inside an srun step, not in the batch script
    return "SLURM_PROCID" in os.environ and text.isdigit() and int(text) > 1


def _torch_group_initialised() -> bool:
    """Whether the user's program already set up ``torch.distributed`` (checked only if it imported torch)."""
    dist = sys.modules.get("torch.distributed")
    try:
        return bool(dist is not None and dist.is_available() and dist.is_initialized())
    except Exception:  # noqa: BLE001 -- a broken torch build is not ours to diagnose here
        return False


def _horovod_importable() -> bool:
    """Whether the Horovod binding the communicator would use imports (``horovod.torch`` in a job that has not
    imported MXNet, so that checking does not load MXNet; see ``horovod.choose_binding``)."""
    from .horovod import choose_binding, load_binding

    binding = choose_binding()  # a bad ITERAVG_HOROVOD_BINDING is an error, not a reason to fall back to mpi4py
    try:
        load_binding(binding)
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
    if _torch_group_initialised():
        return "torch"
    if _launched_by_horovodrun():
        return "horovod"
    if _launched_by_mpirun():
        return "horovod" if _horovod_importable() else "mpi"
    if _launched_by_torchrun():
        return "torch"
    if _launched_by_srun():
        return "mpi"
    return "local"


def _create(backend: str) -> Communicator:
    if backend == "horovod":
        from .horovod import HorovodComm

        return HorovodComm()
    if backend == "mpi":
        from .mpi import MPIComm

        return MPIComm()
    if backend == "torch":
        from .torch import TorchDistComm

        return TorchDistComm()
    return LocalComm()


def _check_world(comm: Communicator, backend: str, forced: Optional[str]) -> None:
    """A launcher that declares peers must get a communicator that sees them all (never a silent ``local``)."""
    declared = launcher_world_size()
    if declared is None or declared[0] <= 1 or comm.size == declared[0]:
        return
    size, key = declared
    if backend == "local" and forced:
        if forced == "argument":  # comm="local" in the program: as deliberate as it gets, nothing to say
            return
        logger.warning("iteravg: ITERAVG_COMM=local under a launcher that declares %s=%d: each process averages on "
                       "its own and must write its own checkpoint directory", key, size)
        return
    raise CommError(
        f"the launcher declares {key}={size} processes, but the {backend!r} communicator sees {comm.size}: this "
        f"process would average alone and race the others on one checkpoint directory. "
        + ("Launch with torchrun, horovodrun or mpirun, or " if backend == "local" else "Check the launcher, or ")
        + "set ITERAVG_COMM=horovod|mpi|torch to the backend your job uses (ITERAVG_COMM=local to average each "
        "process on its own).")


def get_comm(backend: Optional[str] = None) -> Communicator:
    """The process-wide communicator for ``backend`` (default: ``detect_backend()``, agreed by every rank of an
    ``mpirun`` job: ``agreement.py``).

    Raises ``CommError`` when the launcher declares peers that the communicator does not see."""
    forced = "argument" if backend is not None else ("ITERAVG_COMM" if os.environ.get("ITERAVG_COMM", "").strip()
                                                     else None)
    backend = (backend or agreed_backend(detect_backend)).lower()
    if backend not in _BACKENDS:
        raise ValueError(f"comm must be one of {', '.join(_BACKENDS)} or a Communicator, got {backend!r}")
    if backend not in _instances:
        try:
            comm = _create(backend)
        except CommError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any failure to build a requested backend is a CommError
            raise CommError(f"the {backend!r} communicator could not be created: {exc}") from exc
        _check_world(comm, backend, forced)
        _instances[backend] = comm
    return _instances[backend]


def resolve_comm(comm: Union[None, str, Communicator]) -> Communicator:
    """Accept what users pass as ``comm=``: ``None`` (auto), a backend name, or a communicator object."""
    if comm is None or isinstance(comm, str):
        return get_comm(comm)
    if not isinstance(comm, Communicator):
        raise ValueError(f"comm must be None, 'horovod', 'mpi', 'torch', 'local' or a Communicator, got {comm!r}")
    return comm
