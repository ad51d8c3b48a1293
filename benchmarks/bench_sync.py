"""Epoch-end state sync vs one raw Horovod allreduce of the same bytes, side by side in one job.

    horovodrun -np 2 -H localhost:2 python benchmarks/bench_sync.py     (or: make bench)

Prints, on rank 0, the median time of the epoch-end sync (after the epoch-end fold every rank makes: allreduce of
the flat averaged buffer + the fused scale-and-fingerprint pass + the identity check), of the public
``strategy.sync_average()`` (the same, plus one tiny allreduce that agrees whether any rank folded), and of
``hvd.allreduce_`` on one flat NDArray of the same size; their ratios (target <= 1.3 for the epoch-end sync), and
how many collectives 100 per-batch hooks issued (target 0).
"""

from __future__ import annotations

import os
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import horovod.mxnet as hvd  # noqa: E402
import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

import iteravg.mx as ours  # noqa: E402


class CountingComm:
    """Delegates to the real communicator and counts the collectives issued (instrumentation, not a double)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name, self.rank, self.size = inner.name, inner.rank, inner.size

    def __getattr__(self, attr):
        fn = getattr(self.inner, attr)

        def counted(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)

        return counted


def main(layers: int = 200, units: int = 256, reps: int = 31) -> None:
    from iteravg.comm import get_comm

    comm = CountingComm(get_comm("horovod"))
    net = nn.HybridSequential()
    for _ in range(layers):
        net.add(nn.Dense(units, in_units=units))
    net.initialize(mx.init.Uniform())
    net(mx.nd.ones((1, units)))
    strategy = ours.IterationAveragingStrategy(comm=comm)
    strategy.averaging_started = True
    cb = ours.ModelIterationAveraging(strategy)
    for _ in range(3):
        cb.on_train_batch_end(net)
    before = comm.calls
    for _ in range(100):
        cb.on_train_batch_end(net)
    per_batch_collectives = comm.calls - before
    state = strategy.averaged_state
    n = state.layout.num_elements
    raw = mx.nd.array(np.random.default_rng(hvd.rank()).standard_normal(n).astype(np.float32))
    t_sync, t_public, t_raw = [], [], []

    def timed(sync) -> float:
        strategy.update_average(net)  # make the average dirty (untimed)
        mx.nd.waitall()
        hvd.allreduce_(mx.nd.ones(1), name="bench.barrier").wait_to_read()
        t = time.perf_counter()
        sync()
        return time.perf_counter() - t

    def timed_sync() -> float:  # what on_epoch_end does after its epoch-end fold
        return timed(lambda: strategy.averager.sync(all_ranks_folded=True))

    def timed_raw() -> float:
        hvd.allreduce_(mx.nd.ones(1), name="bench.barrier").wait_to_read()
        t = time.perf_counter()
        hvd.allreduce_(raw, op=hvd.Average, name="bench.raw")
        raw.wait_to_read()
        return time.perf_counter() - t

    for i in range(reps):  # alternate which goes first, so drifts in machine load hit both alike
        if i % 2:
            t_raw.append(timed_raw())
            t_sync.append(timed_sync())
            t_public.append(timed(strategy.sync_average))
        else:
            t_public.append(timed(strategy.sync_average))
            t_sync.append(timed_sync())
            t_raw.append(timed_raw())
    if hvd.rank() == 0:
        s, p, r = np.median(t_sync[3:]), np.median(t_public[3:]), np.median(t_raw[3:])
        print(f"model: {n / 1e6:.1f}M float32 params in {len(state.layout.specs)} tensors, {hvd.size()} ranks")
        print(f"epoch-end sync: {s * 1e3:.1f} ms; public sync_average(): {p * 1e3:.1f} ms; raw hvd.allreduce of one "
              f"flat buffer: {r * 1e3:.1f} ms")
        print(f"RATIO: sync/raw = {s / r:.2f} (target <= 1.3), sync_average/raw = {p / r:.2f}; collectives in 100 "
              f"per-batch hooks: {per_batch_collectives} (target 0)")
    hvd.allreduce_(mx.nd.ones(1), name="bench.end").wait_to_read()


if __name__ == "__main__":
    main()
