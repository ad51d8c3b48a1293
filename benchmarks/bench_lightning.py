"""What averaging costs per training step inside Lightning's loop: no averaging vs
``iteravg.lightning.IterationAveraging`` vs Lightning's own ``EMAWeightAveraging``, side by side in one run (one
process, CPU).

Two models: a deep, narrow MLP (``narrow``: 24 Linear layers of width 64, 48 tensors, ~0.1 M parameters -- per-tensor
overhead dominates, as in most GluonTS models) and a wide one (``wide``: 4 Linear layers of width 1024, ~2.1 M
parameters -- memory traffic dominates). Each variant is a fresh ``lightning.Trainer.fit`` of ``--epochs`` epochs of
``--steps`` SGD steps (batch 64), the first epoch warm-up; a step's time is the interval between consecutive
``on_train_batch_end`` calls of the last callback (one whole loop iteration: data, forward, backward, optimizer step,
every callback's fold). The steps of ``--reps`` repetitions, whose variant order is shuffled, are pooled, and the median
is reported twice: the **CPU time** this process spent on a step (``time.process_time``; one thread, so it does not
count time other processes on a shared machine took from it -- the robust measure of what averaging costs) and the
wall time:

* ``none``           -- no averaging callback
* ``iteravg-ema``    -- ``IterationAveraging(EMASchedule(decay=0.999, warmup=False))``: a fold every step
* ``iteravg-poly``   -- ``IterationAveraging(Schedule(eta=0))`` started before the first step: a fold every step
* ``iteravg-nocheck``-- as ``iteravg-ema`` with ``check_finite=False`` (no NaN/inf check per fold)
* ``lightning-ema``  -- ``lightning.pytorch.callbacks.EMAWeightAveraging(decay=0.999)``: an update every step

Ratios are per-step times over ``none``'s (1.00 = free). The epoch-end work (trigger, sync) is once per epoch and not
counted.

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
    """Placed last: from one ``on_train_batch_end`` of the last callback to the next -- one whole loop iteration (data,
    forward, backward, optimizer step, every callback's fold) -- after the first epoch; CPU time of this process and
    wall time."""

    def __init__(self) -> None:
        self.cpu: List[float] = []
        self.wall: List[float] = []
        self._last = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None  # the epoch boundary (and the epoch-end hooks) is not a step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = (time.process_time(), time.perf_counter())
        if self._last is not None and trainer.current_epoch > 0:
            self.cpu.append(now[0] - self._last[0])
            self.wall.append(now[1] - self._last[1])
        self._last = now


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


def measure(model: str, variant: str, epochs: int, steps: int) -> StepTimer:
    torch.manual_seed(0)
    x = torch.randn(steps * BATCH, 32)
    data = DataLoader(TensorDataset(x, x[:, :1].sin()), batch_size=BATCH)
    timer = StepTimer()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[*variant_callbacks(variant), timer])
    trainer.fit(Module(MODELS[model]()), data)
    return timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", default="narrow,wide")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.steps, args.reps = 2, 30, 1
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, lightning {pl.__version__}, {args.reps} reps x {args.epochs - 1} timed epochs "
          f"x {args.steps} steps, batch {BATCH}, 1 thread; per-step CPU and wall time, medians")
    for model in args.models.split(","):
        n_tensors = sum(1 for _ in MODELS[model]().parameters())
        n_params = sum(p.numel() for p in MODELS[model]().parameters())
        cpu: Dict[str, List[float]] = {v: [] for v in VARIANTS}
        wall: Dict[str, List[float]] = {v: [] for v in VARIANTS}
        rng = random.Random(0)
        for _ in range(args.reps):
            order = list(VARIANTS)
            rng.shuffle(order)
            for variant in order:
                timer = measure(model, variant, args.epochs, args.steps)
                cpu[variant].extend(timer.cpu)
                wall[variant].extend(timer.wall)
        print(f"\n{model}: {n_tensors} tensors, {n_params / 1e6:.2f} M parameters, {len(cpu['none'])} timed steps "
              "per variant")
        print(f"  {'variant':<16} {'CPU ms':>8} {'ratio':>6} {'wall ms':>8} {'ratio':>6}")
        base_cpu, base_wall = statistics.median(cpu["none"]), statistics.median(wall["none"])
        for variant in VARIANTS:
            c, w = statistics.median(cpu[variant]), statistics.median(wall[variant])
            print(f"  {variant:<16} {c * 1e3:8.3f} {c / base_cpu:6.2f} {w * 1e3:8.3f} {w / base_wall:6.2f}")


if __name__ == "__main__":
    main()
