"""What ``posthoc=True`` costs per training step and per epoch end, measured side by side in one run.

Per model it times (the compared paths in turn within each repetition, medians), on the same parameters, ``iteravg.Averager.step`` (numpy views) with and without ``posthoc``:
once averaging runs (the fold, plus the float64 sum of the same iterate) and before it starts (the sum and its
NaN/inf check alone), the MXNet callback's ``on_train_batch_end`` with and without it, and ``posthoc_epoch_end`` (one
copy of the sum into the epoch's prefix plus the epoch-end iterate). The sum's own bound: it reads the iterate and
reads and writes the float64 sum, 20 bytes per float32 parameter, at the bandwidth of a large numpy copy measured in
the same run.

    python benchmarks/bench_posthoc.py            # all model shapes
    python benchmarks/bench_posthoc.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from typing import Callable, List, Sequence

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

import iteravg  # noqa: E402
import iteravg.mx as ours  # noqa: E402
from bench_update import bandwidth, dense_net  # noqa: E402  (this directory: the same model and bound)


def median_times(fns: Sequence[Callable[[], object]], reps: int, warmup: int = 2) -> List[float]:
    """Median time of each function, the functions timed in turn within every repetition: on a shared machine a
    burst of load then hits the paths being compared alike, and their ratio stays meaningful."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            mx.nd.waitall()
            t = time.perf_counter()
            fn()
            mx.nd.waitall()
            out.append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times]


def started(posthoc: bool) -> iteravg.Averager:
    schedule = iteravg.Schedule()
    schedule.start(0)
    return iteravg.Averager(schedule, comm="local", posthoc=posthoc)


def run_case(name: str, net: nn.HybridBlock, bw: float, reps: int) -> dict:
    arrays = {k: p.data().asnumpy() for k, p in net.collect_params().items()}
    n = sum(a.size for a in arrays.values())
    plain, with_sums = started(False), started(True)
    before = iteravg.Averager(iteravg.NTASchedule(epochs=100), comm="local", posthoc=True)
    t_step, t_step_ph, t_before = median_times(
        [lambda: plain.step(arrays), lambda: with_sums.step(arrays), lambda: before.step(arrays)], reps)
    (t_epoch_end,) = median_times([lambda: with_sums.posthoc_epoch_end(arrays, 1)], max(3, reps // 4), warmup=1)
    callbacks = []
    for posthoc in (False, True):
        strategy = ours.IterationAveragingStrategy(posthoc=posthoc)
        strategy.averaging_started = True
        callbacks.append(ours.ModelIterationAveraging(strategy))
    hook_plain, hook_ph = median_times([lambda cb=cb: cb.on_train_batch_end(training_network=net) for cb in callbacks],
                                       reps)
    hooks = {False: hook_plain, True: hook_ph}
    bound = 20 * n / bw
    return dict(case=name, params=n, step_ms=t_step * 1e3, step_posthoc_ms=t_step_ph * 1e3,
                step_ratio=t_step_ph / t_step, sum_only_ms=t_before * 1e3, sum_bound_ms=bound * 1e3,
                sum_over_bound=t_before / bound, epoch_end_ms=t_epoch_end * 1e3, hook_ms=hooks[False] * 1e3,
                hook_posthoc_ms=hooks[True] * 1e3, hook_ratio=hooks[True] / hooks[False],
                disk_bytes_per_epoch=8 * n, memory_bytes=8 * n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    reps = 5 if args.quick else 20
    bw = bandwidth()
    print(f"numpy copy bandwidth: {bw / 1e9:.2f} GB/s")
    cases = [("400 tensors, 13.2M params (200 x Dense(256))", lambda: dense_net(200, 256)),
             ("2000 tiny tensors (1000 x Dense(8))", lambda: dense_net(1000, 8)),
             ("8 huge tensors (4 x Dense(1800))", lambda: dense_net(4, 1800))]
    rows = []
    for name, build in cases:
        row = run_case(name, build(), bw, reps)
        rows.append(row)
        print(f"{name}: Averager.step {row['step_ms']:.2f} ms -> with posthoc {row['step_posthoc_ms']:.2f} ms "
              f"({row['step_ratio']:.2f}x) | before the start (sum + check only) {row['sum_only_ms']:.2f} ms = "
              f"{row['sum_over_bound']:.2f}x its bound | on_train_batch_end {row['hook_ms']:.2f} -> "
              f"{row['hook_posthoc_ms']:.2f} ms ({row['hook_ratio']:.2f}x) | posthoc_epoch_end "
              f"{row['epoch_end_ms']:.2f} ms | disk {row['disk_bytes_per_epoch'] / 2**20:.1f} MiB/epoch", flush=True)
    print(f"RATIOS: posthoc step/step = {rows[0]['step_ratio']:.2f}, posthoc hook/hook = {rows[0]['hook_ratio']:.2f}, "
          f"sum/bound = {rows[0]['sum_over_bound']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth_gbps=bw / 1e9, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
