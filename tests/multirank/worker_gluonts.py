"""A GluonTS user's training script, run by the multi-rank tests: one process, horovodrun or mpirun, unchanged.

Usage: worker_gluonts.py OUT [--estimator sff|deepar ...] [--batch-size B] [--epochs E] [--plain] [--resume]
    [--defaults] [--nan-batch RANK:I,J,...]

Trains each estimator on synthetic series with ``iteravg.gluonts.Trainer`` (``--plain``: GluonTS's own Trainer)
and iteravg's ``ModelIterationAveraging`` (checkpoints in OUT/<estimator>/ckpt). Every rank writes, into
OUT/<estimator>/:

* ``rank{r}-last.bin`` / ``rank{r}-avg.bin``: the bytes of every parameter of the last training iterate
  (captured at ``on_train_end`` before the averaged model is loaded) and of the final (averaged) network;
* ``rank{r}.json``: communicator, per-epoch losses and learning rates as the callbacks saw them, averaging
  counter, trigger and, on rank 0, the forecast MSE of the predictor written by ``serialize`` and read back
  with GluonTS's ``Predictor.deserialize``.

``--defaults`` trains without the averaging callback and without validation data, so that GluonTS's default
``ModelAveraging`` picks the best epoch by training loss; ``--nan-batch`` gives some batches of one rank a NaN
target. ``--resume`` then trains again with ``ModelIterationAveraging(..., resume=True)``, warm-started from rank
0's serialised predictor (``estimator.train_from``), and records the same files with the prefix ``resumed-``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List

warnings.simplefilter("ignore")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

PRED = 6
FREQ = "1H"


def series(n: int = 12, length: int = 160) -> List[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(length)
    return [np.sin(t / 5.0 + phase) * (1 + 0.2 * k % 3) + 0.25 * rng.standard_normal(length)
            for k, phase in enumerate(rng.uniform(0, 6, n))]


def dataset(values: List[np.ndarray]) -> Any:
    from gluonts.dataset.common import ListDataset

    start = pd.Period("2020-01-01 00:00", freq=FREQ)
    return ListDataset([{"target": v, "start": start} for v in values], freq=FREQ)


def params_bytes(net: Any) -> bytes:
    return b"".join(np.ascontiguousarray(p.data().asnumpy()).view(np.uint8).tobytes()
                    for p in net.collect_params().values())


def make_recorder():
    from gluonts.mx.trainer.callback import Callback

    class Recorder(Callback):
        """Records what the callbacks see, and the last iterate before the averaged model replaces it."""

        def __init__(self) -> None:
            self.losses: List[float] = []
            self.lrs: List[float] = []
            self.epoch_hashes: List[str] = []  # the network GluonTS saved for each epoch
            self.files: List[bool] = []  # whether this rank has the best epoch's parameter file
            self.last = b""

        def on_epoch_end(self, epoch_no, epoch_loss, training_network, trainer, best_epoch_info, ctx) -> bool:
            self.losses.append(float(epoch_loss))
            self.lrs.append(float(trainer.learning_rate))
            self.epoch_hashes.append(hashlib.sha256(params_bytes(training_network)).hexdigest())
            self.files.append(os.path.exists(str(best_epoch_info.get("params_path"))))
            return True

        def on_train_end(self, training_network, temporary_dir=None, ctx=None) -> None:
            self.last = params_bytes(training_network)

    return Recorder()


def estimator(kind: str, trainer: Any, batch_size: int) -> Any:
    if kind == "sff":
        from gluonts.mx import SimpleFeedForwardEstimator

        return SimpleFeedForwardEstimator(num_hidden_dimensions=[24], prediction_length=PRED, context_length=18,
                                          batch_size=batch_size, trainer=trainer)
    from gluonts.mx import DeepAREstimator

    return DeepAREstimator(freq=FREQ, prediction_length=PRED, context_length=12, num_layers=1, num_cells=12,
                           batch_size=batch_size, trainer=trainer)


def forecast_mse(predictor: Any, values: List[np.ndarray]) -> float:
    from gluonts.evaluation import make_evaluation_predictions

    test = dataset(values)
    forecasts, truths = make_evaluation_predictions(test, predictor=predictor, num_samples=50)
    errs = []
    for f, ts in zip(forecasts, truths):
        truth = np.asarray(ts).reshape(-1)[-PRED:]
        errs.append(np.mean((f.mean - truth) ** 2))
    return float(np.mean(errs))


def poison(est: Any, rank: int, indices: set) -> None:
    """Fault injection: on ``rank``, the training batches numbered ``indices`` (from 0) get a NaN target, so GluonTS
    skips them there (their loss is not finite) while the other ranks step."""
    from iteravg.comm import get_comm

    if get_comm().rank != rank:
        return
    make_loader = est.create_training_data_loader

    class Poisoned:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.count = 0

        def __iter__(self):
            for batch in self.inner:
                if self.count in indices:
                    batch = dict(batch, future_target=batch["future_target"] * float("nan"))
                self.count += 1
                yield batch

    est.create_training_data_loader = lambda data, **kw: Poisoned(make_loader(data, **kw))


def train_once(args: argparse.Namespace, kind: str, out: Path, prefix: str, resume: bool) -> Dict[str, Any]:
    from gluonts.model.predictor import Predictor
    from gluonts.mx.trainer import Trainer as GluonTSTrainer

    import iteravg.gluonts as ig
    from iteravg.mx import NTA, ModelIterationAveraging

    Trainer = GluonTSTrainer if args.plain else ig.Trainer
    mx.random.seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    strategy = NTA(epochs=args.epochs * (2 if resume else 1), n=1, fallback_alpha=0.5)
    callback = ModelIterationAveraging(strategy, checkpoint_dir=out / "ckpt", resume=resume)
    recorder = make_recorder()
    callbacks = [recorder] if args.defaults else [recorder, callback]  # --defaults: GluonTS's ModelAveraging
    trainer = Trainer(ctx="cpu", epochs=args.epochs, num_batches_per_epoch=args.batches, learning_rate=args.lr,
                      hybridize=True, callbacks=callbacks)
    values = series()
    train_values = [v[:-PRED] for v in values]
    est = estimator(kind, trainer, args.batch_size)
    if args.nan_batch:
        rank, indices = args.nan_batch.split(":")
        poison(est, int(rank), {int(i) for i in indices.split(",")})
    if resume:
        warm = Predictor.deserialize(out / "predictor")
        predictor = est.train_from(warm, dataset(train_values), dataset(train_values))
    elif args.defaults:  # no validation data: epochs are scored by training losses, which differ per rank
        predictor = est.train(dataset(train_values))
    else:
        predictor = est.train(dataset(train_values), dataset(train_values))
    comm = strategy.comm
    net = predictor.prediction_net
    (out / f"{prefix}rank{comm.rank}-last.bin").write_bytes(recorder.last)
    (out / f"{prefix}rank{comm.rank}-avg.bin").write_bytes(params_bytes(net))
    record: Dict[str, Any] = {"comm": comm.name, "size": comm.size, "rank": comm.rank, "losses": recorder.losses,
                              "lrs": recorder.lrs, "epoch_hashes": recorder.epoch_hashes, "files": recorder.files,
                              "final_hash": hashlib.sha256(params_bytes(net)).hexdigest(),
                              "average_counter": strategy.average_counter,
                              "started": strategy.averaging_started,
                              "resumed_epoch": (callback.resumed_state or {}).get("epoch")}
    if ig.is_root():
        path = out / f"{prefix}predictor"
        path.mkdir(parents=True, exist_ok=True)
        predictor.serialize(path)
        record["mse"] = forecast_mse(Predictor.deserialize(path), values)
    (out / f"{prefix}rank{comm.rank}.json").write_text(json.dumps(record))
    from iteravg import collectives

    collectives.finish(comm)  # a barrier: rank 0's predictor is on disk before anybody reads it
    return record


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--estimator", nargs="+", default=["sff", "deepar"], choices=["sff", "deepar"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--plain", action="store_true", help="GluonTS's own Trainer (the guarded old path)")
    ap.add_argument("--resume", action="store_true", help="then train again, resuming the averaging state")
    ap.add_argument("--defaults", action="store_true", help="no averaging callback: GluonTS's default callbacks")
    ap.add_argument("--nan-batch", default="", help="RANK:I,J,... -- those batches of that rank have a NaN target")
    args = ap.parse_args()
    for kind in args.estimator:
        out = Path(args.out) / kind
        out.mkdir(parents=True, exist_ok=True)
        train_once(args, kind, out, "", resume=False)
        if args.resume:
            train_once(args, kind, out, "resumed-", resume=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
