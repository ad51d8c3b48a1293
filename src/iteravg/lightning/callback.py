"""``IterationAveraging``: GluonTS's iteration averaging as a ``lightning.pytorch.Callback``, on ``iteravg.torch``.

Lightning calls every hook on every rank at the same point (DDP and FSDP2 validate on all ranks), so the
collectives below are issued alike everywhere:

=============================  ===========================================================================
hook                           what it does
=============================  ===========================================================================
``on_fit_start``               bind an ``iteravg.torch.Averager`` to the LightningModule, after the strategy
                               initialised the process group and wrapped (DDP) or sharded (FSDP2) the model
                               (collective: the ranks check they hold the same model); apply a checkpoint's
                               state that Lightning handed over before the model was set up
``on_train_epoch_start``       the training weights back into the model (it held the average between epochs)
``on_train_batch_end``         after an optimizer step: fold if the schedule says so (no communication); add
                               the step's loss to the epoch's training loss
``on_validation_epoch_start``  sync, swap the averaged weights in (collective)
``on_validation_epoch_end``    swap the training weights back
``on_train_epoch_end``         the trigger decision on ``monitor`` (else the epoch's mean training loss),
                               reduced across ranks; the epoch-end fold on the epoch averaging starts; sync.
                               Then the averaged weights stay in the model until the next epoch starts, so a
                               checkpoint written at the epoch end holds them (see below)
``on_train_end``               the model holds the synced average on every rank (collective)
``on_exception``               the training weights back if a swap was active (a collective only with sharded=True)
=============================  ===========================================================================

Checkpoints are Lightning's: the callback's ``state_dict`` (the averager's progress and averaged tensors, the whole
model as host tensors, so it loads at any world size) goes into the checkpoint's ``callbacks`` entry and comes back
through ``load_state_dict`` on ``fit(ckpt_path=...)``. The model's own ``state_dict`` in a checkpoint is what the model
held when it was written: at an epoch end, once averaging has started, the averaged weights -- as in Lightning's
``WeightAveraging``, and also for ``save_weights_only=True`` checkpoints, which GluonTS's estimators write and reload
as their trained network -- with the training weights under ``current_model_state`` in a full checkpoint, from which a
resume restores them. An FSDP2-sharded model keeps its training weights between epochs (its checkpoint is a sharded
one), and its average lives in the callback's state.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn

from ..comm import Communicator
from ..core.schedules import Schedule
from ..torch import Averager

__all__ = ["IterationAveraging"]

STATE_VERSION = 1


class IterationAveraging(pl.Callback):
    """Iteration averaging with ``schedule`` (``iteravg.NTASchedule``, ``AlphaSuffixSchedule``, ``EMASchedule``,
    ``Schedule``, optionally in ``EveryNSteps``) inside ``lightning.Trainer.fit``, on one device or under DDP / FSDP2.

    Parameters
    ----------
    schedule
        When averaging starts and with which weight. A triggered schedule (NTA) decides at every epoch end on the
        metric reduced across ranks (``metric_reduce``), so every rank decides alike.
    monitor
        The logged metric the trigger reads in an epoch that ran validation (default ``"val_loss"``). In an epoch
        without validation, or with ``monitor=None``, it reads the mean of the epoch's ``training_step`` losses --
        GluonTS's rule (its ``epoch_loss`` is the validation loss when there is validation data, else the training
        loss).
    recount_epoch_end
        GluonTS's MXNet callback folds the epoch-end iterate again after each epoch's per-step folds (the last step
        counted twice). ``False`` (default) folds at an epoch end only on the epoch averaging starts, so from then on
        the average is exactly over the per-step iterates, as ``torch.optim.swa_utils.AveragedModel`` and Lightning's
        ``WeightAveraging`` compute it; ``True`` keeps GluonTS's double count.
    comm, sharded, check_finite, metric_reduce, sync, sync_every_batches
        As for ``iteravg.torch.Averager``; ``comm=None`` picks torch.distributed's default process group, which
        Lightning's DDP and FSDP strategies initialise. ``sharded=True`` under DDP keeps 1/N of the average per rank;
        then every swap is a collective too (Lightning calls the hooks on all ranks alike), the restore after an
        exception included.
    """

    def __init__(self, schedule: Schedule, monitor: Optional[str] = "val_loss", *, recount_epoch_end: bool = False,
                 comm: Union[None, str, Communicator] = None, sharded: Optional[bool] = None,
                 check_finite: bool = True, metric_reduce: str = "mean", sync: str = "mean",
                 sync_every_batches: int = 0) -> None:
        if not isinstance(schedule, Schedule):
            raise ValueError("schedule must be an iteravg schedule (iteravg.NTASchedule, AlphaSuffixSchedule, "
                             f"EMASchedule, ...), got {schedule!r}")
        if monitor is not None and not isinstance(monitor, str):
            raise ValueError(f"monitor must be the name of a logged metric or None, got {monitor!r}")
        if not isinstance(recount_epoch_end, bool):
            raise ValueError(f"recount_epoch_end must be True or False, got {recount_epoch_end!r}")
        self.schedule = schedule
        self.monitor = monitor
        self.recount_epoch_end = recount_epoch_end
        self._options: Dict[str, Any] = dict(comm=comm, sharded=sharded, check_finite=check_finite,
                                             metric_reduce=metric_reduce, sync=sync,
                                             sync_every_batches=sync_every_batches)
        #: The ``iteravg.torch.Averager`` of the current (or last) fit; ``None`` before ``fit`` starts.
        self.averager: Optional[Averager] = None
        self._pending: Optional[Dict[str, Any]] = None  # a checkpoint's state handed over before on_fit_start
        self._sharded = False
        self._last_step = 0  # trainer.global_step at the last fold: one fold per optimizer step
        self._loss_sum: Any = 0.0
        self._loss_count = 0
        self._validated = False  # validation ran in this training epoch (not the sanity check)
        self._swapped_for_validation = False
        self._swapped_between_epochs = False

    def __repr__(self) -> str:
        return (f"IterationAveraging(schedule={self.schedule!r}, monitor={self.monitor!r}, "
                f"recount_epoch_end={self.recount_epoch_end})")

    # -- binding -------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.averager is None:
            self.averager = Averager(pl_module, self.schedule, **self._options)
        elif self.averager.model is not pl_module:
            raise ValueError("this IterationAveraging callback already averaged another LightningModule; an "
                             "averager follows one model: create a new callback (and schedule) for a new model")
        self._sharded = _is_sharded(pl_module)
        self._last_step = trainer.global_step  # a later fit of the same model counts from its own trainer's steps
        if self._pending is not None:  # a resumed fit: the checkpoint's step count wins
            pending, self._pending = self._pending, None
            self._apply_state(pending)

    # -- training ------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore_training_weights()
        self._new_epoch()  # (a fit resumed mid-epoch skips this hook and goes on with the restored partial loss)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = _step_loss(outputs)
        if loss is not None:
            self._loss_sum = self._loss_sum + loss.detach().float()  # stays on the device: no sync per step
            self._loss_count += 1
        if trainer.global_step > self._last_step and self.averager is not None:  # an optimizer step was taken
            self._last_step = trainer.global_step
            self.averager.step()

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        avg = self._bound()
        epoch = trainer.current_epoch + 1  # GluonTS's callback passes epoch_no + 1
        metric = self._epoch_metric(trainer, epoch) if avg.schedule.needs_metric(epoch) else None
        started_before = avg.averaging_started
        avg.epoch_end(metric=metric, epoch=epoch, fold=self.recount_epoch_end or not started_before)
        self._new_epoch()  # an epoch-end checkpoint carries no partial epoch
        if not self._sharded:  # collective (every rank is here); the sync just ran, so it moves nothing
            self._swapped_between_epochs = avg.load_averaged(sync=True)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore_training_weights()
        self._bound().finalize()

    # -- validation ------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.averager is None or trainer.state.fn != TrainerFn.FITTING:
            return
        if self._swapped_for_validation or self._swapped_between_epochs:
            return  # the model holds the average already
        self._swapped_for_validation = self.averager.load_averaged(sync=True)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._swapped_for_validation:
            self._swapped_for_validation = False
            self._bound().restore_training()
        if not trainer.sanity_checking:
            self._validated = True

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self._swapped_for_validation:
            self._swapped_for_validation = False
            self._bound().restore_training()
        self._restore_training_weights()

    # -- Lightning's checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The averager's state (progress and averaged host tensors, the whole model) and the epoch's progress.
        Collective under DDP / FSDP (Lightning builds the checkpoint on every rank): the average is synced first, so
        a checkpoint written mid-epoch holds what every rank holds."""
        if self.averager is None:
            return dict(self._pending or {})
        self.averager.sync()
        return {"version": STATE_VERSION, "averager": self.averager.state_dict(), "last_step": self._last_step,
                "loss_sum": float(self._loss_sum), "loss_count": self._loss_count, "validated": self._validated}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not state_dict:
            return
        if "averager" not in state_dict:
            raise ValueError("IterationAveraging.load_state_dict: the state has no 'averager' entry; it was not "
                             "written by iteravg.lightning.IterationAveraging")
        if self.averager is None:  # DDP restores callbacks before the model is set up: apply in on_fit_start
            self._pending = dict(state_dict)
        else:
            self._apply_state(state_dict)

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        """Between epochs the model holds the average, so ``checkpoint['state_dict']`` does; the training weights go
        under ``current_model_state`` (Lightning's ``WeightAveraging`` layout) for a resume."""
        if not self._swapped_between_epochs:
            return
        avg = self._bound()
        avg.restore_training()
        try:
            checkpoint["current_model_state"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        finally:
            avg.load_averaged(sync=True)  # checkpoint['state_dict'] aliases the parameters: average again

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        training = checkpoint.get("current_model_state")
        if training is not None:  # the model was just loaded with the average; training resumes from these
            pl_module.load_state_dict(training, strict=pl_module.strict_loading)

    # -- helpers ---------------------------------------------------------------------------------------
    def _bound(self) -> Averager:
        if self.averager is None:
            raise RuntimeError("IterationAveraging: a training hook ran before on_fit_start bound the model")
        return self.averager

    def _apply_state(self, state: Dict[str, Any]) -> None:
        self._bound().load_state_dict(state["averager"])
        self._last_step = int(state.get("last_step", 0))
        self._loss_sum = float(state.get("loss_sum", 0.0))
        self._loss_count = int(state.get("loss_count", 0))
        self._validated = bool(state.get("validated", False))

    def _new_epoch(self) -> None:
        self._loss_sum, self._loss_count, self._validated = 0.0, 0, False

    def _restore_training_weights(self) -> None:
        if self._swapped_between_epochs:
            self._swapped_between_epochs = False
            self._bound().restore_training()

    def _epoch_metric(self, trainer: "pl.Trainer", epoch: int) -> Any:
        """The value the trigger compares (this rank's; the engine reduces it across ranks)."""
        if self._validated and self.monitor is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                raise ValueError(
                    f"IterationAveraging(monitor={self.monitor!r}): epoch {epoch} ran validation but nothing logged "
                    f"{self.monitor!r} (logged: {sorted(trainer.callback_metrics)}); log it in validation_step with "
                    f"self.log({self.monitor!r}, ...), or pass monitor=None to trigger on the training loss")
            return value
        if self._loss_count == 0:
            raise ValueError(f"IterationAveraging: epoch {epoch} ran no validation and no training_step returned a "
                             "loss, so the trigger has no metric to compare")
        return self._loss_sum / self._loss_count


def _step_loss(outputs: Any) -> Optional[torch.Tensor]:
    """The loss of a training step as Lightning hands it to ``on_train_batch_end`` (a tensor or ``{"loss": ...}``)."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    return outputs if isinstance(outputs, torch.Tensor) else None


def _is_sharded(module: torch.nn.Module) -> bool:
    """FSDP2 (``fully_shard``): the parameters are DTensors."""
    try:
        from torch.distributed.tensor import DTensor  # noqa: WPS433 -- absent in builds without distributed
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())
