"""``ModelIterationAveraging``: the GluonTS trainer callback, distributed.

Hooks, as in GluonTS (all ranks call them at the same points):

=============================  =========================================================================
hook                           what it does
=============================  =========================================================================
``on_train_batch_end``         fold the iterate if averaging has started (no communication by default)
``on_epoch_end``               trigger decision on ``epoch_loss`` (reduced across ranks), fold the
                               epoch-end iterate, sync the average across ranks, rank 0 checkpoints
``on_validation_epoch_start``  sync, then swap the averaged weights in (training weights cached)
``on_validation_epoch_end``    swap the training weights back
``on_train_end``               sync, load the averaged model into the network, final checkpoint
=============================  =========================================================================

GluonTS's quirk, kept by default: ``on_epoch_end`` folds the network again after the trigger, so the last
batch's iterate is counted twice each epoch. ``recount_epoch_end=False`` folds at epoch end only on the
epoch averaging starts (so that the average starts at that epoch's end, as in GluonTS).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
from mxnet import gluon

from .. import checkpoint, collectives
from ..saving import SaveErrors
from ..gluonts.guard import check_replicas_in_sync
from .checkpoint import PARAMS_FILE, legacy_reader, params_writer
from .strategies import IterationAveragingStrategy

logger = logging.getLogger("iteravg")

Writer = Callable[[Path], None]


def _callback_base() -> type:
    """GluonTS's ``Callback`` if GluonTS is installed (its Trainer validates ``isinstance``), else our own."""
    try:
        with warnings.catch_warnings():  # GluonTS warns about optional JSON libraries at import
            warnings.simplefilter("ignore")
            from gluonts.mx.trainer.callback import Callback  # noqa: WPS433 -- optional dependency
    except Exception:  # GluonTS absent or broken: the hooks below are all the protocol there is
        from ._hooks import Callback
    return Callback


class ModelIterationAveraging(_callback_base()):  # type: ignore[misc]
    """Callback implementing iteration averaging with ``avg_strategy`` (``NTA``, ``Alpha_Suffix``, ...).

    Parameters
    ----------
    avg_strategy
        The strategy; its ``comm`` decides single-process or distributed behaviour.
    checkpoint_dir
        If set, rank 0 writes an atomic, immutable snapshot of the averaging state there at every epoch end and
        at train end (see ``iteravg.checkpoint``); other ranks never write. Leave it ``None`` when the training
        loop writes its own checkpoints (it then asks ``snapshot_contents`` / ``restore``, as ``iteravg.mx.train``
        does).
    resume
        Restore the averaged model and the strategy's progress from ``checkpoint_dir`` when the network is first
        seen (collective; any number of ranks). The constructor's configuration wins over the checkpoint's.
    recount_epoch_end
        GluonTS folds the epoch-end iterate again after each batch fold (default: True, for parity; False for
        ``EMA``, which GluonTS does not have and which must not count an epoch's last iterate twice).
    keep_checkpoints
        How many snapshots to keep.
    on_save_error
        ``"raise"`` (default): a snapshot that cannot be written (disk full, read-only, ...) stops training with the
        same ``SnapshotWriteError`` on every rank. ``"warn"``: rank 0 says so once, training goes on, and the next
        snapshot is tried as usual (``iteravg.saving``).
    """

    def __init__(
        self,
        avg_strategy: IterationAveragingStrategy,
        *,
        checkpoint_dir: Optional[os.PathLike] = None,
        resume: bool = False,
        recount_epoch_end: Optional[bool] = None,
        keep_checkpoints: int = 2,
        on_save_error: str = "raise",
    ) -> None:
        if not isinstance(avg_strategy, IterationAveragingStrategy):
            raise ValueError(f"avg_strategy must be an iteravg.mx strategy (NTA, Alpha_Suffix, ...), got {avg_strategy!r}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, (int, np.integer)) \
                or keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be an integer >= 1, got {keep_checkpoints!r}")
        self.avg_strategy = avg_strategy
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.resume = bool(resume)
        if recount_epoch_end is None:
            recount_epoch_end = not getattr(avg_strategy, "folds_every_step", False)
        self.recount_epoch_end = bool(recount_epoch_end)
        self.keep_checkpoints = int(keep_checkpoints)
        self.save_errors = SaveErrors(on_save_error)
        #: The resumed checkpoint's state record, after a resume.
        self.resumed_state: Optional[Dict[str, Any]] = None
        self._started = False
        self._resumed = False
        self._epochs_done = 0
        self._saved_key: Optional[Tuple[int, int]] = None

    def __repr__(self) -> str:
        return (f"ModelIterationAveraging(avg_strategy={self.avg_strategy!r}, checkpoint_dir={self.checkpoint_dir!r}, "
                f"resume={self.resume}, recount_epoch_end={self.recount_epoch_end})")

    # -- serialisation (gluonts.core.serde: GluonTS serialises an estimator with its trainer's callbacks) --
    def __getnewargs_ex__(self) -> Tuple[tuple, Dict[str, Any]]:
        return (self.avg_strategy,), {"checkpoint_dir": self.checkpoint_dir, "resume": self.resume,
                                      "recount_epoch_end": self.recount_epoch_end,
                                      "keep_checkpoints": self.keep_checkpoints,
                                      "on_save_error": self.save_errors.on_save_error}

    # -- Lightning-style state: the trainer may own the files ---------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """JSON-able progress: epochs seen and the averager's state (tensors: ``snapshot_contents``)."""
        return {"epochs_done": self._epochs_done, "averager": self.avg_strategy.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore progress on this rank (the tensors come with ``restore``, which is collective)."""
        self._epochs_done = int(state.get("epochs_done", 0))
        self.avg_strategy.load_state_dict(state["averager"])

    def snapshot_contents(self, averaged: Optional[Dict[str, np.ndarray]] = None, *,
                          checkpoint_dir: Optional[os.PathLike] = None) -> Tuple[Dict[str, Writer], Dict[str, Any]]:
        """(files, JSON state) for a snapshot written by whoever owns the files (rank 0, after a sync).

        Files: ``averaged.safetensors`` (layout names) and ``averaged.params`` (``net.load_parameters``).
        ``averaged``: the average as ``gathered_average()`` returned it on every rank (needed when it is sharded).
        ``checkpoint_dir``: where the snapshot goes (default: the callback's own); a strategy with ``posthoc=True``
        publishes its pending per-epoch prefixes next to it (``<dir>/posthoc/``) first.
        """
        files, record = self.avg_strategy.averager.snapshot_contents(
            averaged, checkpoint_dir=self.checkpoint_dir if checkpoint_dir is None else checkpoint_dir)
        record["averager"]["epochs_done"] = self._epochs_done
        averaged = self.avg_strategy.averager.averaged() if averaged is None else averaged
        if averaged is not None:
            files[PARAMS_FILE] = params_writer(averaged)
        return files, record

    def gathered_average(self) -> Optional[Dict[str, np.ndarray]]:
        """On every rank (collective when sharded): the synced average to hand to ``snapshot_contents`` on rank 0,
        or None when it is already whole on each rank (a zero-copy read then happens inside)."""
        averager = self.avg_strategy.averager
        return averager.averaged() if averager.state is not None and averager.state.partitioned else None

    def restore(self, checkpoint_dir: os.PathLike, training_network: gluon.Block) -> Dict[str, Any]:
        """Load the averaging state of a snapshot on every rank (collective). Returns its state record."""
        record = self.avg_strategy.averager.load(checkpoint_dir, self.avg_strategy.bind(training_network),
                                                 legacy_reader=legacy_reader)
        self._epochs_done = int(record.get("averager", {}).get("epochs_done", record.get("epoch", 0)))
        self._saved_key = (self._epochs_done, self.avg_strategy.average_counter)
        self.resumed_state = record
        return record

    # -- start: checks agreed by all ranks ------------------------------------------------------
    def _start_once(self) -> None:
        if self._started:
            return
        self._started = True
        if self.checkpoint_dir is not None:
            with collectives.phase("on_train_start (checking checkpoint_dir)"):
                collectives.run_on_root(self.avg_strategy.comm, lambda: checkpoint.check_writable(self.checkpoint_dir),
                                        f"checking that checkpoint_dir {self.checkpoint_dir!r} is writable")

    def _maybe_resume(self, net: gluon.Block) -> None:
        self._start_once()
        if self.resume and not self._resumed:
            self._resumed = True
            assert self.checkpoint_dir is not None
            with collectives.phase("resume"):
                self.restore(self.checkpoint_dir, net)
            logger.info("iteravg: resumed averaging state of epoch %d from %s", self._epochs_done, self.checkpoint_dir)

    # -- hooks -----------------------------------------------------------------------------------
    def on_train_start(self, max_epochs: int) -> None:
        self._start_once()

    def on_network_initializing_end(self, training_network: gluon.Block) -> None:
        self._maybe_resume(training_network)

    def on_train_batch_end(self, training_network: gluon.Block) -> bool:
        self.avg_strategy.apply(training_network)
        return True

    def on_validation_epoch_start(self, training_network: gluon.Block) -> None:
        self._maybe_resume(training_network)
        with collectives.phase("on_validation_epoch_start"):
            self.avg_strategy.load_averaged_model(training_network)

    def on_validation_epoch_end(self, epoch_no: int, epoch_loss: float, training_network: gluon.Block,
                                trainer: gluon.Trainer) -> bool:
        self.avg_strategy.load_cached_model(training_network)
        return True

    def on_epoch_end(self, epoch_no: int, epoch_loss: float, training_network: gluon.Block, trainer: gluon.Trainer,
                     best_epoch_info: Optional[Dict[str, Any]] = None, ctx: Any = None) -> bool:
        self._maybe_resume(training_network)
        if not getattr(self, "_replicas_checked", False):  # collective: N ranks training unrelated replicas raise
            self._replicas_checked = True
            check_replicas_in_sync(self.avg_strategy.comm, training_network, strict=None)
        strategy = self.avg_strategy
        with collectives.phase("on_epoch_end"):
            strategy.bind(training_network)  # first epoch end: ranks check they hold the same model (collective)
            started_before = strategy.averaging_started
            strategy.update_average_trigger(metric=epoch_loss, epoch=epoch_no + 1)
            folded = strategy.averaging_started and (self.recount_epoch_end or not started_before)  # replicated
            if folded:
                strategy.update_average(training_network, check_arrays=True)
            if strategy.averager.posthoc:  # the prefix a run started at this epoch would build on (collective)
                strategy.averager.posthoc_epoch_end(strategy.bind(training_network), epoch_no + 1,
                                                    epoch_end_folds="every" if self.recount_epoch_end else "first")
            strategy.averager.sync(all_ranks_folded=folded)
            self._epochs_done = epoch_no + 1
            self._checkpoint("epoch_end")
        return True

    def on_train_end(self, training_network: gluon.Block, temporary_dir: Optional[str] = None, ctx: Any = None) -> None:
        logger.info("iteravg: loading averaged parameters")
        with collectives.phase("on_train_end"):
            self.avg_strategy.finalize(training_network)
            self._checkpoint("train_end")

    # -- checkpoint ------------------------------------------------------------------------------
    def save(self, stage: str = "manual") -> Optional[Path]:
        """Write a snapshot now (collective: every rank calls, rank 0 writes; the average is synced first).
        Never rewrites a published snapshot. Returns the snapshot path on rank 0."""
        if self.checkpoint_dir is None:
            raise ValueError("save() needs checkpoint_dir")
        with collectives.phase(f"save ({stage})"):
            return self._write(stage)

    def _checkpoint(self, stage: str) -> None:
        if self.checkpoint_dir is None:
            return
        key = (self._epochs_done, self.avg_strategy.average_counter)  # replicated: the counter was just synced
        if key == self._saved_key:  # nothing changed since the last snapshot (e.g. train end after epoch end)
            return
        self._write(stage)

    def _write(self, stage: str) -> Optional[Path]:
        assert self.checkpoint_dir is not None
        strategy = self.avg_strategy
        strategy.sync_average()
        averaged = self.gathered_average()

        def write() -> Path:
            files, record = self.snapshot_contents(averaged)
            record.update(epoch=self._epochs_done, stage=stage, world_size=strategy.comm.size, comm=strategy.comm.name)
            return checkpoint.write_snapshot(self.checkpoint_dir, f"epoch-{self._epochs_done:06d}", record, files,
                                             keep=self.keep_checkpoints)

        written, path = self.save_errors.run(strategy.comm, write, f"writing the checkpoint to {self.checkpoint_dir!r}")
        if written:  # else the next epoch end or train end tries again
            self._saved_key = (self._epochs_done, strategy.average_counter)
        return path

