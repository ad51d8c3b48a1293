"""Memory of a sharded numpy average through a swap and a save, traced with tracemalloc (numpy reports its arrays).

usage: worker_sharded_memory.py OUT_DIR [--per-rank]

A data-parallel model of 3.8M float32 (15 MB) in 40 tensors (every rank the same iterate); ``--per-rank`` declares
one small tensor a per-rank statistic, so the gather cannot return the allgather's rows as they are. Each rank writes
OUT_DIR/rank-R.json: the steady-state bytes and the traced peaks of ``swapped`` and ``save``, in units of the
model (and the model's bytes), and the SHA-256 of the gathered average (swap) and of the model after the swap.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tracemalloc
from pathlib import Path

import numpy as np

import iteravg
from iteravg import collectives


def iterates(params: dict, steps: int = 3):
    """The same iterates on every rank (data parallelism); yields after each optimizer-like update."""
    for step in range(steps):
        for v in params.values():
            v += np.float32(0.01 * step)
        yield step


def model() -> dict:
    rng = np.random.default_rng(0)
    return {f"t{i}": rng.standard_normal((300, 300 + i), dtype=np.float32) for i in range(40)}


def digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(np.ascontiguousarray(arrays[k]))  # contiguous: hashed in place, no copy
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-rank", action="store_true")
    args = ap.parse_args()
    params = model()
    model_bytes = sum(v.nbytes for v in params.values())
    schedule = iteravg.Schedule()
    schedule.averaging_started = True
    comm = iteravg.get_comm()  # before tracing: the communicator's imports are not the average's memory
    tracemalloc.start()
    avg = iteravg.Averager(schedule, comm=comm, sharded=True)
    source = iteravg.ArraySource(params, per_rank=["t3"] if args.per_rank else ())
    for _ in iterates(params):
        avg.step(source)
    avg.epoch_end(source, epoch=1)
    steady = tracemalloc.get_traced_memory()[0]
    before = {k: v.copy() for k, v in params.items()}
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    with avg.swapped(source):
        swapped = digest(params)
    swap_peak = tracemalloc.get_traced_memory()[1] - base
    restored = all(np.array_equal(before[k], params[k]) for k in params)
    del before
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    avg.save(args.out / "ckpt", epoch=1)
    save_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    result = {"rank": avg.comm.rank, "size": avg.comm.size, "partitioned": avg.state.partitioned, "model": model_bytes,
              "steady": steady / model_bytes, "swap_peak": swap_peak / model_bytes,
              "save_peak": save_peak / model_bytes,
              "swapped": swapped, "restored": restored}
    (args.out / f"rank-{avg.comm.rank}.json").write_text(json.dumps(result))
    collectives.finish(avg.comm)


if __name__ == "__main__":
    main()
