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
from .averaged import Allocator, AveragedState, Layout, numpy_allocator
from .records import (AVERAGED_FILE, LegacyReader, averager_record, describe_snapshot, fingerprint_hex,
                      first_layout_difference, flatten_tensors, read_averaged)
from .schedules import Schedule
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
    alloc
        Who owns the averaged buffers' memory (the MXNet face passes NDArray-backed buffers, so Horovod reduces
        them in place).
    """

    def __init__(
        self,
        schedule: Schedule,
        comm: Union[None, str, Communicator] = None,
        *,
        metric_reduce: str = "mean",
        sync: str = "mean",
        sync_every_batches: int = 0,
        alloc: Allocator = numpy_allocator,
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
        self.schedule = schedule
        self.comm: Communicator = resolve_comm(comm)
        self.metric_reduce = metric_reduce
        self.sync_mode = sync
        self.sync_every_batches = int(sync_every_batches)
        self._alloc = alloc
        self._source: Optional[ParamSource] = None
        self._state: Optional[AveragedState] = None
        self._layout_checked = False
        self._has_average = False  # the buffers hold an average (False again after ``reset``)
        self._cache: Optional[List[Tuple[np.ndarray, Any]]] = None
        self._dirty = False  # a fold was attempted since the last sync
        self._since_sync = 0
        self._epochs_done = 0
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
        """name -> zero-copy view of the averaged tensor (valid until the next fold; ``.copy()`` to keep), or
        ``None`` before anything was averaged. After ``sync`` (or ``epoch_end``) identical on every rank."""
        if not self.has_average:
            return None
        assert self._state is not None
        return {spec.name: self._state.tensor(spec.name) for spec in self._state.layout.specs}

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
            self._state = AveragedState(src.layout, alloc=self._alloc)
        elif src.layout != self._state.layout:
            raise ValueError(
                "the model's parameters changed (names, shapes or dtypes) since averaging began; an Averager "
                "follows one model -- create a new one for a new model"
            )
        self._source = src
        return src

    def _as_source(self, params: Params) -> ParamSource:
        current = self._source
        if isinstance(params, Mapping):
            if isinstance(current, ArraySource) and current.same_arrays(params):
                return current
            return ArraySource(params)
        if all(hasattr(params, a) for a in ("layout", "plan", "read", "write", "fold_weight")):
            return params
        raise ValueError(f"params must be a mapping of name -> numpy array or a ParamSource, got {params!r}")

    # -- the per-step path (no communication) ----------------------------------------------------
    def step(self, params: Params) -> bool:
        """Call after every optimizer step: folds the iterate if the schedule says so. Returns whether it folded."""
        if not self.schedule.should_fold():
            return False
        return self.fold(params)

    def fold(self, params: Params) -> bool:
        """Fold the current iterate now, whatever the step cadence (GluonTS's ``update_average``).

        The first iterate is copied, later ones weighted by the schedule. An iterate holding a NaN or inf is
        refused (average and counter unchanged, a warning logged): one diverged step must not poison the
        average. Returns whether the iterate was folded.
        """
        src = self.bind(params)
        assert self._state is not None
        alpha = src.fold_weight(self.schedule.peek_weight()) if self._has_average else 1.0
        result = self._state.fold(src.plan(), alpha)
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
        self.sync(all_ranks_folded=folded)
        return self.schedule.averaging_started

    def sync(self, *, all_ranks_folded: bool = False) -> None:
        """Make the averaged model bitwise identical on every rank (collective; call on all ranks alike).

        Whether anything needs syncing is agreed first (one tiny allreduce), so a rank that folded less often
        still takes part; unchanged buffers are not re-synced (a mean over 3 ranks can change the last bit).
        ``all_ranks_folded=True`` skips that round trip: pass it only right after a fold that every rank made at
        the same point (the epoch-end fold once averaging runs), where the answer is known to be yes everywhere.
        """
        with collectives.phase("sync"):
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

    # -- swapping the averaged weights in and out ------------------------------------------------
    def load_averaged(self, params: Params, *, sync: bool = True) -> bool:
        """Save the training weights, then put the averaged weights into ``params`` (evaluation, train end).

        ``sync=True`` (default) syncs first, so every rank evaluates the same weights: call it on every rank.
        ``sync=False`` issues no collective and loads this rank's average as of the last sync (plus its own folds
        since): use it when only some ranks evaluate (``if rank == 0: validate()``). Returns False, changing
        nothing, when there is no average yet.
        """
        if sync:
            self.sync()
        if not self.has_average:
            return False
        src = self.bind(params)
        state = self._state
        assert state is not None
        if self._cache is None:
            self._cache = [self._alloc(n, np.dtype(dt)) for dt, n in zip(state.layout.groups, state.layout.group_sizes)]
        src.read([c[0][:n] for c, n in zip(self._cache, state.layout.group_sizes)])
        src.write([state.current(g) for g in range(len(state.layout.groups))])
        return True

    def restore_training(self, params: Params) -> bool:
        """Put back the training weights saved by the last ``load_averaged`` (no-op, False, if none were saved)."""
        if self._cache is None or self._state is None:
            return False
        self.bind(params).write([c[0][:n] for c, n in zip(self._cache, self._state.layout.group_sizes)])
        return True

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
                self.restore_training(params)

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
            if self.comm.size > 1:
                bufs = [self._alloc(n, np.dtype(dt)) for dt, n in zip(state.layout.groups, state.layout.group_sizes)]
                src.read([b[0][:n] for b, n in zip(bufs, state.layout.group_sizes)])
                collectives.broadcast_arrays(self.comm, [b[0] for b in bufs], [b[1] for b in bufs],
                                             name="iteravg.final_weights")
                src.write([b[0][:n] for b, n in zip(bufs, state.layout.group_sizes)])
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
            out["fingerprint"] = fingerprint_hex(self._state.fingerprint())
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
    def snapshot_contents(self) -> Tuple[Dict[str, Callable[[Path], None]], Dict[str, Any]]:
        """(files, state record) of this averager for a snapshot; no collective (rank 0 calls it, synced)."""
        files: Dict[str, Callable[[Path], None]] = {}
        averaged = self.averaged()
        if averaged is not None:
            files[AVERAGED_FILE] = lambda path: save_tensors(path, averaged, {"format": "iteravg-averaged"})
        return files, {"averager": self.state_dict(), "iteravg_version": __version__}

    def save(self, checkpoint_dir: os.PathLike, *, epoch: Optional[int] = None, stage: str = "manual",
             extra_files: Optional[Dict[str, Callable[[Path], None]]] = None,
             extra_state: Optional[Dict[str, Any]] = None, keep: int = 2,
             on_save_error: str = "raise") -> Optional[Path]:
        """Sync, then rank 0 writes an atomic, immutable snapshot (collective: call on every rank). A failed write
        raises the same error on every rank at once -- or, with ``on_save_error="warn"`` and a storage failure (disk
        full, read-only, ...), is logged once by rank 0 and returns None on every rank (``iteravg.saving``).
        Returns the snapshot path on rank 0, None elsewhere."""
        epoch = self._epochs_done if epoch is None else int(epoch)
        with collectives.phase(f"save ({stage})"):
            self.sync()

            def write() -> Path:
                files, record = self.snapshot_contents()
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

                def read_tensors() -> None:
                    snap, rec = found["snap"], found["record"]
                    tensors = read_averaged(snap, rec, legacy_reader)  # only a file the record lists and verifies
                    live.load_flat(flatten_tensors(live.layout, tensors, str(snap)))
                    if state.get("fingerprint") and fingerprint_hex(live.fingerprint()) != state["fingerprint"]:
                        raise checkpoint.CheckpointError(f"{snap}: the averaged model does not match the fingerprint "
                                                         "in its state record")

                collectives.run_on_root(self.comm, read_tensors, "loading the averaged model")
                collectives.broadcast_average(self.comm, live)
                self._has_average = True
            return record
