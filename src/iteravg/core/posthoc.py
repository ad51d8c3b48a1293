"""Post-hoc averaging windows: choose where suffix averaging starts *after* training.

NTA's trigger (and ``Alpha_Suffix``'s fixed share) decide during training from which epoch on the iterates are
averaged; whether another start would have been better cannot be known without training again. EDM2's post-hoc EMA
(Karras et al., 2024) answers that question for EMA lengths from stored profiles; this module answers it for the
uniform (``eta = 0``) suffix average, on one process or many.

What ``Averager(..., posthoc=True)`` keeps:

* ``S``, a float64 running sum of every iterate a triggered schedule could fold, from the first step on, whatever
  the schedule does: every ``step`` iterate and (``epoch_end_folds="every"``, GluonTS's recount) every epoch-end
  iterate; ``N``, how many were summed.
* per epoch ``e``, the *prefix* ``(P_e, N_e)``: what ``S`` held just before the first iterate a run started at
  epoch ``e``'s end folds. The average such a run ends with is then

      posthoc_average(e) = (S - P_e) / (N - N_e)

  -- to within that run's float32 rounding, what an ``Alpha_Suffix`` / NTA run whose trigger fired at epoch ``e``
  produces with ``eta = 0``. ``e = 0`` (``P = 0``) is every iterate from the first batch (``poly`` started up front).

Which iterates a run started at ``e`` folds depends on how its epoch ends fold (``epoch_end_folds``):

==========  ================================================  ===========================================
mode        used by                                            prefix ``P_e``
==========  ================================================  ===========================================
``every``   ``Averager.epoch_end(fold=True)``; the callback    ``S`` before the epoch-end iterate ``x_e`` is
            with ``recount_epoch_end=True`` (GluonTS's)        added (it is added after: GluonTS's recount)
``first``   the callback with ``recount_epoch_end=False``:      ``S - x_e``: only the start epoch's end
            only the start epoch's end is folded               iterate is folded, later ends are not
``none``    ``Averager.epoch_end(fold=False)``                  ``S``
==========  ================================================  ===========================================

Costs: per step one more pass over the model (read the iterate, read and write ``S``: 20 bytes per float32
parameter); memory: 8 bytes per parameter for ``S``, plus on rank 0 the prefixes not yet written to a checkpoint;
disk: ``S`` in every snapshot and one prefix snapshot per epoch (8 bytes per parameter each) in
``<checkpoint dir>/posthoc/``, of which the newest ``posthoc_keep`` are kept.

Distributed: the run's synced average is the mean of the ranks' averages, which for ``eta = 0`` is the uniform
average of the rank-mean iterates; so ``S`` and every ``P_e`` are made the mean over ranks of the per-rank sums at
each epoch end and sync (``collectives.sync_sums``: nothing moves when the ranks hold the same bits, as data-parallel
replicas do, so the post-hoc average is then exactly the single-process one). Prefixes live on rank 0;
``posthoc_average`` is computed there and broadcast.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .. import __version__, checkpoint, collectives
from ..comm import Communicator
from .averaged import FoldPlan, Layout, TensorSpec, fingerprint
from .records import AVERAGED_FILE, averager_record, fingerprint_hex, unflatten_groups
from .sharded_state import too_large
from .tensorfile import TensorFileError, load_tensors, save_tensors

__all__ = ["POSTHOC_FILE", "PREFIX_FILE", "STORE_DIR", "EPOCH_END_FOLDS", "SCHEDULE_KINDS", "PosthocSums",
           "PosthocTracker", "PosthocRun", "check_posthoc", "read_run", "export_average"]

logger = logging.getLogger("iteravg")

#: The running sum ``S`` in every snapshot (float64, keyed by layout name).
POSTHOC_FILE = "posthoc.safetensors"
#: One prefix ``P_e`` (float64, keyed by layout name) in each prefix snapshot.
PREFIX_FILE = "prefix.safetensors"
#: The prefix snapshots' store, next to the checkpoint's snapshots (``<checkpoint dir>/posthoc/prefix-000007``).
STORE_DIR = "posthoc"
EPOCH_END_FOLDS = ("every", "first", "none")
#: Schedules that fold every step once started, with polynomial weights: their suffix average is rebuilt post hoc.
SCHEDULE_KINDS = ("poly", "nta", "alpha_suffix")
_KEEP_ALL = 1 << 40  # write_snapshot's keep when every prefix is kept


def check_posthoc(posthoc: Any, keep: Any, schedule_kind: str, sharded: bool) -> Optional[int]:
    """Validate ``Averager(posthoc=..., posthoc_keep=...)``; returns the keep count (``None``: every epoch)."""
    if not isinstance(posthoc, bool):
        raise ValueError(f"posthoc must be True or False, got {posthoc!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 1):
        raise ValueError(f"posthoc_keep must be None (every epoch) or an integer >= 1, got {keep!r}")
    if posthoc and schedule_kind not in SCHEDULE_KINDS:
        raise ValueError(f"posthoc=True rebuilds suffix averages of every step's iterate, which a {schedule_kind!r} "
                         f"schedule does not make; use it with {', '.join(SCHEDULE_KINDS)} schedules")
    if posthoc and sharded:
        raise ValueError("posthoc=True does not support sharded=True yet (the post-hoc sums are kept whole on every "
                         "rank); pass sharded=False")
    return None if keep is None else int(keep)


class PosthocSums:
    """``S`` and ``N`` of one model (see the module doc): one flat float64 buffer, the layout's dtype groups back to
    back (group ``g`` at ``offsets[g]``, its tensors at their ``layout.offsets`` within it). No communication."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.offsets = [0]
        for n in layout.group_sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.total = np.zeros(self.offsets[-1], dtype=np.float64)
        self.count = 0
        self.refused = 0
        starts = sorted(self._where(spec)[0] for spec in layout.specs)
        #: Tensor boundaries in the flat buffer (what ``collectives.sync_sums`` compares tensor by tensor).
        self.bounds = np.array(starts + [self.total.size], dtype=np.int64)

    def _where(self, spec: TensorSpec) -> Tuple[int, int]:
        g, start = self.layout.offsets[spec.name]
        return self.offsets[g] + start, self.offsets[g] + start + spec.size

    # -- per step ---------------------------------------------------------------------------------
    def add(self, plan: FoldPlan, checked: bool = False) -> bool:
        """``S += x`` (float64) and ``N += 1``; an iterate holding NaN, inf or ``|x| >= 2^emax`` is refused (False)
        unless ``checked`` (the schedule's fold of the same iterate just accepted it)."""
        if not checked and not acceptable(plan):
            self.refused += 1
            return False
        self._combine(plan, self.total, np.add)
        self.count += 1
        return True

    def minus(self, plan: FoldPlan) -> Optional[np.ndarray]:
        """``S - x`` as a new buffer, or ``None`` if ``x`` would be refused."""
        if not acceptable(plan):
            return None
        out = self.total.copy()
        self._combine(plan, out, np.subtract)
        return out

    def _combine(self, plan: FoldPlan, buf: np.ndarray, op: Callable[..., Any]) -> None:
        """``buf op= x`` bucket by bucket: the bucket's tensors gathered into the plan's cache-resident scratch (in
        their dtype), then one mixed-precision ufunc into the float64 run of ``buf``."""
        for g, dt in enumerate(self.layout.groups):
            base, tmp = self.offsets[g], plan.scratch[dt]
            for start, stop, parts in plan.buckets[g]:
                if len(parts) == 1:
                    t = parts[0]
                else:
                    t = tmp[: stop - start]
                    np.concatenate(parts, out=t)
                run = buf[base + start: base + stop]
                op(run, t, out=run)

    # -- whole buffers ----------------------------------------------------------------------------
    def tensors(self, buf: np.ndarray) -> Dict[str, np.ndarray]:
        """name -> float64 view into ``buf`` (a sum or a prefix), for a tensor file."""
        out = {}
        for spec in self.layout.specs:
            a, b = self._where(spec)
            out[spec.name] = buf[a:b].reshape(spec.shape)
        return out

    def flat(self, tensors: Mapping[str, np.ndarray], where: str) -> np.ndarray:
        """The inverse of ``tensors``: a new flat buffer, checking names, shapes and the float64 dtype."""
        missing = [s.name for s in self.layout.specs if s.name not in tensors]
        extra = sorted(set(tensors) - set(self.layout.names))
        if missing or extra:
            raise checkpoint.CheckpointError(f"{where} is for another model: missing {missing[:3]}, unexpected "
                                             f"{extra[:3]}")
        out = np.empty_like(self.total)
        for spec in self.layout.specs:
            arr = np.asarray(tensors[spec.name])
            if tuple(arr.shape) != spec.shape or arr.dtype != np.float64:
                raise checkpoint.CheckpointError(f"{where}: {spec.name!r} is {arr.dtype.name}{tuple(arr.shape)}, "
                                                 f"expected float64{spec.shape}")
            a, b = self._where(spec)
            out[a:b] = arr.reshape(-1)
        return out

    def average(self, prefix: Optional[np.ndarray], prefix_count: int) -> List[np.ndarray]:
        """``(S - P) / (N - N_P)`` per dtype group, rounded once to the model's dtypes (``P = None``: zero)."""
        k = self.count - prefix_count
        if k <= 0:
            raise ValueError("no iterate was summed after that prefix")
        diff = self.total.copy() if prefix is None else np.subtract(self.total, prefix)
        np.multiply(diff, 1.0 / k, out=diff)
        return [diff[self.offsets[g]:self.offsets[g + 1]].astype(dt) for g, dt in enumerate(self.layout.groups)]


def acceptable(plan: FoldPlan) -> bool:
    """Whether an iterate may enter the sums: no NaN, inf or ``|x| >= 2^emax`` (the in-place fold's rule: a sum
    cannot be undone, so a bad value must be caught before it is added). One read of the iterate."""
    return not any(too_large(plan, g) for g in range(len(plan.layout.groups)))


class PosthocTracker:
    """The engine's post-hoc state on one rank: the sums, the prefixes and their store, and the collectives that
    keep them agreed across ranks. ``starts`` (epoch -> ``N_e``) is replicated; prefixes and their snapshot names
    are kept on rank 0 only."""

    def __init__(self, comm: Communicator, keep: Optional[int]) -> None:
        self.comm = comm
        self.keep = keep
        self.sums: Optional[PosthocSums] = None
        self.base_epoch = 0  # the implicit zero prefix: a run averaging from the first batch (0), or since a resume
        self.starts: Dict[int, int] = {}
        self.names: Dict[int, str] = {}  # rank 0: epoch -> prefix snapshot in ``store``
        self.pending: Dict[int, np.ndarray] = {}  # rank 0: prefixes not yet written
        self.store: Optional[Path] = None
        self.dirty = False  # iterates were added since the last sync (per rank; agreed before any sync)
        self._warned = False

    def bind(self, source: Any) -> None:
        if getattr(source, "make_state", None) is not None or not callable(getattr(source, "plan", None)):
            raise ValueError("posthoc=True needs parameters the engine reads as numpy arrays (a mapping of numpy "
                             "arrays, iteravg.mx's networks); this source keeps its tensors elsewhere")
        if self.sums is None:
            self.sums = PosthocSums(source.layout)

    # -- training ---------------------------------------------------------------------------------
    def step(self, source: Any, checked: bool) -> None:
        """One training step's iterate into ``S`` (no communication)."""
        assert self.sums is not None
        if not self.sums.add(source.plan(), checked):
            self._refused()
        self.dirty = True

    def epoch_end(self, source: Any, epoch: int, mode: str) -> None:
        """Record the prefix of ``epoch`` (collective: every rank, each epoch end; see the module doc for ``mode``)."""
        if mode not in EPOCH_END_FOLDS:
            raise ValueError(f"epoch_end_folds must be one of {', '.join(EPOCH_END_FOLDS)}, got {mode!r}")
        s = self.sums
        assert s is not None
        plan = source.plan()
        if mode == "first":
            prefix, count = s.minus(plan), s.count - 1
        else:
            prefix, count = s.total.copy(), s.count
            if mode == "every" and not s.add(plan):
                self._refused()
        ok = prefix is not None
        if prefix is None:  # the same collectives on every rank; the agreed flag drops it below
            prefix = np.zeros_like(s.total)
        with collectives.phase("posthoc epoch end"):
            s.count, count, bad = collectives.sync_sums(self.comm, [s.total, prefix], s.bounds,
                                                        [s.count, count, 0 if ok else 1])
        self.dirty = False
        if bad:
            if self.comm.rank == 0:
                logger.warning("iteravg: epoch %d's end iterate holds NaN or inf (on some rank): no post-hoc average "
                               "can start at epoch %d", epoch, epoch)
            return
        self.starts[int(epoch)] = count
        self.names.pop(int(epoch), None)
        if self.comm.rank == 0:
            self.pending[int(epoch)] = prefix
        if self.keep is not None:
            for old in sorted(self.starts)[:-self.keep]:
                self.starts.pop(old)
                self.pending.pop(old, None)
                self.names.pop(old, None)

    def sync(self) -> None:
        """Make ``S`` the mean over ranks if any rank added iterates since the last sync (collective)."""
        if self.sums is None or self.comm.size == 1:
            self.dirty = False
            return
        if not collectives.any_rank(self.comm, self.dirty):
            return
        with collectives.phase("posthoc sync"):
            self.sums.count = collectives.sync_sums(self.comm, [self.sums.total], self.sums.bounds,
                                                    [self.sums.count])[0]
        self.dirty = False

    def _refused(self) -> None:
        if not self._warned:
            logger.warning("iteravg: an iterate holding NaN or inf was left out of the post-hoc sums (said once; "
                           "such iterates are never averaged)")
            self._warned = True

    # -- what can be rebuilt ----------------------------------------------------------------------
    def available(self) -> List[Tuple[int, int]]:
        """(start epoch, iterates averaged) of every post-hoc average that can be rebuilt, oldest first."""
        if self.sums is None:
            return []
        rows = [(self.base_epoch, self.sums.count)] + [(e, self.sums.count - n) for e, n in sorted(self.starts.items())]
        return [(e, k) for e, k in rows if k > 0]

    def average(self, start_epoch: int) -> Dict[str, np.ndarray]:
        """The average from ``start_epoch``'s end on (collective): rank 0 computes it, every rank receives it."""
        if self.sums is None:
            raise ValueError("posthoc_average: nothing was summed yet (no step or epoch end saw the model)")
        self.sync()
        s = self.sums
        start = int(start_epoch)
        known = dict(self.available())
        if start not in known:
            raise ValueError(f"start_epoch {start_epoch!r} has no post-hoc prefix; the starts kept are "
                             f"{sorted(known)} (posthoc_keep={self.keep})")
        groups = [np.empty(n, dtype=np.dtype(dt)) for dt, n in zip(s.layout.groups, s.layout.group_sizes)]

        def compute() -> None:
            groups[:] = s.average(self._prefix(start), 0 if start == self.base_epoch else self.starts[start])

        with collectives.phase("posthoc_average"):
            collectives.run_on_root(self.comm, compute, f"rebuilding the post-hoc average from epoch {start}")
            collectives.broadcast_arrays(self.comm, groups, name="iteravg.posthoc.average")
        return unflatten_groups(s.layout, groups)

    def _prefix(self, epoch: int) -> Optional[np.ndarray]:
        """Rank 0: prefix ``P_epoch`` from memory or from its snapshot (``None``: the zero prefix)."""
        if epoch == self.base_epoch:
            return None
        if epoch in self.pending:
            return self.pending[epoch]
        if self.store is None or epoch not in self.names:
            raise checkpoint.CheckpointError(f"the post-hoc prefix of epoch {epoch} is neither in memory nor in a "
                                             "checkpoint")
        assert self.sums is not None
        return read_prefix(self.store / self.names[epoch], self.sums, self.starts[epoch])

    # -- snapshots --------------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        """JSON-able progress for the state record: ``N``, the zero prefix's epoch, ``posthoc_keep`` and each kept
        prefix as ``[epoch, N_e, snapshot name]`` (the name is null until a checkpoint wrote it)."""
        return {"count": 0 if self.sums is None else self.sums.count, "base_epoch": self.base_epoch,
                "keep": self.keep, "store": STORE_DIR,
                "prefixes": [[e, n, self.names.get(e)] for e, n in sorted(self.starts.items())]}

    def snapshot(self, checkpoint_dir: Optional[os.PathLike]) -> Tuple[Dict[str, Callable[[Path], None]], Dict[str, Any]]:
        """Rank 0, inside a snapshot write (no collective): publish the pending prefixes into
        ``<checkpoint root>/posthoc/`` (one atomic, immutable snapshot each, the newest ``keep`` kept), then return
        the snapshot's ``posthoc.safetensors`` writer and its record (which names every kept prefix)."""
        if checkpoint_dir is None:
            raise ValueError("a snapshot of an Averager with posthoc=True needs its checkpoint directory "
                             "(snapshot_contents(checkpoint_dir=...)): the per-epoch prefixes are stored next to it")
        s = self.sums
        if s is None:
            return {}, self.state()
        store = checkpoint.checkpoint_root(checkpoint_dir) / STORE_DIR
        elsewhere = {} if self.store is None or _same_dir(self.store, store) else dict(self.names)
        for epoch in sorted(set(self.pending) | set(elsewhere)):
            if epoch in self.pending:
                prefix = self.pending[epoch]
            else:  # saving into another directory than the prefixes live in: copy them over
                assert self.store is not None
                prefix = read_prefix(self.store / elsewhere[epoch], s, self.starts[epoch])
            self.names[epoch] = write_prefix(store, epoch, self.starts[epoch], prefix, s)
            self.pending.pop(epoch, None)
        self.store = store
        for epoch, name in list(self.names.items()):  # gone from the store (removed by hand?): forget it
            if not (store / name / checkpoint.STATE_FILE).is_file():
                self.names.pop(epoch)
                self.starts.pop(epoch, None)
        # The store holds what the index names: older than `keep`, or left by an earlier run in this directory.
        checkpoint.remove_snapshots(store, self.names.values())
        total = s.tensors(s.total)
        files = {POSTHOC_FILE: lambda path: save_tensors(path, total, {"format": "iteravg-posthoc-sum"})}
        return files, self.state()

    def load(self, state: Optional[Dict[str, Any]], snap: Optional[Path], epoch: int) -> None:
        """Restore ``S``, ``N`` and the prefix index from a snapshot (collective; ``snap`` on rank 0). A snapshot
        without post-hoc sums starts them afresh: post-hoc averages can then start at ``epoch`` at the earliest."""
        s = self.sums
        assert s is not None
        self.pending.clear()
        self.names.clear()
        self.starts.clear()
        self.dirty = False
        if state is None:
            if self.comm.rank == 0:
                logger.warning("iteravg: the checkpoint holds no post-hoc sums (written without posthoc=True): "
                               "post-hoc averages start at epoch %d at the earliest", epoch)
            s.total[:] = 0.0
            s.count = 0
            self.base_epoch = int(epoch)
            return

        def read() -> None:
            assert snap is not None
            try:
                s.total[:] = s.flat(load_tensors(snap / POSTHOC_FILE), str(snap / POSTHOC_FILE))
            except TensorFileError as exc:
                raise checkpoint.CheckpointError(str(exc)) from exc

        collectives.run_on_root(self.comm, read, "loading the post-hoc sums")
        collectives.broadcast_arrays(self.comm, [s.total], name="iteravg.posthoc.resume")
        s.count = int(state["count"])
        self.base_epoch = int(state.get("base_epoch", 0))
        for e, n, name in state.get("prefixes", []):
            self.starts[int(e)] = int(n)
            if name is not None and self.comm.rank == 0:
                self.names[int(e)] = str(name)
        self.store = None if snap is None else checkpoint.checkpoint_root(snap) / state.get("store", STORE_DIR)


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def write_prefix(store: Path, epoch: int, count: int, prefix: np.ndarray, sums: PosthocSums) -> str:
    """Publish one prefix as an atomic, immutable snapshot ``store/prefix-NNNNNN``; returns its name. (The tracker
    prunes the store to the prefixes its index names, ``posthoc_keep`` of them at most.)"""
    tensors = sums.tensors(prefix)
    record = {"epoch": int(epoch), "stage": "posthoc_prefix", "iteravg_version": __version__,
              "posthoc_prefix": {"epoch": int(epoch), "count": int(count), "layout": sums.layout.describe()}}
    path = checkpoint.write_snapshot(store, f"prefix-{int(epoch):06d}", record,
                                     {PREFIX_FILE: lambda p: save_tensors(p, tensors, {"format": "iteravg-posthoc-prefix"})},
                                     keep=_KEEP_ALL)
    return path.name


def read_prefix(snap: Path, sums: PosthocSums, count: int) -> np.ndarray:
    """A prefix snapshot, SHA-256 verified and checked against the model and the expected ``N_e``."""
    path, record = checkpoint.read_snapshot(snap)
    info = record.get("posthoc_prefix") or {}
    if int(info.get("count", -1)) != int(count) or info.get("layout") != sums.layout.describe():
        raise checkpoint.CheckpointError(f"{path} is not the post-hoc prefix this checkpoint names (another model or "
                                         "another run)")
    try:
        return sums.flat(load_tensors(path / PREFIX_FILE), str(path / PREFIX_FILE))
    except TensorFileError as exc:
        raise checkpoint.CheckpointError(str(exc)) from exc


# -- reading a finished run, without a model or a framework (``iteravg posthoc``) -------------------------
@dataclass
class PosthocRun:
    """A checkpoint's post-hoc state: every start that can be rebuilt, and the averages themselves."""

    snapshot: Path
    record: Dict[str, Any]
    sums: PosthocSums
    base_epoch: int
    starts: Dict[int, int]
    names: Dict[int, str]
    store: Path
    carried: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def layout(self) -> Layout:
        return self.sums.layout

    @property
    def schedule(self) -> Dict[str, Any]:
        return averager_record(self.record).get("schedule", {})

    @property
    def schedule_start(self) -> Optional[int]:
        """The epoch the run's own schedule started averaging after (``None`` if it never did)."""
        te = self.schedule.get("trigger_epoch")
        return None if te is None or not self.schedule.get("averaging_started") else int(te)

    @property
    def epochs(self) -> int:
        return int(self.record.get("epoch", 0))

    def candidates(self) -> List[Tuple[int, int]]:
        """(start epoch, iterates averaged) of every start that holds at least one iterate, oldest first."""
        rows = [(self.base_epoch, self.sums.count)] + [(e, self.sums.count - n) for e, n in sorted(self.starts.items())]
        return [(e, k) for e, k in rows if k > 0]

    def average(self, start_epoch: int) -> Dict[str, np.ndarray]:
        """name -> array (the model's dtypes): the uniform average from ``start_epoch``'s end on."""
        start = int(start_epoch)
        known = dict(self.candidates())
        if start not in known:
            raise ValueError(f"no post-hoc average starts at epoch {start}; the starts kept are {sorted(known)}")
        prefix = None if start == self.base_epoch else read_prefix(self.store / self.names[start], self.sums,
                                                                    self.starts[start])
        count = 0 if start == self.base_epoch else self.starts[start]
        return unflatten_groups(self.layout, self.sums.average(prefix, count))


def read_run(checkpoint_dir: os.PathLike) -> PosthocRun:
    """The newest snapshot's post-hoc state (verified), or ``CheckpointError`` naming what is missing."""
    snap, record = checkpoint.read_snapshot(checkpoint_dir)
    state = averager_record(record)
    ph = state.get("posthoc")
    if not ph:
        raise checkpoint.CheckpointError(f"{snap} holds no post-hoc sums: the run was trained without posthoc=True "
                                         "(iteravg train --posthoc)")
    layout = Layout(tuple(TensorSpec(n, tuple(shape), dt) for n, shape, dt in state.get("layout") or []))
    sums = PosthocSums(layout)
    try:
        sums.total[:] = sums.flat(load_tensors(snap / POSTHOC_FILE), str(snap / POSTHOC_FILE))
        carried = {}
        if state.get("carried") and (snap / AVERAGED_FILE).is_file():
            averaged = load_tensors(snap / AVERAGED_FILE)
            carried = {k: averaged[k] for k in state["carried"] if k in averaged}
    except TensorFileError as exc:
        raise checkpoint.CheckpointError(str(exc)) from exc
    sums.count = int(ph["count"])
    starts, names = {}, {}
    for e, n, name in ph.get("prefixes", []):
        if name is not None:
            starts[int(e)], names[int(e)] = int(n), str(name)
    store = checkpoint.checkpoint_root(snap) / ph.get("store", STORE_DIR)
    return PosthocRun(snap, record, sums, int(ph.get("base_epoch", 0)), starts, names, store, carried)


def export_average(run: PosthocRun, start_epoch: int, out: os.PathLike,
                   extra_files: Optional[Callable[[Dict[str, np.ndarray]], Dict[str, Callable[[Path], None]]]] = None
                   ) -> Path:
    """Write the post-hoc average from ``start_epoch`` as a snapshot ``out/posthoc-NNNNNN`` that the engine's readers
    (``iteravg inspect``, ``Averager.load``) accept: ``averaged.safetensors`` plus ``extra_files(average)`` (the
    MXNet face adds ``averaged.params``). Its schedule record says the average started at ``start_epoch``."""
    averaged = run.average(start_epoch)
    iterates = dict(run.candidates())[int(start_epoch)]
    src = averager_record(run.record)
    schedule = dict(src.get("schedule", {}), averaging_started=True, trigger_epoch=int(start_epoch),
                    average_counter=int(iterates))
    flat = [np.concatenate([averaged[s.name].reshape(-1) for s in run.layout.specs
                            if run.layout.offsets[s.name][0] == g] or [np.zeros(0, dt)]).astype(dt)
            for g, dt in enumerate(run.layout.groups)]
    averager = {"schedule": schedule, "refused_nonfinite": 0, "has_average": True,
                "epochs_done": src.get("epochs_done", run.epochs), "layout": run.layout.describe(),
                "fingerprint": fingerprint_hex(fingerprint(flat))}
    if run.carried:
        averager["carried"] = sorted(run.carried)
    contents = dict(averaged, **run.carried)
    files: Dict[str, Callable[[Path], None]] = {
        AVERAGED_FILE: lambda path: save_tensors(path, contents, {"format": "iteravg-averaged"})}
    files.update(extra_files(averaged) if extra_files is not None else {})
    record = {"averager": averager, "iteravg_version": __version__, "epoch": run.epochs, "stage": "posthoc",
              "world_size": run.record.get("world_size"), "comm": run.record.get("comm"),
              "posthoc_export": {"start_epoch": int(start_epoch), "iterates": int(iterates),
                                 "source": str(run.snapshot)}}
    return checkpoint.write_snapshot(out, f"posthoc-{int(start_epoch):06d}", record, files, keep=_KEEP_ALL)


def describe(snap: Path, state: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """For ``iteravg inspect``: the post-hoc starts a snapshot names, and any prefix snapshot that does not verify."""
    ph = state.get("posthoc")
    if not ph:
        return {}, []
    store = checkpoint.checkpoint_root(snap) / ph.get("store", STORE_DIR)
    problems = []
    starts = [int(ph.get("base_epoch", 0))]
    for e, _n, name in ph.get("prefixes", []):
        if name is None:
            continue
        try:
            checkpoint.read_snapshot(store / name)
            starts.append(int(e))
        except checkpoint.CheckpointError as exc:
            problems.append(f"post-hoc prefix of epoch {e}: {exc}")
    return {"posthoc_starts": starts, "posthoc_iterates": int(ph.get("count", 0))}, problems

