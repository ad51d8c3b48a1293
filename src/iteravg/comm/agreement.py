"""Every rank of an ``mpirun`` job uses the same communicator -- or every rank fails with the same message.

Why: under plain ``mpirun`` the choice is made per rank ("Horovod if ``horovod.mxnet`` imports, else mpi4py"; or
``ITERAVG_COMM``, which ``mpirun`` forwards to other hosts only with ``-x``). A host where the Horovod import fails
would then use mpi4py while the others use Horovod, and the job would hang in mismatched collectives. So before
any collective that depends on the choice, the ranks compare their choices over MPI itself (mpi4py, the one
channel every rank of an ``mpirun`` job has; Horovod then runs on the MPI that mpi4py initialised):

* all the same: that one;
* only the automatic choices differ (Horovod imports on some hosts, not on others): mpi4py on every rank, and rank 0
  says which ranks lack Horovod and why;
* ``ITERAVG_COMM=mpi`` on some ranks, automatic on the others: mpi4py on every rank (rank 0 says so: ``mpirun``
  forwards the variable only with ``-x``);
* anything else (``ITERAVG_COMM`` naming different backends, or ``horovod`` where it does not import, or an invalid
  value): every rank raises the same ``CommError`` naming each rank's choice and host.

``horovodrun`` (always Horovod on every rank) and ``torchrun`` need no agreement: their choice does not depend on
the host. The agreement runs once per process, at the first ``get_comm()``; it has the collective deadline.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
from typing import Callable, Dict, List, Optional, Tuple

from .base import CommError

__all__ = ["agreed_backend", "decide", "needs_agreement"]

ROW_BYTES = 1024
logger = logging.getLogger("iteravg")
_agreed: List[str] = []

_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
_SIZE_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def needs_agreement() -> bool:
    """Under a plain MPI launcher with (possibly) more than one rank, and not under ``horovodrun``."""
    if "HOROVOD_RANK" in os.environ or "HOROVOD_HOSTNAME" in os.environ:
        return False
    if not any(k in os.environ for k in _MPI_ENV):
        return False
    for key in _SIZE_ENV:
        text = os.environ.get(key, "").strip()
        if text.isdigit():
            return int(text) > 1
    return True


def agreed_backend(detect: Callable[[], str]) -> str:
    """``detect()``'s backend, agreed across the ranks of an ``mpirun`` job (see the module doc)."""
    if _agreed:
        return _agreed[0]
    if not needs_agreement():
        return detect()
    forced = os.environ.get("ITERAVG_COMM", "").strip().lower()
    mine: Dict[str, object] = {"host": socket.gethostname(), "forced": bool(forced)}
    try:
        mine["choice"] = detect()
    except ValueError as exc:
        mine["choice"], mine["error"] = forced or "?", str(exc)[:300]
    if mine.get("choice") == "mpi" and not forced:
        mine["why"] = _horovod_import_error()
    try:
        from mpi4py import MPI  # noqa: WPS433 -- initialises MPI (Horovod then runs on it)
    except ImportError as exc:
        raise CommError("under mpirun, iteravg needs mpi4py on every rank to agree on the communicator "
                        f"(pip install mpi4py): {exc}") from exc
    world = MPI.COMM_WORLD
    if world.Get_size() == 1:
        if "error" in mine:
            raise ValueError(str(mine["error"]))
        return str(mine["choice"])
    rows = _allgather(world, mine)
    backend, note = decide(rows)
    if note and world.Get_rank() == 0:
        logger.warning("iteravg: %s", note)
    _agreed.append(backend)
    return backend


def _horovod_import_error() -> str:
    """Why Horovod is not used on this rank: the binding it would use (``horovod.choose_binding``; never loads MXNet
    into a job that does not use it) and the error importing it."""
    try:
        from .horovod import choose_binding, load_binding  # noqa: WPS433

        binding = choose_binding()
        load_binding(binding)
    except Exception as exc:  # noqa: BLE001 -- any failure is a reason
        return f"{type(exc).__name__}: {exc}"[:300]
    return "horovod imports"


def _allgather(world, mine: Dict[str, object]) -> List[Dict[str, object]]:  # type: ignore[no-untyped-def]
    import numpy as np

    from .watchdog import EXIT_CODE, get_timeout

    raw = json.dumps(mine).encode()[:ROW_BYTES].ljust(ROW_BYTES, b" ")
    out = np.empty((world.Get_size(), ROW_BYTES), dtype=np.uint8)
    deadline = get_timeout()
    timer = None
    if deadline is not None:
        def give_up() -> None:
            sys.stderr.write(f"iteravg: rank {world.Get_rank()} waited {deadline:g} s for every rank to agree on the "
                             "communicator (ITERAVG_COLLECTIVE_TIMEOUT); ending the whole job (MPI_Abort)\n")
            sys.stderr.flush()
            world.Abort(EXIT_CODE)

        timer = threading.Timer(deadline, give_up)
        timer.daemon = True
        timer.start()
    try:
        world.Allgather(np.frombuffer(raw, dtype=np.uint8), out)
    finally:
        if timer is not None:
            timer.cancel()
    rows = []
    for r in range(out.shape[0]):
        try:
            row = json.loads(bytes(out[r]).decode("utf-8", "replace").strip() or "{}")
        except ValueError:
            row = {}
        rows.append(row if isinstance(row, dict) else {})
    return rows


def _describe(r: int, row: Dict[str, object]) -> str:
    how = "ITERAVG_COMM" if row.get("forced") else "detected"
    text = f"rank {r} ({row.get('host', '?')}): {row.get('choice', '?')!r} ({how})"
    if row.get("error"):
        text += f" -- {row['error']}"
    return text


def decide(rows: List[Dict[str, object]]) -> Tuple[str, Optional[str]]:
    """(backend, note for rank 0) from every rank's row, or ``CommError`` -- the same on every rank."""
    table = "; ".join(_describe(r, row) for r, row in enumerate(rows))
    bad = [r for r, row in enumerate(rows) if row.get("error") or row.get("choice") not in ("horovod", "mpi", "local")]
    if bad:
        raise CommError(f"the ranks cannot agree on a communicator: {table}")
    choices = {str(row["choice"]) for row in rows}
    if len(choices) == 1:
        return choices.pop(), None
    forced = {str(row["choice"]) for row in rows if row.get("forced")}
    auto = {str(row["choice"]) for row in rows if not row.get("forced")}
    if not forced and auto == {"horovod", "mpi"}:
        lacking = [r for r, row in enumerate(rows) if row.get("choice") == "mpi"]
        why = "; ".join(f"rank {r} ({rows[r].get('host', '?')}): {rows[r].get('why', '?')}" for r in lacking)
        return "mpi", (f"horovod.mxnet does not import on rank(s) {lacking} ({why}); every rank uses mpi4py instead "
                       "(set ITERAVG_COMM on every rank to choose)")
    if forced == {"mpi"}:
        return "mpi", ("ITERAVG_COMM=mpi is set on some ranks only (mpirun forwards it to other hosts only with "
                       f"-x ITERAVG_COMM); every rank uses mpi4py: {table}")
    raise CommError(f"the ranks chose different communicators: {table}. Set ITERAVG_COMM alike on every rank "
                    "(mpirun -x ITERAVG_COMM=...) or install Horovod on every host")
