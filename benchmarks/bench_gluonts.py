"""GluonTS estimators with iteravg: data-parallel throughput, and what averaging costs inside GluonTS's Trainer.

Table 1 -- samples per second of SimpleFeedForwardEstimator trained by ``iteravg.gluonts.Trainer`` on 1 process and
on 2 ranks (``horovodrun`` with Horovod's default cycle time and with ``--cycle-time-ms 0.1``, and ``mpirun`` with
mpi4py), one thread each (``OMP_NUM_THREADS=1``). Each rank trains
``--batches`` batches of ``--batch-size`` windows per epoch; samples/s = ranks * batches * batch_size / epoch time
(the first epoch, with hybridisation, is left out; median epoch, then median of ``--reps`` alternating launches).

Table 2 -- the end-to-end cost of an epoch inside GluonTS's ``Trainer`` (one process) with no averaging, with
GluonTS's ``ModelIterationAveraging`` and with iteravg's, for networks of about 40 and 200 tensors (a deep, narrow
SimpleFeedForward: per-tensor overhead dominates, as in most GluonTS models). Averaging runs on every batch from
the second epoch (``Alpha_Suffix(alpha=1)``); epochs 2.. are timed, variants alternate, medians are reported.

    python benchmarks/bench_gluonts.py            # both tables (launches its own horovodrun / mpirun jobs)
    python benchmarks/bench_gluonts.py --quick    # fewer batches and repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

warnings.simplefilter("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def dataset() -> Any:
    import numpy as np
    import pandas as pd
    from gluonts.dataset.common import ListDataset

    rng = np.random.default_rng(0)
    t = np.arange(400)
    values = [np.sin(t / 7.0 + p) + 0.3 * rng.standard_normal(len(t)) for p in rng.uniform(0, 6, 16)]
    start = pd.Period("2020-01-01 00:00", freq="1H")
    return ListDataset([{"target": v, "start": start} for v in values], freq="1H")


def epoch_timer():
    from gluonts.mx.trainer.callback import Callback

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.starts: List[float] = []
            self.times: List[float] = []

        def on_train_epoch_start(self, training_network: Any) -> None:
            self.starts.append(time.perf_counter())

        def on_epoch_end(self, epoch_no, epoch_loss, training_network, trainer, best_epoch_info, ctx) -> bool:
            self.times.append(time.perf_counter() - self.starts[-1])
            return True

    return EpochTimer()


def train(trainer_cls: Any, hidden: List[int], callbacks: List[Any], epochs: int, batches: int,
          batch_size: int) -> List[float]:
    import mxnet as mx
    import numpy as np
    from gluonts.mx import SimpleFeedForwardEstimator

    from gluonts.core.settings import let
    from gluonts.env import env

    mx.random.seed(0)
    np.random.seed(0)
    random.seed(0)
    timer = epoch_timer()
    trainer = trainer_cls(ctx="cpu", epochs=epochs, num_batches_per_epoch=batches, learning_rate=1e-3,
                          callbacks=[timer, *callbacks], add_default_callbacks=False)
    est = SimpleFeedForwardEstimator(num_hidden_dimensions=hidden, prediction_length=12, context_length=48,
                                     batch_size=batch_size, trainer=trainer)
    with let(env, use_tqdm=False):
        est.train(dataset())
    return timer.times


def tensors(hidden: List[int]) -> int:
    """Parameter arrays of SimpleFeedForward's network with these hidden layers (counted on a built network)."""
    from gluonts.mx import SimpleFeedForwardEstimator
    from gluonts.mx.trainer import Trainer

    est = SimpleFeedForwardEstimator(num_hidden_dimensions=hidden, prediction_length=12, context_length=48,
                                     trainer=Trainer(ctx="cpu", epochs=1))
    return len(list(est.create_training_network().collect_params().values()))


# -- table 1: throughput, one worker per rank -----------------------------------------------------------------
def throughput_worker(args: argparse.Namespace) -> None:
    from iteravg.comm import get_comm
    from iteravg.gluonts import Trainer

    times = train(Trainer, [40, 40], [], args.epochs, args.batches, args.batch_size)
    comm = get_comm()
    per_epoch = sorted(times[1:])[len(times[1:]) // 2]
    if comm.rank == 0:
        rate = comm.size * args.batches * args.batch_size / per_epoch
        print("RESULT " + json.dumps({"comm": comm.name, "size": comm.size, "epoch_s": per_epoch, "samples_s": rate}),
              flush=True)


def launch(kind: str, args: argparse.Namespace) -> Dict[str, Any]:
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", "--epochs", str(args.epochs),
          "--batches", str(args.batches), "--batch-size", str(args.batch_size)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONWARNINGS="ignore")
    for key in ("ITERAVG_COMM", "HOROVOD_RANK", "OMPI_COMM_WORLD_SIZE"):
        env.pop(key, None)
    if kind == "1 process":
        cmd = me[1:]
        cmd.insert(0, sys.executable)
    elif kind.startswith("horovodrun -np 2"):
        cycle = ["--cycle-time-ms", kind.rsplit(" ", 1)[1]] if "cycle" in kind else []
        cmd = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", *cycle, *me]
    else:
        cmd = [shutil.which("mpirun") or "mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", *me]
        env["ITERAVG_COMM"] = "mpi"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if "RESULT " in line:
            return json.JSONDecoder().raw_decode(line.split("RESULT ", 1)[1])[0]  # launchers may append output
    raise RuntimeError(f"{kind} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


# -- table 2: averaging inside GluonTS's Trainer --------------------------------------------------------------
def averaging_cost(args: argparse.Namespace) -> List[Dict[str, Any]]:
    from gluonts.mx.trainer import Trainer
    from gluonts.mx.trainer import model_iteration_averaging as gl

    import iteravg.mx as ours

    epochs = 3
    rows = []
    for depth in args.depths:
        hidden = [16] * depth
        results: Dict[str, List[float]] = {"none": [], "gluonts": [], "iteravg": []}
        for _ in range(args.reps):
            for name in results:
                if name == "none":
                    cbs: List[Any] = []
                elif name == "gluonts":
                    cbs = [gl.ModelIterationAveraging(avg_strategy=gl.Alpha_Suffix(epochs=epochs, alpha=1.0))]
                else:
                    cbs = [ours.ModelIterationAveraging(ours.Alpha_Suffix(epochs=epochs, alpha=1.0))]
                results[name].extend(train(Trainer, hidden, cbs, epochs, args.avg_batches, 32)[1:])
        med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
        rows.append({"tensors": tensors(hidden), "none": med["none"], "gluonts": med["gluonts"],
                     "iteravg": med["iteravg"]})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--avg-batches", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--depths", type=int, nargs="+", default=[18, 98], help="hidden layers (42 and 202 tensors)")
    args = ap.parse_args()
    if args.worker:
        throughput_worker(args)
        return 0
    if args.quick:
        args.batches, args.reps, args.avg_batches = 20, 1, 10
    print(f"Table 1: SimpleFeedForward [40, 40], batch {args.batch_size} per rank, {args.batches} batches per rank "
          f"per epoch, OMP_NUM_THREADS=1 per rank; median of {args.reps} alternating launches")
    print(f"{'run':<38}{'epoch s':>10}{'samples/s':>12}{'vs 1 process':>14}")
    kinds = ("1 process", "horovodrun -np 2", "horovodrun -np 2 --cycle-time-ms 0.1", "mpirun -np 2 (mpi4py)")
    runs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in kinds}
    for _ in range(args.reps):  # alternating, so that a change in the machine's load hits every kind
        for kind in kinds:
            runs[kind].append(launch(kind, args))
    base = None
    for kind in kinds:
        r = sorted(runs[kind], key=lambda x: x["epoch_s"])[len(runs[kind]) // 2]
        base = base or r["samples_s"]
        print(f"{kind:<38}{r['epoch_s']:>10.3f}{r['samples_s']:>12.0f}{r['samples_s'] / base:>13.2f}x", flush=True)
    print()
    print(f"Table 2: one epoch inside GluonTS's Trainer ({args.avg_batches} batches of 32, averaging every batch), "
          f"median of {args.reps * 2} epochs")
    print(f"{'tensors':>8}{'none s':>10}{'GluonTS s':>12}{'iteravg s':>12}{'GluonTS +%':>12}{'iteravg +%':>12}")
    for row in averaging_cost(args):
        n, g, i = row["none"], row["gluonts"], row["iteravg"]
        print(f"{row['tensors']:>8}{n:>10.3f}{g:>12.3f}{i:>12.3f}"
              f"{100 * (g / n - 1):>11.0f}%{100 * (i / n - 1):>11.0f}%",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
