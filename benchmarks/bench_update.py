"""One averaging step: iteravg vs GluonTS vs the memory-bandwidth bound, measured side by side.

The bound: a fold reads the iterate and the average and writes the average, 3 x 4 bytes per float32
parameter, at the bandwidth of a large numpy copy measured in the same run.

Per model it times, on the same network: iteravg's ``update_average`` and ``apply`` (the GluonTS-style call that
also returns ``averaged_model``), the callback's ``on_train_batch_end`` (what GluonTS's Trainer calls every batch),
the framework-neutral ``iteravg.Averager.step`` on numpy copies of the same parameters (the any-framework path),
GluonTS's ``update_average`` / ``apply``, and iteravg's oneDNN layout check
alone (``ModelBinding.plan()``: wait for MXNet's engine, then every parameter back to the default layout in one
C call -- or a ctypes loop with ``ITERAVG_NO_KERNEL=1``), which is part of every step.

    python benchmarks/bench_update.py            # all model shapes
    python benchmarks/bench_update.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from typing import Callable, Optional

warnings.filterwarnings("ignore")

os.environ.setdefault("OMP_NUM_THREADS", "1")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet import autograd  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

import iteravg  # noqa: E402
import iteravg.mx as ours  # noqa: E402
from iteravg.mx.binding import ModelBinding  # noqa: E402


def dense_net(layers: int, units: int) -> nn.HybridBlock:
    net = nn.HybridSequential()
    with net.name_scope():
        for _ in range(layers):
            net.add(nn.Dense(units, in_units=units))
    net.initialize(mx.init.Uniform())
    net(mx.nd.ones((1, units)))
    mx.nd.waitall()
    return net


def conv_net(layers: int, channels: int) -> nn.HybridBlock:
    """A stack of 3x3 Conv2D: oneDNN reorders these weights in place on an inference forward."""
    net = nn.HybridSequential()
    with net.name_scope():
        for _ in range(layers):
            net.add(nn.Conv2D(channels, 3, padding=1, in_channels=channels))
    net.initialize(mx.init.Uniform())
    with autograd.record():  # a training-mode forward: weights stay in the default layout
        net(mx.nd.ones((1, channels, 8, 8)))
    mx.nd.waitall()
    return net


def bandwidth(nbytes: int = 1 << 28, reps: int = 5) -> float:
    """Bytes per second of a large numpy copy (read + write counted)."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        mx.nd.waitall()
        t = time.perf_counter()
        fn()
        mx.nd.waitall()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def time_strategy(strategy, net, method: str, reps: int, warmup: int = 2) -> float:
    strategy.averaging_started = True
    call = getattr(strategy, method)
    for _ in range(warmup):  # the first fold is a copy; time the steady state
        call(net)
    return median_time(lambda: call(net), reps)


def gluonts_strategy() -> Optional[type]:
    try:
        from gluonts.mx.trainer.model_iteration_averaging import IterationAveragingStrategy as Ref
    except ImportError:
        return None
    return Ref


def run_case(name: str, net: nn.HybridBlock, bw: float, reps: int, gluonts_reps: int) -> dict:
    params = list(net.collect_params().values())
    n_params = sum(int(np.prod(p.shape)) for p in params)
    bound = 12 * n_params / bw
    t_update = time_strategy(ours.IterationAveragingStrategy(), net, "update_average", reps)
    t_apply = time_strategy(ours.IterationAveragingStrategy(), net, "apply", reps)
    strategy = ours.IterationAveragingStrategy()
    strategy.averaging_started = True
    callback = ours.ModelIterationAveraging(strategy)
    for _ in range(2):
        callback.on_train_batch_end(training_network=net)
    t_hook = median_time(lambda: callback.on_train_batch_end(training_network=net), reps)
    schedule = iteravg.Schedule()
    schedule.averaging_started = True
    averager = iteravg.Averager(schedule, comm="local")
    arrays = {k: p.data().asnumpy() for k, p in net.collect_params().items()}
    for _ in range(2):
        averager.step(arrays)
    t_numpy = median_time(lambda: averager.step(arrays), reps)
    binding = ModelBinding(net)
    binding.plan()
    t_check = median_time(binding.plan, reps)
    row = dict(case=name, tensors=len(params), params=n_params, bound_ms=bound * 1e3, update_ms=t_update * 1e3,
               apply_ms=t_apply * 1e3, hook_ms=t_hook * 1e3, numpy_step_ms=t_numpy * 1e3,
               layout_check_ms=t_check * 1e3, update_over_bound=t_update / bound, apply_over_bound=t_apply / bound,
               hook_over_bound=t_hook / bound, numpy_step_over_bound=t_numpy / bound)
    Ref = gluonts_strategy()
    if gluonts_reps and Ref is not None:
        t_ref = time_strategy(Ref(), net, "update_average", gluonts_reps, warmup=1)
        t_ref_apply = time_strategy(Ref(), net, "apply", gluonts_reps, warmup=1)
        row.update(gluonts_update_ms=t_ref * 1e3, gluonts_apply_ms=t_ref_apply * 1e3,
                   speedup_vs_gluonts=t_ref / t_update, apply_speedup_vs_gluonts=t_ref_apply / t_apply)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    reps = 5 if args.quick else 20
    bw = bandwidth()
    print(f"numpy copy bandwidth: {bw / 1e9:.2f} GB/s")
    cases = [
        ("400 tensors, 13.2M params (200 x Dense(256))", lambda: dense_net(200, 256), 3),
        ("2000 tiny tensors (1000 x Dense(8))", lambda: dense_net(1000, 8), 1),
        ("8 huge tensors (4 x Dense(1800))", lambda: dense_net(4, 1800), 3),
        ("100 tensors, 1.8M params (50 x Conv2D(64, 3x3))", lambda: conv_net(50, 64), 3),
    ]
    rows = []
    for name, build, g_reps in cases:
        row = run_case(name, build(), bw, reps, g_reps)
        rows.append(row)
        line = (f"{name}: bound {row['bound_ms']:.2f} ms | update_average {row['update_ms']:.2f} ms "
                f"= {row['update_over_bound']:.2f}x bound | apply {row['apply_ms']:.2f} ms "
                f"= {row['apply_over_bound']:.2f}x bound | on_train_batch_end {row['hook_ms']:.2f} ms "
                f"= {row['hook_over_bound']:.2f}x | Averager.step (numpy) {row['numpy_step_ms']:.2f} ms "
                f"= {row['numpy_step_over_bound']:.2f}x | layout check {row['layout_check_ms'] * 1e3:.0f} us")
        if "gluonts_update_ms" in row:
            line += (f" | GluonTS update {row['gluonts_update_ms']:.1f} ms, apply {row['gluonts_apply_ms']:.1f} ms"
                     f" -> iteravg {row['speedup_vs_gluonts']:.0f}x / {row['apply_speedup_vs_gluonts']:.0f}x faster")
        print(line, flush=True)
    main_row = rows[0]
    print(f"RATIOS: step/bound = {main_row['update_over_bound']:.2f} (target <= 2.5), "
          f"apply/bound = {main_row['apply_over_bound']:.2f}, hook/bound = {main_row['hook_over_bound']:.2f}, "
          f"numpy step/bound = {main_row['numpy_step_over_bound']:.2f}, "
          f"GluonTS/iteravg = {main_row.get('speedup_vs_gluonts', float('nan')):.0f} (target >= 50)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth_gbps=bw / 1e9, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
