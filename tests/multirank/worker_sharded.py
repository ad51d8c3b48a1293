"""Data-parallel averaging with and without ``sharded=True``, on a numpy model, under any launcher.

usage: worker_sharded.py OUT_DIR --sharded 0|1 [--local-sgd] [--ckpt DIR] [--resume] [--epochs N] [--save-epoch E]

Every rank holds the same iterates (data parallelism: ``iterate`` does not depend on the rank) except the per-rank
statistic ``bn.mean`` (declared ``per_rank``), as BatchNorm's running mean in DP without synced statistics;
``--local-sgd`` makes all tensors rank-dependent (independent replicas). Each rank writes OUT_DIR/rank-R.json: the
averaged tensors (float64 lists and per-tensor SHA-256 of the bits), the counter, swap checks, what it loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

import iteravg
from iteravg import collectives

SHAPES = {"conv.weight": ((8, 3, 5), "float32"), "conv.bias": ((8,), "float32"), "bn.mean": ((8,), "float32"),
          "emb": ((13, 7), "float16"), "head": ((7, 3), "float64"), "scale": ((), "float32")}
STEPS = 4


def iterate(rank: int, epoch: int, step: int, local_sgd: bool) -> dict:
    out = {}
    for k, (shape, dt) in SHAPES.items():
        per_rank = local_sgd or k == "bn.mean"
        rng = np.random.default_rng([rank if per_rank else 0, epoch, step, len(k)])
        out[k] = (rng.standard_normal(shape) * 0.3 + np.sin(epoch + step / 7.0)).astype(dt)
    return out


def metric(epoch: int) -> float:
    return [5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 3.0, 2.9, 2.8, 2.7][epoch % 10]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--sharded", type=int, default=1)
    ap.add_argument("--local-sgd", action="store_true")
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    avg = iteravg.Averager(iteravg.NTASchedule(epochs=10, n=1), sharded=bool(args.sharded))
    rank = avg.comm.rank
    params = {k: np.zeros(shape, dtype=dt) for k, (shape, dt) in SHAPES.items()}
    source = iteravg.ArraySource(params, per_rank=["bn.mean"])
    result: dict = {"rank": rank, "size": avg.comm.size, "comm": avg.comm.name}
    first = 0
    if args.resume:
        record = avg.load(args.ckpt, source)
        result["loaded"] = digests(avg.averaged())
        result["loaded_world"] = record["world_size"]
        first = int(record["epoch"])
    try:
        for epoch in range(first, first + args.epochs):
            for step in range(STEPS):
                for k, v in iterate(rank, epoch, step, args.local_sgd).items():
                    params[k][...] = v
                avg.step(source)
            avg.epoch_end(source, metric=metric(epoch), epoch=epoch + 1)
    except collectives.CollectiveError as exc:
        result["error"] = str(exc)
        (args.out / f"rank-{rank}.json").write_text(json.dumps(result))
        collectives.finish(avg.comm)
        return
    before = {k: v.copy() for k, v in params.items()}
    averaged = avg.averaged()
    with avg.swapped(source) as loaded:
        result["swap_equals_average"] = loaded and all(np.array_equal(params[k], averaged[k]) for k in params)
    result["restored"] = all(np.array_equal(params[k], before[k]) for k in params)
    result["averaged"] = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in averaged.items()}
    result["digests"] = digests(averaged)
    result["counter"] = avg.average_counter
    result["sharded_state"] = avg.state.partitioned
    if args.ckpt is not None:
        path = avg.save(args.ckpt, epoch=first + args.epochs)
        result["saved"] = None if path is None else str(path)
    avg.finalize(source)
    result["final"] = digests(params)
    (args.out / f"rank-{rank}.json").write_text(json.dumps(result))
    collectives.finish(avg.comm)


def digests(arrays: dict) -> dict:
    return {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in arrays.items()}


if __name__ == "__main__":
    main()
