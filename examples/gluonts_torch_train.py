"""A GluonTS PyTorch estimator (DeepAR from ``gluonts.torch``, trained by Lightning) with iteration averaging, on one
process or data-parallel under Lightning's DDP.

    python examples/gluonts_torch_train.py --out runs/gt-1                   # one process
    python examples/gluonts_torch_train.py --out runs/gt-2 --devices 2       # DDP: Lightning starts the 2nd process
    torchrun --nproc_per_node=2 examples/gluonts_torch_train.py --out runs/gt-3 --devices 2   # or torchrun starts both

Compared with a plain GluonTS script, ``trainer_kwargs`` gains two callbacks: ``IterationAveraging`` (NT-ASGD here:
averaging starts when the epoch loss stops improving, decided alike on every rank) and ``RankSeeding`` (each rank
draws its own training windows; without it every rank trains on the same ones). Files are written on rank 0 only. The
data are synthetic, so the script needs no download; put your own ``ListDataset`` in ``make_data``.

Under DDP, ``batch_size`` and ``num_batches_per_epoch`` are per process: an epoch sees ``devices`` times more windows,
and each step averages the processes' gradients.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from gluonts.dataset.common import ListDataset
from gluonts.evaluation import Evaluator, make_evaluation_predictions
from gluonts.model.predictor import Predictor
from gluonts.torch import DeepAREstimator

import iteravg
from iteravg.gluonts import is_root
from iteravg.lightning import IterationAveraging, RankSeeding

FREQ = "1H"
PREDICTION_LENGTH = 12


def make_data(n_series: int = 20, length: int = 400) -> tuple:
    """Noisy daily-and-weekly seasonal series; the last PREDICTION_LENGTH points of each are held out."""
    rng = np.random.default_rng(0)
    t = np.arange(length)
    values = [10 + 3 * np.sin(2 * np.pi * t / 24 + p) + np.sin(2 * np.pi * t / 168) + rng.standard_normal(length)
              for p in rng.uniform(0, 2 * np.pi, n_series)]
    start = pd.Period("2021-01-01 00:00", freq=FREQ)
    train = ListDataset([{"target": v[:-PREDICTION_LENGTH], "start": start} for v in values], freq=FREQ)
    test = ListDataset([{"target": v, "start": start} for v in values], freq=FREQ)
    return train, test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gluonts-torch"))
    ap.add_argument("--devices", type=int, default=1, help="processes (Lightning's DDP on CPU when > 1)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batches", type=int, default=25, help="batches per epoch (per process)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    np.random.seed(0)

    train, test = make_data()
    averaging = IterationAveraging(iteravg.NTASchedule(epochs=args.epochs, n=5), monitor="val_loss")
    trainer_kwargs = {
        "max_epochs": args.epochs,
        "callbacks": [averaging, RankSeeding()],
        "accelerator": "cpu",
        "devices": args.devices,
        "default_root_dir": str(args.out / "lightning"),
        "logger": False,
        "enable_progress_bar": False,
    }
    if args.devices > 1:
        trainer_kwargs["strategy"] = "ddp"
    estimator = DeepAREstimator(freq=FREQ, prediction_length=PREDICTION_LENGTH, context_length=48, num_layers=1,
                                hidden_size=24, batch_size=32, num_batches_per_epoch=args.batches, lr=3e-3,
                                trainer_kwargs=trainer_kwargs)
    predictor = estimator.train(train)  # the averaged model (see docs/lightning.md, "GluonTS's PyTorch estimators")

    if not is_root():  # every rank holds the same predictor; rank 0 writes and evaluates it
        return
    (args.out / "predictor").mkdir(parents=True, exist_ok=True)
    predictor.serialize(args.out / "predictor")
    predictor = Predictor.deserialize(args.out / "predictor")
    forecasts, series = make_evaluation_predictions(test, predictor=predictor, num_samples=100)
    metrics, _ = Evaluator(quantiles=(0.1, 0.5, 0.9), num_workers=0)(series, forecasts)
    schedule = averaging.schedule
    report = {"processes": averaging.averager.comm.size, "trigger_epoch": schedule.trigger_epoch,
              "averaged_iterates": schedule.average_counter,
              "mean_wQuantileLoss": float(metrics["mean_wQuantileLoss"]), "MASE": float(metrics["MASE"])}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
