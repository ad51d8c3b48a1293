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
from typing import Any, Callable, Dict, Optional, Tuple

from mxnet import gluon

from .checkpoint import load_checkpoint, save_checkpoint
from ..gluonts.guard import check_replicas_in_sync
from .strategies import IterationAveragingStrategy

logger = logging.getLogger("iteravg")


def _callback_base() -> type:
    """GluonTS's ``Callback`` if GluonTS is installed (its Trainer validates ``isinstance``), else our own."""
    try:
        with warnings.catch_warnings():  # GluonTS warns about optional JSON libraries at import
            warnings.simplefilter("ignore")
            from gluonts.mx.trainer.callback import Callback  # noqa: WPS433 -- optional dependency
    except Exception:  # GluonTS absent or broken: the hooks below are all the protocol there is
        from ._hooks import Callback
    return Callback


#: Hook for training loops: returns (extra files name -> writer(path), extra JSON state) for the snapshot.
ExtrasFn = Callable[[], Tuple[Dict[str, Callable[[Any], None]], Dict[str, Any]]]


class ModelIterationAveraging(_callback_base()):  # type: ignore[misc]
    """Callback implementing iteration averaging with ``avg_strategy`` (``NTA``, ``Alpha_Suffix``, ...).

    Parameters
    ----------
    avg_strategy
        The strategy; its ``comm`` decides single-process or distributed behaviour.
    checkpoint_dir
        If set, rank 0 writes an atomic snapshot there at every epoch end and at train end
        (see ``iteravg.checkpoint``). Other ranks never write.
    resume
        Restore averaged model and strategy state from ``checkpoint_dir`` when the network is first seen
        (collective; any number of ranks).
    recount_epoch_end
        GluonTS folds the epoch-end iterate again after each batch fold (default True, for parity).
    keep_checkpoints
        How many snapshots to keep.
    """

    def __init__(
        self,
        avg_strategy: IterationAveragingStrategy,
        *,
        checkpoint_dir: Optional[os.PathLike] = None,
        resume: bool = False,
        recount_epoch_end: bool = True,
        keep_checkpoints: int = 2,
    ) -> None:
        if not isinstance(avg_strategy, IterationAveragingStrategy):
            raise ValueError(f"avg_strategy must be an iteravg.mx strategy (NTA, Alpha_Suffix, ...), got {avg_strategy!r}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be an integer >= 1, got {keep_checkpoints!r}")
        self.avg_strategy = avg_strategy
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.resume = resume
        self.recount_epoch_end = recount_epoch_end
        self.keep_checkpoints = keep_checkpoints
        #: Set by a training loop to add its own files/state (last iterate, optimizer) to each snapshot.
        self.checkpoint_extras: Optional[ExtrasFn] = None
        #: The resumed checkpoint's state record, after a resume.
        self.resumed_state: Optional[Dict[str, Any]] = None
        self._resumed = False
        self._epochs_done = 0
        self._saved_key: Optional[Tuple[int, int]] = None

    # -- resume ----------------------------------------------------------------------------------
    def _maybe_resume(self, net: gluon.Block) -> None:
        if self.resume and not self._resumed:
            self._resumed = True
            self.resumed_state = load_checkpoint(self.avg_strategy, net, self.checkpoint_dir)
            self._epochs_done = int(self.resumed_state.get("epoch", 0))
            self._saved_key = (self._epochs_done, self.avg_strategy.average_counter)
            logger.info("iteravg: resumed averaging state of epoch %d from %s", self._epochs_done, self.checkpoint_dir)

    def on_network_initializing_end(self, training_network: gluon.Block) -> None:
        self._maybe_resume(training_network)

    # -- hooks -----------------------------------------------------------------------------------
    def on_train_batch_end(self, training_network: gluon.Block) -> bool:
        self.avg_strategy._apply(training_network)
        return True

    def on_validation_epoch_start(self, training_network: gluon.Block) -> None:
        self._maybe_resume(training_network)
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
        started_before = strategy.averaging_started
        strategy.update_average_trigger(metric=epoch_loss, epoch=epoch_no + 1)
        if self.recount_epoch_end or not started_before:
            if strategy.averaging_started:
                strategy._bind(training_network, full_check=True)  # epoch-level check of the arrays
            strategy._apply(training_network)
        strategy.sync_average(decide_together=True)
        self._epochs_done = epoch_no + 1
        self._checkpoint("epoch_end")
        return True

    def on_train_end(self, training_network: gluon.Block, temporary_dir: Optional[str] = None, ctx: Any = None) -> None:
        logger.info("iteravg: loading averaged parameters")
        self.avg_strategy.load_averaged_model(training_network)
        self._checkpoint("train_end")

    # -- checkpoint ------------------------------------------------------------------------------
    def save(self, stage: str = "manual") -> None:
        """Write a snapshot now (all ranks call; rank 0 writes). Syncs the average first."""
        self.avg_strategy.sync_average()
        self._saved_key = None
        self._checkpoint(stage)

    def _checkpoint(self, stage: str) -> None:
        if self.checkpoint_dir is None:
            return
        key = (self._epochs_done, self.avg_strategy.average_counter)
        if key == self._saved_key:  # nothing changed since the last snapshot (e.g. train end after epoch end)
            return
        files, extra = self.checkpoint_extras() if self.checkpoint_extras else ({}, {})
        save_checkpoint(self.avg_strategy, self.checkpoint_dir, self._epochs_done, stage=stage,
                        extra_files=files, extra_state=extra, keep=self.keep_checkpoints)
        self._saved_key = key
