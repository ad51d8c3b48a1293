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
``iteravg.pieces[.count]``  allgather of every rank's piece table                   first bind of a sharded state
``iteravg.gather[.size].g`` allgather of every rank's shard of dtype group g        snapshots of a sharded state
``iteravg.resume.<g>``      broadcast of a whole dtype group from rank 0           resume of a sharded state
``iteravg.replicas``        allreduce-max of the training parameters' fingerprint  epoch ends with sharded=True
``iteravg.metric``          allgather of the epoch metric                           NTA decision epochs only
``iteravg.dirty``           allreduce-max of "folded since the last sync"          before hook-level syncs
``iteravg.source``          allreduce-min of "lowest rank holding an average"       ``sync="broadcast"`` syncs
``iteravg.agree.tensors``   allreduce-max of every tensor's fingerprint           every state sync
``iteravg.avg.<g>[.<j>]``   allreduce-sum (every dtype, with or without the C       a sync where tensors differ
                            kernel), or broadcast, of dtype group g's flat buffer
                            (or of its j-th run of differing tensors)
``iteravg.fingerprint``     allreduce-max of (fingerprint, ~fingerprint, counter)   after every state sync
``iteravg.repair.<g>``      broadcast from the sync's source rank                   only if fingerprints differ
``iteravg.agree``           allgather of ok flags (+ broadcast of the error text)   around rank-0 file reads
``iteravg.bytes.*``         broadcast of a length, then of the bytes                checkpoint state on resume
``iteravg.posthoc.agree``   allreduce-max of per-tensor fingerprints + counters     ``posthoc=True``: epoch ends,
                                                                                   syncs, ``posthoc_average``
``iteravg.posthoc.sum.<i>.<j>``  allreduce-sum of differing runs of post-hoc sums   only where ranks differ
``iteravg.posthoc.fp``      allreduce-max of the sums' fingerprint (+ repair)      after a post-hoc sum moved
``iteravg.posthoc.average`` broadcast of a post-hoc average from rank 0            ``posthoc_average``
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
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from . import _faults
from .checkpoint import CheckpointError, SnapshotWriteError
from .comm import Communicator, liveness
from .comm.watchdog import current_phase, get_timeout, phase, set_timeout
from .core._kernel import segment_fingerprints
from .core.averaged import AveragedState, Layout, fingerprint

__all__ = [
    "CollectiveError",
    "LayoutMismatchError",
    "ReplicaDivergenceError",
    "consensus_metric",
    "check_same_layout",
    "sync_average",
    "sync_sums",
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

    First, which tensors already agree: one small allreduce-max of every replicated tensor's 128-bit fingerprint
    (``iteravg.agree.tensors``). Tensors that hold the same bits on every rank are left alone -- in data-parallel
    training that is every parameter, so the sync moves no parameter bytes and the average is exactly the
    single-process average of the same iterates (a mean of N equal floats is not always the float itself: with 3 ranks
    about a third of the elements would move by an ulp). Only the tensors that differ (independent replicas, per-rank
    BatchNorm statistics) are reduced, in contiguous runs:

    ``mode="mean"``: allreduce-sum divided by the number of ranks holding an average, so every rank's iterates count;
    the update is linear, so the result is the average of the rank-mean iterates. ``mode="broadcast"``: the average
    of the lowest rank that holds one wins (rank 0's, unless rank 0 never folded an iterate; a rank with nothing never
    overwrites the others with zeros). When every tensor of a dtype group differs, the whole group moves in one
    collective (with the trailing contributor slot); so does everything when some rank holds no average.

    Then one small allreduce-max of the buffers' fingerprints checks bitwise identity; if ranks differ (an allreduce
    is allowed to round differently per rank), the source rank's buffers are broadcast and checked again, and
    ``ReplicaDivergenceError`` is raised on every rank if they still differ. The counter is the maximum
    over ranks (ranks differ only if one refused a non-finite iterate).

    Which collectives are issued depends only on the agreed fingerprints (the same on every rank after the
    allreduce), never on a rank's own data or on whether the C kernel compiled: the same names, ops and sizes on
    every rank.
    """
    if comm.size == 1:
        return counter
    if mode not in ("mean", "broadcast"):
        raise ValueError(f"sync must be 'mean' or 'broadcast', got {mode!r}")
    ranges = replicated_ranges(state)
    differ, someone_empty, counter_max = _differing_tensors(comm, state, ranges, counter)
    if not someone_empty and not any(differ):
        return counter_max
    source = _lowest_rank_with_data(comm, counter > 0) if mode == "broadcast" else 0
    sums: List[Optional[tuple]] = []
    pos = 0
    for g in range(len(state.layout.groups)):
        mine = ranges[g]
        group_differs = differ[pos:pos + len(mine)]
        pos += len(mine)
        if someone_empty or (mine and all(group_differs)):  # the whole group, with the contributor slot
            if mode == "mean":
                sums.append(_allreduce_mean_of_contributors(comm, state, g, has_data=counter > 0))
            else:
                comm.broadcast_(state.sync_view(g), root=source, name=f"iteravg.avg.{g}", native=state.native(g))
                sums.append(None)
            continue
        sums.append(None)
        for j, (a, b) in enumerate(_runs(mine, group_differs)):  # every rank holds an average here
            view, native = _slice(state, g, a, b)
            if mode == "mean":
                comm.allreduce_(view, op="sum", name=f"iteravg.avg.{g}.{j}", native=native)
                state.scale_range(g, a, b, 1.0 / comm.size)
            else:
                comm.broadcast_(view, root=source, name=f"iteravg.avg.{g}.{j}", native=native)
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


def replicated_ranges(state: Any) -> List[List[Tuple[int, int]]]:
    """Per dtype group, the ``(start, stop)`` of each replicated tensor within ``state.current(g)``, in order."""
    part = state.partition
    out: List[List[Tuple[int, int]]] = [[] for _ in state.layout.groups]
    for k, piece in enumerate(part.pieces):
        if piece[3]:
            continue
        g, start, stop = part.local_range(k)
        first = part.replicated_start(g)
        out[g].append((start - first, stop - first))
    return out


def _differing_tensors(comm: Communicator, state: Any, ranges: List[List[Tuple[int, int]]],
                       counter: int) -> Tuple[List[bool], bool, int]:
    """(per replicated tensor: do ranks hold different bits?, does some rank hold no average?, max counter):
    one allreduce-max of every tensor's (fingerprint, ~fingerprint), the "no average" flag and the counter."""
    fps = [state.tensor_fingerprints(g, ranges[g]) for g in range(len(ranges))]
    flat = np.concatenate([f.reshape(-1) for f in fps] + [np.zeros(0, dtype=np.uint64)]).view(np.int64)
    row = np.concatenate([flat, np.invert(flat), np.array([0 if counter > 0 else 1, counter], dtype=np.int64)])
    comm.allreduce_(row, op="max", name="iteravg.agree.tensors")
    n = flat.size
    same = row[:n] == np.invert(row[n:2 * n])  # max(fp) == ~max(~fp) == min(fp): every rank holds fp
    differ = [not bool(same[2 * t] and same[2 * t + 1]) for t in range(n // 2)]
    return differ, bool(row[2 * n]), int(row[2 * n + 1])


def _runs(ranges: Sequence[Tuple[int, int]], differ: Sequence[bool]) -> List[Tuple[int, int]]:
    """Maximal contiguous ``(start, stop)`` runs of the differing tensors."""
    runs: List[Tuple[int, int]] = []
    for (a, b), d in zip(ranges, differ):
        if not d or a == b:
            continue
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return runs


def _slice(state: Any, g: int, a: int, b: int) -> Tuple[Optional[np.ndarray], Any]:
    """Elements ``a:b`` of ``state.current(g)`` as (numpy view or None, native view or None), sharing memory."""
    view = state.sync_view(g)
    native = state.native(g)
    return (None if view is None else view[a:b]), (None if native is None else native[a:b])


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
    zeroes an empty buffer (``state.mark_contribution``), so after a *sum* allreduce the slot counts the
    contributors; every rank then multiplies by ``1/contributors`` (``state.scale``, which may return the word sums
    of the result for the fingerprint). The op is always ``sum``, whatever the dtype and the kind of state.
    """
    state.mark_contribution(g, has_data)
    comm.allreduce_(state.sync_view(g), op="sum", name=f"iteravg.avg.{g}", native=state.native(g))
    contributors = state.contributors(g)
    return state.scale(g, 1.0 / contributors if contributors else 0.0)


# -- post-hoc sums (``core.posthoc``) -------------------------------------------------------------
def sync_sums(comm: Communicator, buffers: Sequence[np.ndarray], bounds: np.ndarray,
              values: Sequence[int]) -> List[int]:
    """Make float64 running sums identical on every rank: each becomes the mean over ranks of its per-rank values.

    The post-hoc sums (``core.posthoc``) of independent replicas are per-rank sums; the run's synced average is the
    mean of the ranks' averages, so the post-hoc one is built from the mean of the ranks' sums. As in
    ``sync_average``, one allreduce-max of every tensor's 128-bit fingerprint (``bounds``: the tensors' segment
    bounds, the same for every buffer) plus ``values`` (small integers to agree on by maximum: counters, flags)
    decides what moves: in data-parallel training the sums hold the same bits on every rank and nothing moves, so the
    post-hoc average is exactly the single-process one. Differing runs are allreduce-summed and divided by the
    number of ranks, then a fingerprint check (with a broadcast from rank 0 as repair) makes the bits identical.
    Returns ``values`` maxed over ranks. Which collectives run depends only on agreed data."""
    if comm.size == 1:
        return [int(v) for v in values]
    fps = [segment_fingerprints(b, bounds).reshape(-1) for b in buffers]
    flat = np.concatenate(fps + [np.zeros(0, dtype=np.uint64)]).view(np.int64)
    row = np.concatenate([flat, np.invert(flat), np.asarray(values, dtype=np.int64)])
    comm.allreduce_(row, op="max", name="iteravg.posthoc.agree")
    n = flat.size
    same = row[:n] == np.invert(row[n:2 * n])
    agreed = [int(v) for v in row[2 * n:]]
    segments = [(int(bounds[k]), int(bounds[k + 1])) for k in range(bounds.size - 1)]
    moved = False
    for i, buf in enumerate(buffers):
        first = i * 2 * len(segments)
        differ = [not bool(same[first + 2 * t] and same[first + 2 * t + 1]) for t in range(len(segments))]
        for j, (a, b) in enumerate(_runs(segments, differ)):
            comm.allreduce_(buf[a:b], op="sum", name=f"iteravg.posthoc.sum.{i}.{j}")
            np.multiply(buf[a:b], 1.0 / comm.size, out=buf[a:b])
            moved = True
    if moved and not _same_bits(comm, buffers):
        logger.warning("iteravg: post-hoc sums differed across ranks after the allreduce; repaired by a broadcast "
                       "from rank 0")
        for i, buf in enumerate(buffers):
            comm.broadcast_(buf, root=0, name=f"iteravg.posthoc.repair.{i}")
        if not _same_bits(comm, buffers):
            raise ReplicaDivergenceError("post-hoc sums still differ across ranks after a repair broadcast from "
                                         "rank 0; this points at memory corruption -- please report it")
    return agreed


def _same_bits(comm: Communicator, buffers: Sequence[np.ndarray]) -> bool:
    """One allreduce-max of (fingerprint, ~fingerprint) of ``buffers``: identical on every rank?"""
    fp = fingerprint(list(buffers))
    row = np.concatenate([fp, np.invert(fp)])
    comm.allreduce_(row, op="max", name="iteravg.posthoc.fp")
    return bool(np.array_equal(row[:2], np.invert(row[2:4])))


# -- sharded averaged state (FSDP2): each rank holds its own pieces -------------------------------
def exchange_pieces(comm: Communicator, table: np.ndarray) -> List[np.ndarray]:
    """Every rank's piece table (``core.partition``): an allgather of the row counts, then of the padded tables.
    Once, when a sharded state is bound; the gathers of snapshots use the tables to place every rank's pieces."""
    if comm.size == 1:
        return [table]
    counts = comm.allgather(np.array([table.shape[0]], dtype=np.int64), name="iteravg.pieces.count")[:, 0]
    width = int(counts.max())
    padded = np.zeros((width, 4), dtype=np.int64)
    padded[: table.shape[0]] = table
    rows = comm.allgather(padded.reshape(-1), name="iteravg.pieces")
    return [rows[r].reshape(width, 4)[: int(counts[r])] for r in range(comm.size)]


def gather_average(comm: Communicator, state: Any, tables: Sequence[np.ndarray],
                   parts: Optional[Callable[[int], Tuple[np.ndarray, np.ndarray]]] = None) -> List[np.ndarray]:
    """The whole averaged model as layout-order host buffers, one per dtype group, on every rank: one allgather per
    group of every rank's sharded part (padded to the longest), placed by the piece tables; the replicated part is
    this rank's own (identical everywhere after a sync). ``parts(g)`` -> (sharded part, replicated part) gathers
    other buffers laid out like the state (the swap cache's training weights). Peak extra memory: one copy of the
    model when the ranks' parts stacked in rank order are the group itself (``sharded=True`` without per-rank
    tensors in the group: the allgather's result is returned, no copy), else two (the allgather's, the assembled)."""
    from .core.partition import assemble_group, stacked_in_order  # noqa: WPS433

    part = state.partition
    out = []
    for g, (dt, n) in enumerate(zip(state.layout.groups, state.layout.group_sizes)):
        own, replicated = parts(g) if parts is not None else (state.shard_host(g), state.replicated_host(g))
        if comm.size == 1:
            shards = [own]
        else:
            sizes = comm.allgather(np.array([own.size], dtype=np.int64), name=f"iteravg.gather.size.{g}")[:, 0]
            width = int(sizes.max())
            row = own
            if own.size != width:  # only ranks whose part is shorter pad a copy
                row = np.zeros(width, dtype=own.dtype)
                row[: own.size] = own
            rows = comm.allgather(row, name=f"iteravg.gather.{g}")
            if stacked_in_order(part, g, tables, width):
                out.append(rows.reshape(-1)[:n])
                continue
            shards = [rows[r][: int(sizes[r])] for r in range(comm.size)]
        full = np.empty(n, dtype=np.dtype(dt))
        assemble_group(part, g, replicated, tables, shards, full)
        out.append(full)
    return out


def check_identical_replicas(comm: Communicator, fp: np.ndarray, epoch: int) -> None:
    """``sharded=True`` keeps one slice of the average per rank, which is only the average of *every* rank's model
    when all ranks train the same model (data parallelism): one allreduce-max of the training parameters'
    fingerprint (and its complement) at each epoch end; every rank raises the same error if they differ."""
    if comm.size == 1:
        return
    row = np.concatenate([fp, np.invert(fp)]).astype(np.int64)
    comm.allreduce_(row, op="max", name="iteravg.replicas")
    if not np.array_equal(row[:2], np.invert(row[2:4])):
        raise CollectiveError(
            f"sharded=True needs data-parallel replicas, but the ranks' training parameters differ at epoch {epoch} "
            "(independent replicas, local SGD, or a missing gradient allreduce / initial broadcast): each rank's "
            "slice would average a different model. Use sharded=False, which averages independent replicas "
            "across ranks.")


def broadcast_groups(comm: Communicator, groups: Optional[List[np.ndarray]], layout: Layout,
                     root: int = 0) -> List[np.ndarray]:
    """Root's whole layout-order host buffers on every rank (others pass None): resume of a sharded state."""
    out = groups if comm.rank == root and groups is not None else \
        [np.empty(n, dtype=np.dtype(dt)) for dt, n in zip(layout.groups, layout.group_sizes)]
    for g, arr in enumerate(out):
        if comm.size > 1:
            comm.broadcast_(arr, root=root, name=f"iteravg.resume.{g}")
    return out


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
        state.flip_lowest_bit()
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
