"""``iteravg.lightning.IterationAveraging`` on one process (no launcher), against the references: Lightning's own
``WeightAveraging`` (``torch.optim.swa_utils.AveragedModel``) and ``EMAWeightAveraging`` trained on the same iterates,
and GluonTS's MXNet ``NTA`` / ``Alpha_Suffix`` fed the same metric sequence. Plus the swap's exception safety,
weights-only checkpoints holding the average, and clear errors."""

from __future__ import annotations

import warnings
from typing import List, Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import iteravg  # noqa: E402
from iteravg.lightning import IterationAveraging, RankSeeding  # noqa: E402

STEPS = 4  # batches per epoch


class Net(pl.LightningModule):
    """Linear + BatchNorm + Linear; logs ``val_loss`` from ``script`` (one value per epoch) when given."""

    def __init__(self, script: Optional[List[float]] = None, fail_val_epoch: int = -1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
        self.script = script
        self.fail_val_epoch = fail_val_epoch
        self.epoch_losses: List[List[float]] = []
        self.val_weights: List[dict] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if batch_idx == 0:
            self.epoch_losses.append([])
        self.epoch_losses[-1].append(float(loss))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == 0:
            self.val_weights.append({k: v.clone() for k, v in self.state_dict().items()})
        if self.current_epoch == self.fail_val_epoch and not self.trainer.sanity_checking:
            raise RuntimeError("validation failed on purpose")
        value = nn.functional.mse_loss(self.net(x), y)
        if self.script is not None:
            value = torch.tensor(self.script[self.current_epoch])
        self.log("val_loss", value)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.5)


def loader(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8 * STEPS, 5, generator=g)
    return DataLoader(TensorDataset(x, torch.sin(x.sum(1, keepdim=True))), batch_size=8)


def fit(model: Net, callbacks: list, epochs: int, val: bool = False, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         enable_checkpointing=kwargs.pop("enable_checkpointing", False), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(1), loader(2) if val else None)
    return trainer


def floats(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def assert_same_average(ours: dict, ref: dict, last: dict) -> None:
    """Equal to float rounding, and far from the last iterate (so the comparison says something)."""
    assert ours.keys() == ref.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], ref[k], rtol=2e-6, atol=1e-7, msg=k)
    assert max(float((ours[k] - last[k]).abs().max()) for k in ours) > 1e-3


class StartAtStep(pl.callbacks.WeightAveraging):
    """Lightning's WeightAveraging (AveragedModel, equal weights) from a fixed optimizer step on; no epoch folds."""

    def __init__(self, first_step: int) -> None:
        super().__init__()
        self.first_step = first_step

    def should_update(self, step_idx=None, epoch_idx=None) -> bool:
        return step_idx is not None and step_idx >= self.first_step


class LastIterate(pl.Callback):
    """Placed before the averaging callback: the training weights at the last epoch end, before the average goes in."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.weights = floats(pl_module)


def test_eta0_from_the_start_equals_averaged_model():
    """Polynomial averaging with eta=0 started before the first step is the plain mean of every step's iterate:
    Lightning's WeightAveraging (AveragedModel's SWA average, buffers included) on the same iterates."""
    schedule = iteravg.Schedule(eta=0)
    schedule.averaging_started = True
    ours, ref, last = Net(), Net(), LastIterate()
    fit(ours, [last, IterationAveraging(schedule, monitor=None)], epochs=3)
    fit(ref, [StartAtStep(0)], epochs=3)
    assert schedule.average_counter == 3 * STEPS
    assert_same_average(floats(ours), floats(ref), last.weights)


def test_alpha_suffix_equals_averaged_model_from_the_trigger_epoch():
    """Alpha_Suffix starts at an epoch end: the average folds that epoch's last iterate, then every step's -- the
    AveragedModel of the iterates from optimizer step ``start * STEPS - 1`` on."""
    epochs, schedule = 5, iteravg.AlphaSuffixSchedule(epochs=5, alpha=0.6)  # starts at epoch 5 * 0.4 = 2
    ours, ref, last = Net(), Net(), LastIterate()
    cb = IterationAveraging(schedule, monitor=None)
    fit(ours, [last, cb], epochs=epochs)
    fit(ref, [StartAtStep(2 * STEPS - 1)], epochs=epochs)
    assert schedule.trigger_epoch == 2 and schedule.average_counter == 1 + (epochs - 2) * STEPS
    assert_same_average(floats(ours), floats(ref), last.weights)


def test_ema_without_warmup_equals_lightning_ema_weight_averaging():
    ours, ref, last = Net(), Net(), LastIterate()
    fit(ours, [last, IterationAveraging(iteravg.EMASchedule(decay=0.8, warmup=False), monitor=None)], epochs=3)
    fit(ref, [pl.callbacks.EMAWeightAveraging(decay=0.8)], epochs=3)
    assert_same_average(floats(ours), floats(ref), last.weights)


def test_gradient_accumulation_folds_once_per_optimizer_step_like_lightning():
    """With accumulate_grad_batches=2 an optimizer step happens every second batch: one fold per step, as
    Lightning's EMAWeightAveraging updates."""
    schedule = iteravg.EMASchedule(decay=0.7, warmup=False)
    ours, ref, last = Net(), Net(), LastIterate()
    fit(ours, [last, IterationAveraging(schedule, monitor=None)], epochs=3, accumulate_grad_batches=2)
    fit(ref, [pl.callbacks.EMAWeightAveraging(decay=0.7)], epochs=3, accumulate_grad_batches=2)
    assert schedule.average_counter == 3 * STEPS // 2
    assert_same_average(floats(ours), floats(ref), last.weights)


def gluonts_trigger(strategy, metrics: List[float]) -> Optional[int]:
    for epoch, metric in enumerate(metrics, start=1):
        strategy.update_average_trigger(metric=metric, epoch=epoch)
        if strategy.averaging_started:
            return epoch
    return None


SEQUENCES = [list(np.round(2.0 + np.cumsum(np.random.default_rng(seed).normal(-0.05, 0.2, 10)), 4))
             for seed in (1, 2, 3)]


@pytest.mark.parametrize("kwargs", [dict(n=2), dict(n=3, last_n_trigger=True), dict(n=2, maximize=True),
                                    dict(n=4, fallback_alpha=0.3)])
def test_nta_decides_as_gluonts_on_the_logged_validation_metric(kwargs):
    """The metric logged as ``val_loss`` each epoch goes through the trigger exactly as through GluonTS's NTA."""
    mx_iteration_averaging = pytest.importorskip("gluonts.mx.trainer.model_iteration_averaging")
    epochs = 10
    for script in SEQUENCES:
        cb = IterationAveraging(iteravg.NTASchedule(epochs=epochs, **kwargs), monitor="val_loss")
        fit(Net(script=script), [cb], epochs=epochs, val=True, limit_val_batches=1)
        expected = gluonts_trigger(mx_iteration_averaging.NTA(epochs=epochs, **kwargs), script)
        assert cb.schedule.trigger_epoch == expected, (script, kwargs)
        assert cb.averager.average_counter == (0 if expected is None else 1 + (epochs - expected) * STEPS)


def test_without_validation_the_trigger_reads_the_epochs_mean_training_loss():
    """GluonTS's rule: no validation data, the epoch's training loss decides (NTA and Alpha_Suffix alike)."""
    mx_iteration_averaging = pytest.importorskip("gluonts.mx.trainer.model_iteration_averaging")
    epochs = 8
    model = Net()
    cb = IterationAveraging(iteravg.NTASchedule(epochs=epochs, n=1), monitor="val_loss")
    fit(model, [cb], epochs=epochs)
    means = [float(np.mean(losses)) for losses in model.epoch_losses]
    assert cb.schedule.val_logs == pytest.approx(means[:len(cb.schedule.val_logs)], rel=1e-6)
    assert cb.schedule.trigger_epoch == gluonts_trigger(mx_iteration_averaging.NTA(epochs=epochs, n=1), means)
    suffix = IterationAveraging(iteravg.AlphaSuffixSchedule(epochs=epochs, alpha=0.25))
    fit(Net(), [suffix], epochs=epochs)
    assert suffix.schedule.trigger_epoch == gluonts_trigger(
        mx_iteration_averaging.Alpha_Suffix(epochs=epochs, alpha=0.25), means) == 6


def test_validation_sees_the_average_and_a_failing_validation_restores_the_training_weights():
    schedule = iteravg.Schedule()
    schedule.averaging_started = True

    class Before(pl.Callback):  # before IterationAveraging: the training weights as validation starts
        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            self.training = floats(pl_module)

    before = Before()
    model = Net(fail_val_epoch=1)
    cb = IterationAveraging(schedule, monitor=None)
    with pytest.raises(RuntimeError, match="on purpose"):
        fit(model, [before, cb], epochs=3, val=True)
    seen = {k: v for k, v in model.val_weights[-1].items() if v.is_floating_point()}
    averaged = cb.averager.averaged_state_dict()
    assert all(torch.equal(seen[k], averaged[k]) for k in seen)  # validation ran on the average
    now = floats(model)
    assert all(torch.equal(now[k], before.training[k]) for k in now)  # and the exception put training back
    assert any(not torch.equal(now[k], averaged[k]) for k in now)


def test_weights_only_checkpoints_hold_the_average(tmp_path):
    """GluonTS's estimators write save_weights_only checkpoints and reload the best one as the trained network: from
    the epoch averaging starts, a checkpoint's state_dict is the average as of that epoch's end."""
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, save_weights_only=True)

    class Averages(pl.Callback):  # after IterationAveraging: the average after each epoch end
        def __init__(self) -> None:
            self.seen = {}

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            avg = cb.averager.averaged_state_dict()
            self.seen[trainer.current_epoch] = None if avg is None else {k: v.clone() for k, v in avg.items()}

    cb, averages = IterationAveraging(iteravg.AlphaSuffixSchedule(epochs=4, alpha=0.5), monitor=None), Averages()
    model = Net()
    fit(model, [cb, averages, saver], epochs=4, enable_checkpointing=True)
    for epoch in range(4):
        state = torch.load(tmp_path / f"epoch={epoch}.ckpt", weights_only=True)["state_dict"]
        assert "current_model_state" not in state
        if averages.seen[epoch] is None:  # before the trigger: the training weights
            continue
        assert all(torch.equal(state[k], averages.seen[epoch][k]) for k in averages.seen[epoch])
    assert averages.seen[0] is None and averages.seen[1] is not None
    final = model.state_dict()  # the model holds the final average after fit
    assert all(torch.equal(final[k], averages.seen[3][k]) for k in averages.seen[3] if final[k].is_floating_point())


def test_one_process_resume_continues_the_average_bit_for_bit(tmp_path):
    """fit(ckpt_path=...) from an epoch-end full checkpoint (written between epochs: the average in state_dict, the
    training weights in current_model_state) ends with the uninterrupted fit's average and schedule state -- the NTA
    log of training losses included."""
    def run(ckpt_dir, resume=None):  # no validation: the trigger reads the epochs' training losses
        cb = IterationAveraging(iteravg.NTASchedule(epochs=5, n=1, fallback_alpha=0.5), monitor="val_loss")
        saver = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1)
        model = Net()
        trainer = pl.Trainer(max_epochs=5, accelerator="cpu", devices=1, callbacks=[cb, saver], logger=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, loader(1), ckpt_path=resume)
        return cb, floats(model)

    whole, whole_model = run(tmp_path / "a")
    trigger = whole.schedule.trigger_epoch
    assert trigger < 5 and whole.schedule.val_logs  # resume from the trigger epoch's checkpoint: an average to
    # continue, epochs to go, and a log of training losses in the state
    path = tmp_path / "a" / f"epoch={trigger - 1}.ckpt"
    assert "current_model_state" in torch.load(path, weights_only=False)
    resumed, resumed_model = run(tmp_path / "b", resume=path)
    assert all(torch.equal(resumed_model[k], whole_model[k]) for k in whole_model)
    assert resumed.schedule.state_dict() == whole.schedule.state_dict()


def test_bad_arguments_and_a_missing_monitor_raise_clear_errors():
    with pytest.raises(ValueError, match="schedule must be an iteravg schedule"):
        IterationAveraging("nta")
    with pytest.raises(ValueError, match="monitor must be"):
        IterationAveraging(iteravg.EMASchedule(), monitor=3)
    cb = IterationAveraging(iteravg.NTASchedule(epochs=4, n=1), monitor="val_mape")
    with pytest.raises(ValueError, match=r"monitor='val_mape'.*logged no|nothing logged 'val_mape'"):
        fit(Net(), [cb], epochs=2, val=True)


def test_rank_seeding_does_nothing_on_one_process():
    seeding = RankSeeding()
    torch.manual_seed(3)
    np.random.seed(3)
    fit(Net(), [seeding], epochs=1)
    assert seeding.base_seed is None
