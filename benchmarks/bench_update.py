"""One averaging step: iteravg vs GluonTS vs the memory-bandwidth bound, measured side by side.

The bound: a fold reads the iterate and the average and writes the average, 3 x 4 bytes per float32
parameter, at the bandwidth of a large numpy copy measured in the same run.

    python benchmarks/bench_update.py            # all three model shapes
    python benchmarks/bench_update.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

warnings.filterwarnings("ignore")

os.environ.setdefault("OMP_NUM_THREADS", "1")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

import iteravg.mx as ours  # noqa: E402


def make_net(layers: int, units: int) -> nn.HybridBlock:
    net = nn.HybridSequential()
    with net.name_scope():
        for _ in range(layers):
            net.add(nn.Dense(units, in_units=units))
    net.initialize(mx.init.Uniform())
    net(mx.nd.ones((1, units)))
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


def time_steps(strategy, net, reps: int, warmup: int = 2) -> float:
    strategy.averaging_started = True
    for _ in range(warmup):  # the first fold is a copy; time the steady state
        strategy.update_average(net)
    times = []
    for _ in range(reps):
        mx.nd.waitall()
        t = time.perf_counter()
        strategy.update_average(net)
        mx.nd.waitall()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def run_case(name: str, layers: int, units: int, bw: float, reps: int, gluonts_reps: int) -> dict:
    net = make_net(layers, units)
    n_params = sum(int(np.prod(p.shape)) for p in net.collect_params().values())
    n_tensors = len(list(net.collect_params().keys()))
    bound = 12 * n_params / bw
    t_ours = time_steps(ours.IterationAveragingStrategy(), net, reps)
    row = dict(case=name, tensors=n_tensors, params=n_params, bound_ms=bound * 1e3, iteravg_ms=t_ours * 1e3,
               iteravg_over_bound=t_ours / bound)
    if gluonts_reps:
        try:
            from gluonts.mx.trainer.model_iteration_averaging import IterationAveragingStrategy as Ref
        except ImportError:
            Ref = None
        if Ref is not None:
            t_ref = time_steps(Ref(), net, gluonts_reps, warmup=1)
            row.update(gluonts_ms=t_ref * 1e3, speedup_vs_gluonts=t_ref / t_ours)
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
        ("400 tensors, 13.2M params (200 x Dense(256))", 200, 256, 3),
        ("2000 tiny tensors (1000 x Dense(8))", 1000, 8, 1),
        ("8 huge tensors (4 x Dense(1800))", 4, 1800, 3),
    ]
    rows = []
    for name, layers, units, g_reps in cases:
        row = run_case(name, layers, units, bw, reps, g_reps)
        rows.append(row)
        line = (f"{name}: iteravg {row['iteravg_ms']:.2f} ms = {row['iteravg_over_bound']:.2f}x bound "
                f"({row['bound_ms']:.2f} ms)")
        if "gluonts_ms" in row:
            line += f"; GluonTS {row['gluonts_ms']:.1f} ms -> iteravg is {row['speedup_vs_gluonts']:.0f}x faster"
        print(line, flush=True)
    main_row = rows[0]
    print(f"RATIOS: step/bound = {main_row['iteravg_over_bound']:.2f} (target <= 2.5), "
          f"GluonTS/iteravg = {main_row.get('speedup_vs_gluonts', float('nan')):.0f} (target >= 50)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth_gbps=bw / 1e9, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
