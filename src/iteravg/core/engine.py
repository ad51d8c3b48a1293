"""``Averager``: the framework-neutral averaging engine. Every framework's face (``iteravg.mx``, a future
``iteravg.torch``) is a thin translation onto it; numpy users call it directly.

It owns four things and every decision that involves them:

* a **schedule** (``core.schedules``): when averaging starts and with which weight;
* the **averaged state** (``core.averaged``): flat per-dtype buffers folded in place;
* the **communicator** (``iteravg.comm``): which collectives run, always through ``iteravg.collectives``;
* the **swap cache**: the training weights saved while the averaged ones are loaded for evaluation.

Distributed rules it enforces: a fold needs no communication; every collective is issued at a point all ranks
reach alike (epoch end, a swap, ``sync``, ``save``, ``load``), and whether a sync runs is agreed first (one
tiny allreduce), so per-rank step counts never decide it; a per-rank failure (a file rank 0 could not write)
is agreed, so every rank raises the same error.

Usage with numpy views of any framework's parameters::

    import iteravg
    avg = iteravg.Averager(iteravg.NTASchedule(epochs=10, n=5))      # comm=None: detect horovodrun / mpirun
    for epoch in range(10):
        for batch in batches:
            ...                                     # update params (name -> numpy array) in place
            avg.step(params)                        # fold if averaging has started; no communication
        avg.epoch_end(params, metric=val_loss, epoch=epoch + 1)  # agreed trigger, epoch-end fold, sync
    averaged = avg.averaged()                       # name -> numpy array, bitwise identical on every rank
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from .. import __version__, checkpoint, collectives
from ..saving import SaveErrors
from ..comm import Communicator, resolve_comm
from .averaged import Allocator, AveragedState, Layout, fingerprint, numpy_allocator
from .records import (AVERAGED_FILE, LegacyReader, averager_record, describe_snapshot, fingerprint_hex,
                      first_layout_difference, flatten_tensors, read_averaged, unflatten_groups)
from .partition import Partition, equal_slices
from .posthoc import PosthocTracker, check_posthoc
from .schedules import Schedule
from .sharded_state import ShardedState
from .sources import ArraySource, Params, ParamSource
from .tensorfile import save_tensors

__all__ = ["Averager", "ParamSource", "ArraySource", "AVERAGED_FILE", "SYNC_MODES", "describe_snapshot", "fingerprint_hex"]

logger = logging.getLogger("iteravg")

SYNC_MODES = ("mean", "broadcast")


class Averager:
    """Iterate averaging of one model, on one or many ranks.

    Parameters
    ----------
    schedule
        When to start and with which weight: ``NTASchedule``, ``AlphaSuffixSchedule``, ``EMASchedule``,
        ``Schedule`` (polynomial decay; set ``averaging_started``), optionally wrapped in ``EveryNSteps``.
    comm
        ``None`` (detect ``horovodrun`` / ``mpirun``, else one process), ``"horovod"``, ``"mpi"``, ``"local"``
        or a communicator object.
    metric_reduce
        How per-rank metrics become the one every trigger decision uses: ``"mean"`` of the finite values,
        ``"min"``, ``"max"``, ``"rank0"``.
    sync
        ``"mean"``: the averaged models of all ranks are allreduce-averaged; ``"broadcast"``: rank 0's wins.
    sync_every_batches
        Also sync after every k folds (0: only at epoch end, swaps and saves). The intermediate syncs are
        collectives counted per rank: every rank must fold equally often (the watchdog ends a job that breaks it).
    sharded
        Data-parallel training (every rank holds the same iterate): each rank folds and stores only an equal slice of
        the average (1/N of the model), with no communication per step; swaps, ``averaged()``, ``finalize`` and
        snapshots gather it (collective). Per-rank statistics (a source's non-shardable tensors, e.g. BatchNorm's
        running means) stay whole and are averaged across ranks at each sync. At every epoch end the ranks check that
        their training parameters are identical; independent replicas (local SGD) are refused with an error.
    alloc
        Who owns the averaged buffers' memory (the MXNet face passes NDArray-backed buffers, so Horovod reduces
        them in place).
    posthoc
        Also keep what rebuilds, after training, the uniform average from any epoch's end on (``posthoc_average``,
        ``core.posthoc``): a float64 running sum of every step's and epoch end's iterate (one more pass over the model
        per step, 8 bytes per parameter of memory) and a prefix per epoch, written next to the snapshots (8 bytes
        per parameter per epoch). ``poly``, ``nta`` and ``alpha_suffix`` schedules; every rank must call ``step``
        equally often.
    posthoc_keep
        How many per-epoch prefixes (the newest) are kept, on disk and in memory; ``None``: every epoch's.
    """

    def __init__(
        self,
        schedule: Schedule,
        comm: Union[None, str, Communicator] = None,
        *,
        metric_reduce: str = "mean",
        sync: str = "mean",
        sync_every_batches: int = 0,
        sharded: bool = False,
        alloc: Allocator = numpy_allocator,
        posthoc: bool = False,
        posthoc_keep: Optional[int] = None,
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be an iteravg schedule (NTASchedule, EMASchedule, ...), got {schedule!r}")
        if metric_reduce not in collectives.METRIC_REDUCTIONS:
            raise ValueError(
                f"metric_reduce must be one of {', '.join(collectives.METRIC_REDUCTIONS)}, got {metric_reduce!r}"
            )
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be 'mean' or 'broadcast', got {sync!r}")
        if isinstance(sync_every_batches, bool) or not isinstance(sync_every_batches, (int, np.integer)) \
                or sync_every_batches < 0:
            raise ValueError(f"sync_every_batches must be an integer >= 0, got {sync_every_batches!r}")
        if not isinstance(sharded, bool):
            raise ValueError(f"sharded must be True or False, got {sharded!r}")
        keep = check_posthoc(posthoc, posthoc_keep, schedule.kind, sharded)
        self.schedule = schedule
        self.comm: Communicator = resolve_comm(comm)
        self.sharded = sharded
        self.metric_reduce = metric_reduce
        self.sync_mode = sync
        self.sync_every_batches = int(sync_every_batches)
        self._alloc = alloc
        self._source: Optional[ParamSource] = None
        self._state: Optional[AveragedState] = None
        self._layout_checked = False
        self._has_average = False  # the buffers hold an average (False again after ``reset``)
        self._cache: Optional[List[Tuple[np.ndarray, Any]]] = None
        self._tables: List[np.ndarray] = []  # every rank's pieces, for a sharded state
        self._shardable: List[bool] = []  # per layout tensor: the same on every data-parallel rank
        self._dirty = False  # a fold was attempted since the last sync
        self._since_sync = 0
        self._epochs_done = 0
        self._posthoc: Optional[PosthocTracker] = PosthocTracker(self.comm, keep) if posthoc else None
        self._save_errors = SaveErrors()  # on_save_error="warn": a run of failed snapshots is said once

    # -- what users read -------------------------------------------------------------------------
    @property
    def layout(self) -> Optional[Layout]:
        return None if self._state is None else self._state.layout

    @property
    def state(self) -> Optional[AveragedState]:
        """The flat averaged buffers (``None`` until the first fold or swap binds a model)."""
        return self._state

    @property
    def has_average(self) -> bool:
        return self._state is not None and self._has_average

    @property
    def average_counter(self) -> int:
        return self.schedule.average_counter

    @property
    def averaging_started(self) -> bool:
        return self.schedule.averaging_started

    @property
    def refused_nonfinite(self) -> int:
        return 0 if self._state is None else self._state.refused_nonfinite

    def averaged(self) -> Optional[Dict[str, np.ndarray]]:
        """name -> host array of the averaged tensor, or ``None`` before anything was averaged. numpy state: a
        zero-copy view (valid until the next fold; ``.copy()`` to keep); torch state: a host copy. After ``sync``
        (or ``epoch_end``) identical on every rank. A sharded state (FSDP2) is gathered: collective, call it on every
        rank alike."""
        if not self.has_average:
            return None
        assert self._state is not None
        if self._state.partitioned:
            return unflatten_groups(self._state.layout, collectives.gather_average(self.comm, self._state,
                                                                                   self._tables))
        return self._state.host_tensors()

    # -- binding a model -------------------------------------------------------------------------
    def bind(self, params: Params) -> ParamSource:
        """The source for ``params``; the first bind checks (collectively) that all ranks hold the same model."""
        src = self._as_source(params)
        if src is self._source:
            return src
        if not self._layout_checked:
            collectives.check_same_layout(self.comm, src.layout)
            self._layout_checked = True
        if self._state is None:
            self._state = self._make_state(src)
            if self._state.partitioned:  # sharded: every rank learns where the others' pieces are
                self._tables = collectives.exchange_pieces(self.comm, self._state.partition.table())
            if self._posthoc is not None:
                self._posthoc.bind(src)
        elif src.layout != self._state.layout:
            raise ValueError(
                "the model's parameters changed (names, shapes or dtypes) since averaging began; an Averager "
                "follows one model -- create a new one for a new model"
            )
        self._source = src
        return src

    def _make_state(self, src: ParamSource) -> Any:
        """The averaged state for ``src``: where its tensors live (numpy or torch) and, with ``sharded=True`` on
        several ranks, only this rank's equal slice of the shardable tensors (``core.partition.equal_slices``)."""
        pieces = None
        self._shardable = list(getattr(src, "shardable", None) or [True] * len(src.layout.specs))
        if self.sharded and self.comm.size > 1:
            pieces = equal_slices(src.layout, self._shardable, self.comm.rank, self.comm.size)
        make_state = getattr(src, "make_state", None)  # a source whose tensors live elsewhere (torch, CUDA)
        if make_state is not None:
            return make_state() if pieces is None else make_state(pieces=pieces)
        if pieces is not None:
            return ShardedState(src.layout, Partition(src.layout, pieces, model_sharded=False), alloc=self._alloc)
        return AveragedState(src.layout, alloc=self._alloc)

    def _as_source(self, params: Params) -> ParamSource:
        current = self._source
        if isinstance(params, Mapping):
            if isinstance(current, ArraySource) and current.same_arrays(params):
                return current
            return ArraySource(params)
        if all(hasattr(params, a) for a in ("layout", "read", "write", "fold_weight")):
            return params
        raise ValueError(f"params must be a mapping of name -> numpy array or a ParamSource, got {params!r}")

    # -- the per-step path (no communication) ----------------------------------------------------
    def step(self, params: Params) -> bool:
        """Call after every optimizer step: folds the iterate if the schedule says so. Returns whether it folded.
        With ``posthoc=True`` the iterate also enters the post-hoc sum (checked for NaN/inf unless the fold did)."""
        if not self.schedule.should_fold():
            if self._posthoc is not None:
                self._posthoc.step(self.bind(params), checked=False)
            return False
        folded = self.fold(params)
        if self._posthoc is not None and folded:
            self._posthoc.step(self.bind(params), checked=True)
        return folded

    def fold(self, params: Params) -> bool:
        """Fold the current iterate now, whatever the step cadence (GluonTS's ``update_average``).

        The first iterate is copied, later ones weighted by the schedule. An iterate holding a NaN or inf is
        refused (average and counter unchanged, a warning logged): one diverged step must not poison the
        average. Returns whether the iterate was folded.
        """
        src = self.bind(params)
        assert self._state is not None
        alpha = src.fold_weight(self.schedule.peek_weight()) if self._has_average else 1.0
        result = self._state.fold_source(src, alpha)
        # Sync bookkeeping counts attempts, not successful folds: it must not depend on a rank's NaNs.
        self._dirty = True
        self._since_sync += 1
        if result.folded:
            self.schedule.next_weight()
            self._has_average = True
        else:
            logger.warning("iteravg: the model holds NaN or inf values; this iterate was not folded into the "
                           "average (refused so far: %d)", self._state.refused_nonfinite)
        if self.sync_every_batches and self._since_sync >= self.sync_every_batches:
            self.sync()
        return result.folded

    def reset(self) -> None:
        """Forget the average (the next fold copies the iterate); counters and trigger state are kept, as when a
        GluonTS user sets ``averaged_model = None``."""
        self._has_average = False

    # -- epoch-level decisions (collective) ------------------------------------------------------
    def update_trigger(self, metric: Any = None, epoch: Optional[int] = None) -> bool:
        """Decide whether averaging starts, on a metric reduced across ranks (so all ranks decide alike)."""
        epoch = self._epochs_done if epoch is None else int(epoch)
        if self.schedule.needs_metric(epoch):
            with collectives.phase("update_trigger"):
                metric = collectives.consensus_metric(self.comm, metric, self.metric_reduce)
        return self.schedule.update_trigger(metric, epoch)

    def epoch_end(self, params: Params, metric: Any = None, epoch: Optional[int] = None, *, fold: bool = True) -> bool:
        """End of an epoch on every rank: the agreed trigger decision, the epoch-end fold (``fold=True``, once
        averaging runs) and a sync. ``epoch`` defaults to the number of ``epoch_end`` calls so far. Returns
        whether averaging has started."""
        self._epochs_done = self._epochs_done + 1 if epoch is None else int(epoch)
        self.bind(params)  # the first epoch end checks that all ranks hold the same model, averaging or not
        self.update_trigger(metric, self._epochs_done)
        folded = fold and self.schedule.averaging_started  # replicated: the trigger was agreed
        if folded:
            self.fold(params)
        if self._posthoc is not None:
            self.posthoc_epoch_end(params, self._epochs_done, epoch_end_folds="every" if fold else "none")
        self.sync(all_ranks_folded=folded)
        if self._gathers:  # sharded=True is only right if every rank folded the same iterates
            assert self._state is not None and self._source is not None
            collectives.check_identical_replicas(
                self.comm, self._state.params_fingerprint(self._source, self._shardable), self._epochs_done)
        return self.schedule.averaging_started

    def sync(self, *, all_ranks_folded: bool = False) -> None:
        """Make the averaged model bitwise identical on every rank (collective; call on all ranks alike).

        Whether anything needs syncing is agreed first (one tiny allreduce), so a rank that folded less often
        still takes part; unchanged buffers are not re-synced (a mean over 3 ranks can change the last bit).
        ``all_ranks_folded=True`` skips that round trip: pass it only right after a fold that every rank made at
        the same point (the epoch-end fold once averaging runs), where the answer is known to be yes everywhere.
        """
        with collectives.phase("sync"):
            if self._posthoc is not None:
                self._posthoc.sync()
            if not all_ranks_folded and not collectives.any_rank(self.comm, self._dirty):
                return
            if self._state is None:
                raise collectives.CollectiveError(
                    f"rank {self.comm.rank} has no averaged state while another rank folded iterates: every rank "
                    "must fold the same model at the same points (bind it with step/fold on all ranks)")
            self.schedule.average_counter = collectives.sync_average(
                self.comm, self._state, self.schedule.average_counter if self._has_average else 0,
                mode=self.sync_mode)
            self._has_average = self.schedule.average_counter > 0
            self._dirty = False
            self._since_sync = 0

    # -- post-hoc averaging windows (``posthoc=True``, ``core.posthoc``) --------------------------
    @property
    def posthoc(self) -> bool:
        return self._posthoc is not None

    @property
    def posthoc_keep(self) -> Optional[int]:
        return None if self._posthoc is None else self._posthoc.keep

    def posthoc_epoch_end(self, params: Params, epoch: int, *, epoch_end_folds: str = "every") -> None:
        """Record epoch ``epoch``'s prefix (collective; ``epoch_end`` calls it). ``epoch_end_folds`` says which
        epoch-end iterates a run started there folds: ``"every"`` (GluonTS's recount), ``"first"`` (only the start
        epoch's: ``recount_epoch_end=False``), ``"none"`` (``epoch_end(fold=False)``)."""
        if self._posthoc is None:
            raise ValueError("posthoc_epoch_end needs Averager(..., posthoc=True)")
        self._posthoc.epoch_end(self.bind(params), int(epoch), epoch_end_folds)

    def posthoc_starts(self) -> List[Tuple[int, int]]:
        """(start epoch, iterates averaged) of every post-hoc average ``posthoc_average`` can rebuild."""
        return [] if self._posthoc is None else self._posthoc.available()

    def posthoc_average(self, start_epoch: int) -> Dict[str, np.ndarray]:
        """The uniform average of the iterates from epoch ``start_epoch``'s end on (``0``: from the first batch) --
        what an ``AlphaSuffixSchedule`` / ``NTASchedule`` run (``eta=0``) whose trigger fired at that epoch ends
        with, to within its float32 rounding. name -> array in the parameters' dtypes, identical on every rank.
        Collective: call on every rank."""
        if self._posthoc is None:
            raise ValueError("posthoc_average needs Averager(..., posthoc=True)")
        return self._posthoc.average(start_epoch)

    # -- swapping the averaged weights in and out ------------------------------------------------
    def load_averaged(self, params: Params, *, sync: bool = True) -> bool:
        """Save the training weights, then put the averaged weights into ``params`` (evaluation, train end).

        ``sync=True`` (default) syncs first, so every rank evaluates the same weights: call it on every rank.
        ``sync=False`` issues no collective and loads this rank's average as of the last sync (plus its own folds
        since): use it when only some ranks evaluate (``if rank == 0: validate()``). Returns False, changing
        nothing, when there is no average yet.
        """
        if self._gathers and not sync:
            raise ValueError("load_averaged(sync=False) cannot work with sharded=True: each rank holds only its "
                             "slice of the average, and gathering it is collective -- swap on every rank "
                             "(sync=True), or average unsharded to validate on some ranks only")
        if sync:
            self.sync()
        if not self.has_average:
            return False
        src = self.bind(params)
        state = self._state
        assert state is not None
        if self._cache is None:
            self._cache = state.new_buffers()
        state.read_params(src, self._cache)  # sharded: this rank's slice of the training weights only
        if self._gathers:
            state.write_full(src, collectives.gather_average(self.comm, state, self._tables))
        else:
            state.write_params(src)
        return True

    def restore_training(self, params: Params, *, release: bool = False) -> bool:
        """Put back the training weights saved by the last ``load_averaged`` (no-op, False, if none were saved).
        ``release=True`` frees the copy that held them (``swapped`` does). Sharded (``sharded=True``): the ranks'
        slices of the training weights are gathered back -- collective, like the swap in."""
        if self._cache is None or self._state is None:
            return False
        state, cache = self._state, self._cache
        if self._gathers:
            full = collectives.gather_average(self.comm, state, self._tables,
                                              parts=lambda g: state.buffer_parts(cache, g))
            state.write_full(self.bind(params), full)
        else:
            state.write_params(self.bind(params), cache)
        if release:
            self._cache = None
        return True

    @property
    def _gathers(self) -> bool:
        """Whether swaps gather the average: the state is sharded but the model is not (``sharded=True``)."""
        state = self._state
        return state is not None and state.partitioned and not state.partition.model_sharded

    def cached(self) -> Optional[List[Tuple[np.ndarray, Any]]]:
        """The swap cache: per dtype group, (flat training weights, framework handle), or ``None``."""
        return self._cache

    def drop_cache(self) -> None:
        self._cache = None

    @contextlib.contextmanager
    def swapped(self, params: Params, *, sync: bool = True) -> Iterator[bool]:
        """``with avg.swapped(params): evaluate()`` -- averaged weights inside, training weights restored on exit
        even if the body raises. Yields whether an average was loaded."""
        loaded = self.load_averaged(params, sync=sync)
        try:
            yield loaded
        finally:
            if loaded:
                self.restore_training(params, release=True)

    def finalize(self, params: Params) -> bool:
        """Train end on every rank: load the synced average into ``params``; without one, make every rank hold
        rank 0's weights (and say so), so no rank ends on a different or NaN-holding network unnoticed.
        Returns whether the average was loaded."""
        with collectives.phase("finalize"):
            if self.load_averaged(params):
                return True
            src = self.bind(params)
            state = self._state
            assert state is not None
            if self.comm.rank != 0:
                pass  # said once, by rank 0
            elif self.refused_nonfinite or self.schedule.averaging_started:
                logger.warning(
                    "iteravg: no iterate could be averaged (%d refused because they held NaN or inf); the model is "
                    "%s", self.refused_nonfinite,
                    "rank 0's last iterate, on every rank" if self.comm.size > 1 else "the last iterate")
            else:
                logger.info("iteravg: averaging never started; the model is the last iterate")
            if self.comm.size > 1 and self._gathers:  # a replicated model: rank 0's whole weights everywhere
                full = state.read_full(src, state.layout)
                collectives.broadcast_arrays(self.comm, full, name="iteravg.final_weights")
                state.write_full(src, full)
            elif self.comm.size > 1:
                bufs = state.new_buffers()
                state.read_params(src, bufs)
                shared = [state.replicated_part(b, g) for g, b in enumerate(bufs)]  # never another rank's shard
                collectives.broadcast_arrays(self.comm, [b[0] for b in shared], [b[1] for b in shared],
                                             name="iteravg.final_weights")
                state.write_params(src, bufs)
            return False

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Replicated progress as JSON-able data (schedule, counters, layout, fingerprint); tensors: ``averaged()``."""
        out: Dict[str, Any] = {
            "schedule": self.schedule.state_dict(),
            "refused_nonfinite": self.refused_nonfinite,
            "has_average": self.has_average,
            "epochs_done": self._epochs_done,
        }
        if self._state is not None:
            out["layout"] = self._state.layout.describe()
        if self.has_average:
            assert self._state is not None
            if not self._state.partitioned:  # a sharded state's fingerprint needs the gathered whole (snapshots)
                out["fingerprint"] = fingerprint_hex(self._state.fingerprint())
        if self._posthoc is not None:
            out["posthoc"] = self._posthoc.state()
        return out

    def load_state_dict(self, state: Dict[str, Any], tensors: Optional[Mapping[str, np.ndarray]] = None,
                        params: Optional[Params] = None) -> List[Tuple[str, Any, Any]]:
        """Restore progress (this rank only; ``load`` is the collective form). The resume rule: the schedule's
        constructor arguments win, the state supplies progress; returns the differing arguments (each warned
        about). ``tensors`` (layout name -> array) restore the average; they need a bound model or ``params``."""
        diffs = self.schedule.load_state_dict(state["schedule"])
        for arg, old, new in diffs if self.comm.rank == 0 else ():  # every rank applies it, rank 0 says it
            logger.warning("iteravg: resuming with %s=%r; the checkpoint was written with %s=%r (the constructor's "
                           "value is used)", arg, new, arg, old)
        self._epochs_done = int(state.get("epochs_done", 0))
        if params is not None:
            self.bind(params)
        if tensors is not None:
            if self._state is None:
                raise ValueError("load_state_dict(tensors=...) needs the model: pass params= or bind it first")
            self._state.load_flat(flatten_tensors(self._state.layout, tensors, "the state's tensors"))
        self._has_average = bool(state.get("has_average")) and (tensors is not None or self._has_average)
        if self._state is not None:
            self._state.refused_nonfinite = int(state.get("refused_nonfinite", 0))
        self._dirty = False
        self._since_sync = 0
        return diffs

    # -- snapshots: rank 0 writes, every rank loads ----------------------------------------------
    def snapshot_contents(self, averaged: Optional[Dict[str, np.ndarray]] = None,
                          groups: Optional[List[np.ndarray]] = None, *,
                          checkpoint_dir: Optional[os.PathLike] = None
                          ) -> Tuple[Dict[str, Callable[[Path], None]], Dict[str, Any]]:
        """(files, state record) of this averager for a snapshot; no collective (rank 0 calls it, synced).
        ``averaged`` is the host average when the caller already has it (a sharded state's gathered whole), and
        ``groups`` the same as layout-order flat buffers (fingerprinted as they are, not flattened into a copy).
        ``checkpoint_dir`` (needed with ``posthoc=True``): where the snapshot goes; the post-hoc prefixes not yet
        written are published next to it first (``<dir>/posthoc/``)."""
        files: Dict[str, Callable[[Path], None]] = {}
        record = self.state_dict()
        if self._posthoc is not None:
            files, record["posthoc"] = self._posthoc.snapshot(checkpoint_dir)
        if averaged is None and self.has_average and self._state.partitioned:
            raise RuntimeError("snapshot_contents() of a sharded average needs the gathered average: gather it on "
                               "every rank first (averaged(), collective) and pass it in")
        averaged = self.averaged() if averaged is None else averaged
        if averaged is not None:
            carried = self._carried()
            if carried:  # non-averaged entries (BatchNorm's counters), so the file loads into the model strictly
                record["carried"] = sorted(carried)
            contents = dict(averaged, **carried)
            files[AVERAGED_FILE] = lambda path: save_tensors(path, contents, {"format": "iteravg-averaged"})
            if "fingerprint" not in record:
                if groups is None:
                    groups = flatten_tensors(self._state.layout, averaged, "the average")
                record["fingerprint"] = fingerprint_hex(fingerprint(groups))
        return files, {"averager": record, "iteravg_version": __version__}

    def _carried(self) -> Dict[str, np.ndarray]:
        carried = getattr(self._source, "carried_host", None)
        return carried() if carried is not None else {}

    def save(self, checkpoint_dir: os.PathLike, *, epoch: Optional[int] = None, stage: str = "manual",
             extra_files: Optional[Dict[str, Callable[[Path], None]]] = None,
             extra_state: Optional[Dict[str, Any]] = None, keep: int = 2,
             averaged: Optional[Dict[str, np.ndarray]] = None, on_save_error: str = "raise") -> Optional[Path]:
        """Sync, then rank 0 writes an atomic, immutable snapshot (collective: call on every rank). A failed write
        raises the same error on every rank at once -- or, with ``on_save_error="warn"`` and a storage failure (disk
        full, read-only, ...), is logged once by rank 0 and returns None on every rank (``iteravg.saving``).
        Returns the snapshot path on rank 0, None elsewhere. ``averaged``: the synced, gathered average if the
        caller already gathered it (a sharded state)."""
        epoch = self._epochs_done if epoch is None else int(epoch)
        with collectives.phase(f"save ({stage})"):
            self.sync()
            groups = None  # a sharded state's gathered whole, as layout-order buffers
            gathered = averaged
            if gathered is None and self.has_average and self._state is not None and self._state.partitioned:
                groups = collectives.gather_average(self.comm, self._state, self._tables)
                gathered = unflatten_groups(self._state.layout, groups)

            def write() -> Path:
                files, record = self.snapshot_contents(gathered, groups, checkpoint_dir=checkpoint_dir)
                files.update(extra_files or {})
                record.update(epoch=epoch, stage=stage, world_size=self.comm.size, comm=self.comm.name,
                              extra=dict(extra_state or {}))
                return checkpoint.write_snapshot(checkpoint_dir, f"epoch-{epoch:06d}", record, files, keep=keep)

            return self._save_errors.run(self.comm, write, f"writing the checkpoint to {os.fspath(checkpoint_dir)}",
                                         on_save_error)[1]

    def load(self, checkpoint_dir: os.PathLike, params: Params, *,
             legacy_reader: Optional[LegacyReader] = None) -> Dict[str, Any]:
        """Restore the average and progress from a snapshot on every rank (collective, any number of ranks):
        rank 0 reads and verifies, then broadcasts. Raises ``CheckpointError`` on every rank if the snapshot is
        missing, corrupted or for another model. Returns the snapshot's state record."""
        with collectives.phase("load"):
            found: Dict[str, Any] = {}

            def read() -> Dict[str, Any]:
                snap, record = checkpoint.read_snapshot(checkpoint_dir)
                found["snap"], found["record"] = snap, record
                return record

            record = collectives.broadcast_json(
                self.comm, collectives.run_on_root(self.comm, read, "reading the checkpoint"))
            src = self.bind(params)
            assert self._state is not None
            state = averager_record(record, f"checkpoint {os.fspath(checkpoint_dir)}")
            if state.get("layout") is not None and state["layout"] != src.layout.describe():
                raise checkpoint.CheckpointError(
                    f"checkpoint {os.fspath(checkpoint_dir)} is for another model: "
                    f"{first_layout_difference(state['layout'], src.layout.describe())}")
            try:
                self.load_state_dict(state)
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
                raise checkpoint.CheckpointError(f"checkpoint {os.fspath(checkpoint_dir)}: {exc}") from exc
            if state.get("has_average"):
                live = self._state
                groups: List[Optional[List[np.ndarray]]] = [None]

                def read_tensors() -> None:
                    snap, rec = found["snap"], found["record"]
                    tensors = read_averaged(snap, rec, legacy_reader)  # only a file the record lists and verifies
                    for name in state.get("carried", ()):  # written for strict loads, never averaged
                        tensors.pop(name, None)
                    flat = flatten_tensors(live.layout, tensors, str(snap))
                    if state.get("fingerprint") and fingerprint_hex(fingerprint(flat)) != state["fingerprint"]:
                        raise checkpoint.CheckpointError(f"{snap}: the averaged model does not match the fingerprint "
                                                         "in its state record")
                    groups[0] = flat

                collectives.run_on_root(self.comm, read_tensors, "loading the averaged model")
                if live.partitioned:  # every rank keeps its own pieces of the whole
                    live.load_flat(collectives.broadcast_groups(self.comm, groups[0], live.layout))
                else:
                    if groups[0] is not None:
                        live.load_flat(groups[0])
                    collectives.broadcast_average(self.comm, live)
                self._has_average = True
            if self._posthoc is not None:
                self._posthoc.load(state.get("posthoc"), found.get("snap"),
                                   int(record.get("epoch", state.get("epochs_done", 0)) or 0))
            return record
