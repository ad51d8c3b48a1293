"""GluonTS's PyTorch estimators (``gluonts.torch``, trained by Lightning) with ``iteravg.lightning.IterationAveraging``,
unchanged otherwise: one process, or Lightning's DDP on 2 CPU processes (its launcher re-runs this script for rank 1).

usage: worker_gluonts_torch.py OUT_DIR --devices 1|2 [--epochs N] [--windows-check]

Data: real, public-domain monthly series (``tests/fixtures/monthly-series.csv``, as bundled with statsmodels): El Nino
sea-surface temperatures 1950-2010 and Mauna Loa CO2 1958-2001 (weekly, averaged per month), cut into 10 decade-long
series; the last 12 months of each are the test horizon. DeepAR is trained with NTA averaging (and ``RankSeeding`` on 2 processes); rank 0 serialises the predictor,
deserialises it, forecasts, and evaluates (mean weighted quantile loss, MASE). Each rank writes OUT_DIR/rank-R.json
with a digest of the first training windows it drew.

``--windows-check`` first trains a SimpleFeedForward (EMA averaging, two short epochs) without ``RankSeeding``, then
with it, recording each rank's windows: the measurement behind ``RankSeeding`` (without it, every rank draws the same
windows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import iteravg  # noqa: E402
from iteravg.lightning import IterationAveraging, RankSeeding  # noqa: E402

PREDICTION_LENGTH = 12


def monthly_series() -> list:
    """Decade-long monthly series cut from two real, public-domain data sets (tests/fixtures/monthly-series.csv)."""
    table = pd.read_csv(Path(__file__).resolve().parents[1] / "fixtures" / "monthly-series.csv", comment="#")
    series = []
    for name, rows in table.groupby("series", sort=False):
        values = rows["value"].to_numpy(dtype=np.float32)
        start = pd.Period(rows["month"].iloc[0], "M")
        for i in range(len(values) // 120):
            series.append({"item_id": f"{name}-{i}", "start": start + 120 * i,
                           "target": values[120 * i:120 * (i + 1)]})
    return series


def datasets():
    from gluonts.dataset.common import ListDataset

    series = monthly_series()
    train = ListDataset([dict(s, target=s["target"][:-PREDICTION_LENGTH]) for s in series], freq="M")
    test = ListDataset(series, freq="M")
    return train, test


class Windows(pl.Callback):
    """The first training windows this rank drew (digest of the first batches' past targets)."""

    def __init__(self, batches: int = 3) -> None:
        self.batches, self.digests = batches, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if len(self.digests) < self.batches:
            self.digests.append(hashlib.sha256(batch["past_target"].numpy().tobytes()).hexdigest())


class Averages(pl.Callback):
    """After IterationAveraging: the digest of the average at each epoch end (what an epoch-end checkpoint holds)."""

    def __init__(self, cb: IterationAveraging) -> None:
        self.cb, self.by_epoch = cb, {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        averaged = self.cb.averager.averaged_state_dict()
        self.by_epoch[trainer.current_epoch] = None if averaged is None else digest(averaged)


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(k for k, v in tensors.items() if v.is_floating_point()):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().clone().numpy().tobytes())
    return h.hexdigest()


def trainer_kwargs(root: Path, devices: int, epochs: int, callbacks: list) -> dict:
    kwargs = dict(max_epochs=epochs, accelerator="cpu", devices=devices, callbacks=callbacks, logger=False,
                  default_root_dir=str(root),  # GluonTS's ModelCheckpoint writes to root/checkpoints
                  enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=10.0)
    if devices > 1:
        kwargs["strategy"] = "ddp"
    return kwargs


def windows_check(args, train) -> dict:
    """SimpleFeedForward with EMA averaging, trained twice: without and with ``RankSeeding``."""
    from gluonts.torch import SimpleFeedForwardEstimator

    out = {}
    for label, extra in (("plain", []), ("seeded", [RankSeeding()])):
        np.random.seed(1)
        torch.manual_seed(1)
        cb = IterationAveraging(iteravg.EMASchedule(decay=0.9), monitor=None)
        averages, probe = Averages(cb), Windows()
        estimator = SimpleFeedForwardEstimator(
            prediction_length=PREDICTION_LENGTH, hidden_dimensions=[16], batch_size=16, num_batches_per_epoch=3,
            trainer_kwargs=trainer_kwargs(args.out / label, args.devices, 2, [cb, averages, probe, *extra]))
        output = estimator.train_model(train)
        best = output.trainer.checkpoint_callback.best_model_path
        best_epoch = int(Path(best).name.split("epoch=")[1].split("-")[0])
        out[label] = dict(windows=probe.digests, predictor_sha=digest(output.predictor.prediction_net.state_dict()),
                          best_epoch_average=averages.by_epoch.get(best_epoch))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--windows-check", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from gluonts.evaluation import Evaluator, make_evaluation_predictions
    from gluonts.model.predictor import Predictor
    from gluonts.torch import DeepAREstimator

    train, test = datasets()
    result: dict = {}
    if args.windows_check:
        result["windows_check"] = windows_check(args, train)

    pl.seed_everything(args.seed, verbose=False)
    # NTA on the epoch's training loss (no validation data: GluonTS's rule); the fallback starts averaging by mid-run
    # at the latest, so the forecast always comes from an average of many iterates.
    cb = IterationAveraging(iteravg.NTASchedule(epochs=args.epochs, n=2, fallback_alpha=0.5), monitor="val_loss")
    probe, averages = Windows(), Averages(cb)
    extra = [RankSeeding()] if args.devices > 1 else []
    estimator = DeepAREstimator(
        freq="M", prediction_length=PREDICTION_LENGTH, context_length=24, num_layers=1, hidden_size=24,
        dropout_rate=0.0, batch_size=32, num_batches_per_epoch=15, lr=3e-3, num_parallel_samples=200,
        trainer_kwargs=trainer_kwargs(args.out / "deepar", args.devices, args.epochs, [cb, averages, probe, *extra]))
    output = estimator.train_model(train)
    rank = dist.get_rank() if dist.is_initialized() else 0
    best = output.trainer.checkpoint_callback.best_model_path
    best_epoch = int(Path(best).name.split("epoch=")[1].split("-")[0])
    result.update(rank=rank, world=cb.averager.comm.size, comm=cb.averager.comm.name, windows=probe.digests,
                  trigger_epoch=cb.schedule.trigger_epoch, counter=cb.averager.average_counter,
                  averaged_sha=digest(cb.averager.averaged_state_dict()), best_epoch=best_epoch,
                  best_epoch_average=averages.by_epoch.get(best_epoch),
                  predictor_sha=digest(output.predictor.prediction_net.state_dict()))
    if rank == 0:
        folder = args.out / "predictor"
        folder.mkdir(parents=True, exist_ok=True)
        output.predictor.serialize(folder)
        predictor = Predictor.deserialize(folder)
        result["deserialized_sha"] = digest(predictor.prediction_net.state_dict())
        torch.manual_seed(0)
        np.random.seed(0)
        forecasts, series = make_evaluation_predictions(test, predictor=predictor, num_samples=200)
        metrics, _ = Evaluator(quantiles=(0.1, 0.5, 0.9), num_workers=0)(series, forecasts)
        result["metrics"] = {k: float(metrics[k]) for k in ("mean_wQuantileLoss", "MASE", "MSE")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
