"""A complete GluonTS training script that runs unchanged on one process, under horovodrun and under mpirun.

    python examples/gluonts_train.py --out runs/gluonts-1                                  # one process
    horovodrun -np 2 -H localhost:2 python examples/gluonts_train.py --out runs/gluonts-2    # Horovod (MPI)
    horovodrun --gloo -np 2 -H localhost:2 python examples/gluonts_train.py --out runs/g3   # Horovod (Gloo)
    mpirun -np 2 --bind-to none python examples/gluonts_train.py --out runs/gluonts-4       # Horovod, else mpi4py
    ITERAVG_COMM=mpi mpirun -np 2 --bind-to none python examples/gluonts_train.py --out runs/gluonts-5

Compared with a plain GluonTS script, two imports changed (``Trainer`` from ``iteravg.gluonts``, the averaging
classes from ``iteravg.mx``) and files are written on rank 0 only (``is_root()``). The data are synthetic, so the
script needs no download; put your own ``ListDataset`` in ``make_data``.

Add ``--resume`` to continue a finished run: the averaging state comes back from the checkpoint directory and the
network is warm-started from the saved predictor (GluonTS's Trainer has no optimizer-state resume).
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import mxnet as mx
import numpy as np
import pandas as pd
from gluonts.dataset.common import ListDataset
from gluonts.evaluation import make_evaluation_predictions
from gluonts.model.predictor import Predictor
from gluonts.mx import DeepAREstimator, SimpleFeedForwardEstimator

from iteravg.gluonts import Trainer, is_root  # was: from gluonts.mx.trainer import Trainer
from iteravg.mx import NTA, ModelIterationAveraging  # was: gluonts.mx.trainer.model_iteration_averaging

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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/gluonts"))
    ap.add_argument("--model", choices=["sff", "deepar"], default="sff")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batches", type=int, default=25, help="batches per epoch, per rank")
    ap.add_argument("--batch-size", type=int, default=32, help="windows per batch, per rank")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    mx.random.seed(0)  # the same seed everywhere: iteravg derives each rank's own data stream from rank 0's
    np.random.seed(0)
    random.seed(0)

    averaging = ModelIterationAveraging(NTA(epochs=args.epochs, n=5), checkpoint_dir=args.out / "checkpoints",
                                        resume=args.resume)
    trainer = Trainer(ctx="cpu", epochs=args.epochs, num_batches_per_epoch=args.batches, learning_rate=1e-3,
                      callbacks=[averaging])
    if args.model == "sff":
        estimator = SimpleFeedForwardEstimator(num_hidden_dimensions=[40, 40], prediction_length=PREDICTION_LENGTH,
                                               context_length=48, batch_size=args.batch_size, trainer=trainer)
    else:
        estimator = DeepAREstimator(freq=FREQ, prediction_length=PREDICTION_LENGTH, context_length=48,
                                    batch_size=args.batch_size, trainer=trainer)
    train, test = make_data()
    predictor_dir = args.out / "predictor"
    if args.resume:
        predictor = estimator.train_from(Predictor.deserialize(predictor_dir), train)
    else:
        predictor = estimator.train(train)  # the network now holds the averaged model on every rank

    if is_root():  # one writer: every rank holds the same network
        predictor_dir.mkdir(parents=True, exist_ok=True)
        predictor.serialize(predictor_dir)
        forecasts, series = make_evaluation_predictions(test, predictor=Predictor.deserialize(predictor_dir))
        mse = np.mean([np.mean((f.mean - np.asarray(s).reshape(-1)[-PREDICTION_LENGTH:]) ** 2)
                       for f, s in zip(forecasts, series)])
        strategy = averaging.avg_strategy
        print(f"ranks={strategy.comm.size} ({strategy.comm.name})  averaged over {strategy.average_counter} "
              f"iterates  held-out forecast MSE={mse:.4f}  predictor: {predictor_dir}")


if __name__ == "__main__":
    main()
