"""Every collective iteravg issues, each named, in one place.

Rules that keep a distributed job from hanging or mixing garbage:

* Each function here is called by all ranks at the same point, and only on decisions that are replicated
  (they depend on state every rank holds identically), never on per-rank data. Per-rank outcomes (a failed
  read, a mismatched layout) are first *agreed* with a collective, then every rank raises the same error.
* Names are fixed strings, so all ranks issue the same names in the same order.
* With one rank every function returns at once without touching the communicator.

Collectives issued, by when:

==========================  ====================================================  ============================
name                        what                                                   when
==========================  ====================================================  ============================
``iteravg.layout``          allgather of a layout digest (+ broadcast on mismatch)  first bind of a model
``iteravg.metric``          allgather of the epoch metric                           NTA decision epochs only
``iteravg.dirty``           allreduce-max of "folded since the last sync"          before hook-level syncs
``iteravg.source``          allreduce-min of "lowest rank holding an average"       ``sync="broadcast"`` syncs
``iteravg.avg.<g>``         allreduce-sum (every dtype, with or without the C       every state sync
                            kernel), or broadcast, of dtype group g's flat buffer
``iteravg.fingerprint``     allreduce-max of (fingerprint, ~fingerprint, counter)   after every state sync
``iteravg.repair.<g>``      broadcast from the sync's source rank                   only if fingerprints differ
``iteravg.agree``           allgather of ok flags (+ broadcast of the error text)   around rank-0 file reads
``iteravg.bytes.*``         broadcast of a length, then of the bytes                checkpoint state on resume
``iteravg.rank_mean``       allgather of a few scalars                             epoch losses (training loop)
``iteravg.bcast.*.<i>``     broadcast from rank 0 (``params``, ``resume``)         initial / resumed parameters
``iteravg.grad.<i>``        allreduce-mean                                         gradients (mpi4py backend)
``iteravg.finish``          barrier                                                before a rank leaves
``iteravg.watchdog.hello``  two allgathers: side-channel key parts, then ports     communicator creation
==========================  ====================================================  ============================

Every collective has a deadline (``ITERAVG_COLLECTIVE_TIMEOUT`` seconds, default 300, ``0`` disables, or
``set_timeout(seconds)``); the hook it came from is named with ``with phase("on_epoch_end"): ...``. A rank that
waits past the deadline prints the collective, the hook, the deadline and where every other rank is, then ends the
whole job (see ``iteravg.comm.watchdog``).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable, List, Optional, Sequence, TypeVar

import numpy as np

from . import _faults
from .checkpoint import CheckpointError, SnapshotWriteError
from .comm import Communicator, liveness
from .comm.watchdog import current_phase, get_timeout, phase, set_timeout
from .core._kernel import scale_and_word_sums
from .core.averaged import AveragedState, Layout

__all__ = [
    "CollectiveError",
    "LayoutMismatchError",
    "ReplicaDivergenceError",
    "consensus_metric",
    "check_same_layout",
    "sync_average",
    "broadcast_average",
    "broadcast_bytes",
    "broadcast_json",
    "agree",
    "finish",
    "mean_of_ranks",
    "broadcast_arrays",
    "allreduce_mean_arrays",
    "run_on_root",
    "any_rank",
    "METRIC_REDUCTIONS",
    "phase",
    "current_phase",
    "set_timeout",
    "get_timeout",
]

METRIC_REDUCTIONS = ("mean", "min", "max", "rank0")
T = TypeVar("T")
logger = logging.getLogger("iteravg")


class CollectiveError(RuntimeError):
    """Raised identically on every rank when ranks disagree in a way iteravg cannot repair."""


class LayoutMismatchError(CollectiveError, ValueError):
    """Ranks hold models with different parameter names, shapes or dtypes."""


class ReplicaDivergenceError(CollectiveError):
    """Averaged models still differ across ranks after a sync and a repair broadcast."""


# -- metrics -------------------------------------------------------------------------------------
def consensus_metric(comm: Communicator, value: Any, reduce: str = "mean") -> float:
    """The metric every rank uses for a trigger decision, bitwise identical on all ranks.

    Each rank's value is gathered and reduced in rank order by the same code on every rank (an allreduce
    could round differently per rank). Ranks whose value is NaN or inf are left out; if no rank has a
    finite value the result is NaN and the caller's decision raises ``ValueError`` on every rank.
    """
    if reduce not in METRIC_REDUCTIONS:
        raise ValueError(f"metric_reduce must be one of {', '.join(METRIC_REDUCTIONS)}, got {reduce!r}")
    try:
        local = float(value)
    except (TypeError, ValueError):
        local = math.nan
    if comm.size == 1:
        return local
    values = comm.allgather(np.array([local], dtype=np.float64), name="iteravg.metric")[:, 0]
    if reduce == "rank0":
        return float(values[0])
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan
    if reduce == "mean":
        return float(np.add.reduce(finite) / finite.size)
    return float(finite.min() if reduce == "min" else finite.max())


# -- agreement on per-rank outcomes --------------------------------------------------------------
def agree(comm: Communicator, error: Optional[BaseException], what: str) -> None:
    """Make a per-rank failure everybody's: if any rank has ``error``, every rank raises the same error.

    The raised exception is ``SnapshotWriteError``, ``CheckpointError`` or ``ValueError`` if the first failing rank's
    was one (the most specific), else ``CollectiveError``; its message names that rank.
    """
    if comm.size == 1:
        if error is not None:
            raise error
        return
    flags = comm.allgather(np.array([0 if error is None else 1 + _agreed_class(error)], dtype=np.int32),
                           name="iteravg.agree")[:, 0]
    failing = [r for r in range(comm.size) if flags[r]]
    if not failing:
        return
    root = failing[0]
    text = broadcast_bytes(comm, str(error).encode() if comm.rank == root else None, root=root).decode()
    liveness.mark_orderly_exit()  # every rank raises this error: exiting on it is not a lone rank leaving
    cls = _AGREED_CLASSES[min(int(flags[root]) - 1, len(_AGREED_CLASSES) - 1)]
    msg = f"{what} failed on rank {root}: {text}"
    if error is not None and comm.rank == root:
        raise cls(msg) from error
    raise cls(msg)


#: The classes an agreed error keeps on every rank (the most specific one the failing rank's error is an instance
#: of); anything else becomes ``CollectiveError``.
_AGREED_CLASSES = (CollectiveError, ValueError, CheckpointError, SnapshotWriteError)


def _agreed_class(error: BaseException) -> int:
    return max(i for i, cls in enumerate(_AGREED_CLASSES) if i == 0 or isinstance(error, cls))


def run_on_root(comm: Communicator, fn: Callable[[], T], what: str, root: int = 0) -> Optional[T]:
    """Run ``fn`` on ``root`` only, then agree: every rank raises if it failed. Returns root's result (or None)."""
    result: Optional[T] = None
    error: Optional[BaseException] = None
    if comm.rank == root:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 -- re-raised on every rank by agree()
            error = exc
    agree(comm, error, what)
    return result


# -- bytes and JSON ------------------------------------------------------------------------------
def broadcast_bytes(comm: Communicator, payload: Optional[bytes], root: int = 0) -> bytes:
    """Send ``payload`` from ``root`` to every rank (other ranks pass ``None``). No pickle involved."""
    if comm.size == 1:
        return payload or b""
    length = np.array([len(payload) if comm.rank == root and payload is not None else 0], dtype=np.int64)
    comm.broadcast_(length, root=root, name="iteravg.bytes.len")
    n = int(length[0])
    buf = np.zeros(max(n, 1), dtype=np.uint8)
    if comm.rank == root and n:
        buf[:n] = np.frombuffer(payload, dtype=np.uint8)
    comm.broadcast_(buf, root=root, name="iteravg.bytes.data")
    return buf[:n].tobytes()


def broadcast_json(comm: Communicator, obj: Any, root: int = 0) -> Any:
    data = json.dumps(obj).encode() if comm.rank == root else None
    return json.loads(broadcast_bytes(comm, data, root=root).decode())


# -- model layout --------------------------------------------------------------------------------
def check_same_layout(comm: Communicator, layout: Layout) -> None:
    """Raise ``LayoutMismatchError`` on every rank unless all ranks' models have the same tensors.

    Cheap in the normal case (one allgather of a 256-bit digest); on mismatch, the first differing rank's
    description is broadcast so that every rank raises the same message naming the first differing tensor.
    """
    if comm.size == 1:
        return
    digest = np.frombuffer(bytes.fromhex(layout.digest()), dtype=np.int64)
    digests = comm.allgather(digest, name="iteravg.layout")
    bad = [r for r in range(comm.size) if not np.array_equal(digests[r], digests[0])]
    if not bad:
        return
    r = bad[0]
    ref = broadcast_json(comm, layout.describe(), root=0)
    other = broadcast_json(comm, layout.describe(), root=r)
    diff = _first_difference(ref, other)
    raise LayoutMismatchError(
        f"models differ across ranks (ranks {bad} differ from rank 0): {diff}. Every rank must build the same "
        "network (same architecture, parameter names, shapes and dtypes) before averaging."
    )


def _first_difference(a: Sequence[Sequence[Any]], b: Sequence[Sequence[Any]]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if list(x) != list(y):
            return (f"tensor #{i}: rank 0 has {x[0]!r} shape {tuple(x[1])} {x[2]}, "
                    f"the other rank has {y[0]!r} shape {tuple(y[1])} {y[2]}")
    return f"rank 0 has {len(a)} tensors, the other rank has {len(b)}"


# -- averaged state ------------------------------------------------------------------------------
def sync_average(comm: Communicator, state: AveragedState, counter: int, mode: str = "mean") -> int:
    """Make the averaged model identical on every rank; returns the agreed ``average_counter``.

    ``mode="mean"``: allreduce-sum of each dtype buffer, divided by the number of ranks holding an average, so
    every rank's iterates (and BatchNorm statistics) count; the update is linear, so the result is the average of
    the rank-mean iterates. ``mode="broadcast"``: the average of the lowest rank that holds one wins (rank 0's,
    unless rank 0 never folded an iterate; a rank with nothing never overwrites the others with zeros).

    Then one small allreduce-max of the buffers' fingerprints checks bitwise identity; if ranks differ (an allreduce
    is allowed to round differently per rank), the source rank's buffers are broadcast and checked again, and
    ``ReplicaDivergenceError`` is raised on every rank if they still differ. The counter is the maximum
    over ranks (ranks differ only if one refused a non-finite iterate).

    The collectives issued and their ops depend on nothing per host (not on whether the C kernel compiled, nor on
    the data): the same names, ops and sizes on every rank.
    """
    if comm.size == 1:
        return counter
    if mode not in ("mean", "broadcast"):
        raise ValueError(f"sync must be 'mean' or 'broadcast', got {mode!r}")
    sums: List[Optional[tuple]] = []
    source = 0
    if mode == "broadcast":
        source = _lowest_rank_with_data(comm, counter > 0)
    for g in range(len(state.layout.groups)):
        if mode == "mean":
            sums.append(_allreduce_mean_of_contributors(comm, state, g, has_data=counter > 0))
        else:
            comm.broadcast_(state.sync_view(g), root=source, name=f"iteravg.avg.{g}", native=state.native(g))
            sums.append(None)
    if _maybe_inject_divergence(comm, state):
        sums = [None] * len(sums)
    same, counter_max = _identical(comm, state, counter, sums)
    if not same:
        logger.warning("iteravg: averaged models differed across ranks after the allreduce; repaired by a "
                       "broadcast from rank %d", source)
        broadcast_average(comm, state, name="iteravg.repair", root=source)
        same, counter_max = _identical(comm, state, counter)
        if not same:
            raise ReplicaDivergenceError(
                f"averaged models still differ across ranks after a repair broadcast from rank {source}; "
                "this points at memory corruption or a non-deterministic reduction -- please report it"
            )
    return counter_max


def _lowest_rank_with_data(comm: Communicator, has_data: bool) -> int:
    """The lowest rank holding an average (0 if none does): one allreduce-min of a small integer."""
    v = np.array([comm.rank if has_data else comm.size], dtype=np.int32)
    comm.allreduce_(v, op="min", name="iteravg.source")
    return int(v[0]) if int(v[0]) < comm.size else 0


def _allreduce_mean_of_contributors(comm: Communicator, state: AveragedState, g: int,
                                    has_data: bool) -> Optional[tuple]:
    """Allreduce-mean of one dtype group, counting only ranks that hold an average.

    A rank whose every iterate so far was refused (NaN/inf) holds nothing; averaging its empty buffer in
    would pull the mean towards zero. Each rank puts 1 (has data) or 0 in the buffer's trailing slot and
    zeroes an empty buffer, so after a *sum* allreduce the slot counts the contributors; every rank then multiplies
    by ``1/contributors``. The op is always ``sum``, whatever the dtype and whether the C kernel compiled.

    float32: the division and the fingerprint that checks the ranks agree are one pass (C kernel, or numpy with
    the same bits); returns that pass's word sums for ``fingerprint``. float16 is scaled in float32 and rounded
    once; other dtypes are scaled in their own precision (returns ``None``).
    """
    buf = state.sync_view(g)
    if has_data:
        buf[-1] = 1
    else:
        buf[:] = 0
    data = state.current(g)
    comm.allreduce_(buf, op="sum", name=f"iteravg.avg.{g}", native=state.native(g))
    contributors = int(round(float(buf[-1])))
    scale = 1.0 / contributors if contributors else 0.0
    if data.dtype == np.float32:
        return scale_and_word_sums(data, scale)
    if data.dtype.itemsize < 4:
        np.multiply(data, np.float32(scale), out=data, dtype=np.float32, casting="unsafe")
    else:
        np.multiply(data, data.dtype.type(scale), out=data)
    return None


def broadcast_average(comm: Communicator, state: AveragedState, name: str = "iteravg.avg", root: int = 0) -> None:
    """Overwrite every rank's average with ``root``'s (resume, repair)."""
    if comm.size == 1:
        return
    for g in range(len(state.layout.groups)):
        comm.broadcast_(state.sync_view(g), root=root, name=f"{name}.{g}", native=state.native(g))


def _identical(comm: Communicator, state: AveragedState, counter: int,
               sums: Optional[List[Optional[tuple]]] = None) -> tuple:
    """One small allreduce-max of (fingerprint, ~fingerprint, counter): all ranks hold the same bits iff
    max(fp) == ~max(~fp), because max(~x) == ~min(x) exactly (no overflow, unlike -x for INT64_MIN).
    Cheaper than an allgather in Horovod (no size negotiation)."""
    fp = state.fingerprint(sums)
    row = np.concatenate([fp, np.invert(fp), np.array([counter], dtype=np.int64)])
    comm.allreduce_(row, op="max", name="iteravg.fingerprint")
    same = bool(np.array_equal(row[:2], np.invert(row[2:4])))
    return same, int(row[4])


def _maybe_inject_divergence(comm: Communicator, state: AveragedState) -> bool:
    """Testing switch ``ITERAVG_FAULT=diverge-after-allreduce:R``: flip the lowest bit of rank R's first element.
    Returns True if it did (precomputed fingerprints are then stale)."""
    if _faults.diverging_rank() == comm.rank:
        buf = state.current(0)
        buf[:1].view(np.uint8)[0] ^= 1
        return True
    return False


def any_rank(comm: Communicator, flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on at least one rank (a one-integer allreduce-max)."""
    if comm.size == 1:
        return bool(flag)
    v = np.array([1 if flag else 0], dtype=np.int32)
    comm.allreduce_(v, op="max", name="iteravg.dirty")
    return bool(v[0])


# -- training-loop helpers -----------------------------------------------------------------------
def mean_of_ranks(comm: Communicator, values: Sequence[float]) -> List[float]:
    """Per-position mean over ranks of a few scalars (epoch losses), identical on every rank.

    NaN/inf values are kept (a diverged rank must show in the logged loss, unlike in a trigger decision).
    """
    local = np.asarray(values, dtype=np.float64).reshape(-1)
    if comm.size == 1:
        return [float(v) for v in local]
    rows = comm.allgather(local, name="iteravg.rank_mean")
    return [float(v) for v in np.add.reduce(rows, axis=0) / comm.size]


def broadcast_arrays(comm: Communicator, arrays: Sequence[np.ndarray], natives: Optional[Sequence[Any]] = None,
                     root: int = 0, name: str = "iteravg.bcast") -> None:
    """Overwrite every rank's arrays with root's, in order (initial parameters, resumed training state)."""
    if comm.size == 1:
        return
    for i, arr in enumerate(arrays):
        comm.broadcast_(arr, root=root, name=f"{name}.{i}", native=None if natives is None else natives[i])


def allreduce_mean_arrays(comm: Communicator, arrays: Sequence[np.ndarray], natives: Optional[Sequence[Any]] = None,
                          name: str = "iteravg.grad") -> None:
    """In-place mean over ranks of each array (gradients, for communicators without a distributed trainer)."""
    if comm.size == 1:
        return
    for i, arr in enumerate(arrays):
        comm.allreduce_(arr, op="mean", name=f"{name}.{i}", native=None if natives is None else natives[i])


def finish(comm: Communicator) -> None:
    """A barrier before a rank may leave: no rank exits while another is still inside a collective."""
    if comm.size > 1:
        comm.barrier(name="iteravg.finish")
        liveness.mark_orderly_exit()
