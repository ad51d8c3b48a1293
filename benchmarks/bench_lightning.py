"""What averaging costs per training step inside Lightning's loop: no averaging vs ``iteravg.lightning.IterationAveraging``
vs Lightning's own ``EMAWeightAveraging``, measured side by side in one run (one process, CPU).

Two models: a deep, narrow MLP (``narrow``: 24 Linear layers of width 64, 48 tensors, ~0.1 M parameters -- per-tensor
overhead dominates, as in most GluonTS models) and a wide one (``wide``: 4 Linear layers of width 1024, ~2.1 M
parameters -- memory traffic dominates). Variants, each a fresh ``lightning.Trainer.fit`` of ``--epochs`` epochs of
``--steps`` SGD steps (batch 64); the first epoch is warm-up, a step's time is the epoch's batch loop (epoch start to the
last ``on_train_batch_end`` of every callback, folds included) divided by its steps, median over the timed epochs, then
median over ``--reps`` repetitions whose variant order is shuffled:

* ``none``           -- no averaging callback
* ``iteravg-ema``    -- ``IterationAveraging(EMASchedule(decay=0.999, warmup=False))``: a fold every step
* ``iteravg-poly``   -- ``IterationAveraging(Schedule(eta=0))`` started before the first step: a fold every step
* ``iteravg-nocheck``-- as ``iteravg-ema`` with ``check_finite=False`` (no NaN/inf check per fold)
* ``lightning-ema``  -- ``lightning.pytorch.callbacks.EMAWeightAveraging(decay=0.999)``: an update every step

Ratios are per-step times over ``none``'s (1.00 = free).

    python benchmarks/bench_lightning.py            # both models, 3 repetitions
    python benchmarks/bench_lightning.py --quick    # fewer steps and repetitions
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import warnings
from typing import Callable, Dict, List

warnings.simplefilter("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import logging  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning.pytorch as pl  # noqa: E402

import iteravg  # noqa: E402
from iteravg.lightning import IterationAveraging  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
BATCH = 64

MODELS: Dict[str, Callable[[], nn.Module]] = {
    "narrow": lambda: nn.Sequential(nn.Linear(32, 64), *[m for _ in range(22) for m in (nn.ReLU(), nn.Linear(64, 64))],
                                    nn.ReLU(), nn.Linear(64, 1)),
    "wide": lambda: nn.Sequential(nn.Linear(32, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                  nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1)),
}


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class StepTimer(pl.Callback):
    """Placed last: from the epoch's start to the last on_train_batch_end of every callback, per step."""

    def __init__(self) -> None:
        self.per_step: List[float] = []
        self._start = 0.0
        self._last = 0.0
        self._steps = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last, self._steps = time.perf_counter(), self._steps + 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.per_step.append((self._last - self._start) / self._steps)


def variant_callbacks(name: str) -> list:
    if name == "none":
        return []
    if name == "iteravg-ema":
        return [IterationAveraging(iteravg.EMASchedule(decay=0.999, warmup=False), monitor=None)]
    if name == "iteravg-nocheck":
        return [IterationAveraging(iteravg.EMASchedule(decay=0.999, warmup=False), monitor=None, check_finite=False)]
    if name == "iteravg-poly":
        schedule = iteravg.Schedule(eta=0)
        schedule.averaging_started = True
        return [IterationAveraging(schedule, monitor=None)]
    if name == "lightning-ema":
        return [pl.callbacks.EMAWeightAveraging(decay=0.999)]
    raise ValueError(name)


VARIANTS = ("none", "iteravg-ema", "iteravg-poly", "iteravg-nocheck", "lightning-ema")


def measure(model: str, variant: str, epochs: int, steps: int) -> float:
    torch.manual_seed(0)
    x = torch.randn(steps * BATCH, 32)
    data = DataLoader(TensorDataset(x, x[:, :1].sin()), batch_size=BATCH)
    timer = StepTimer()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[*variant_callbacks(variant), timer])
    trainer.fit(Module(MODELS[model]()), data)
    return statistics.median(timer.per_step[1:])  # the first epoch warms up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", default="narrow,wide")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.steps, args.reps = 3, 30, 1
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, lightning {pl.__version__}, {args.reps} reps x {args.epochs - 1} timed epochs "
          f"x {args.steps} steps, batch {BATCH}, 1 thread")
    for model in args.models.split(","):
        n_tensors = sum(1 for _ in MODELS[model]().parameters())
        n_params = sum(p.numel() for p in MODELS[model]().parameters())
        times: Dict[str, List[float]] = {v: [] for v in VARIANTS}
        rng = random.Random(0)
        for _ in range(args.reps):
            order = list(VARIANTS)
            rng.shuffle(order)
            for variant in order:
                times[variant].append(measure(model, variant, args.epochs, args.steps))
        base = statistics.median(times["none"])
        print(f"\n{model}: {n_tensors} tensors, {n_params / 1e6:.2f} M parameters")
        print(f"  {'variant':<16} {'ms/step':>8} {'ratio':>6}")
        for variant in VARIANTS:
            t = statistics.median(times[variant])
            print(f"  {variant:<16} {t * 1e3:8.3f} {t / base:6.2f}")


if __name__ == "__main__":
    main()
