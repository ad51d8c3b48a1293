"""A numpy-only model trained under a launcher with ``iteravg.Averager``: the distributed protocol with no
framework. Each rank's iterates differ (rank-dependent), so only a working sync makes the averages agree.

usage: worker_numpy.py OUT_DIR SCHEDULE      (SCHEDULE: nta | ema | every2)
Writes OUT_DIR/rank-R.json with the averaged bits' hex digest, the Horovod binding used (if any) and the framework
modules the process imported.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

import iteravg
from iteravg import collectives

EPOCHS, STEPS = 6, 4


def iterate(rank: int, epoch: int, step: int, shapes: dict) -> dict:
    """Deterministic per-rank iterate: what an optimizer step would have left in the parameters."""
    rng = np.random.default_rng([rank, epoch, step])
    return {k: (rng.standard_normal(shape) * 0.1 + epoch + step / 10.0).astype(dt) for k, (shape, dt) in shapes.items()}


SHAPES = {"conv.weight": ((4, 3, 3), "float32"), "conv.bias": ((4,), "float32"), "emb": ((7, 5), "float16"),
          "head": ((5, 2), "float64")}


def metric(rank: int, epoch: int) -> float:
    return [5.0, 4.0, 3.0, 3.5, 3.2, 3.1][epoch] + 0.01 * rank  # worse at epoch 4 -> NTA starts there


def schedule(kind: str) -> iteravg.Schedule:
    if kind == "nta":
        return iteravg.NTASchedule(epochs=EPOCHS, n=1)
    if kind == "ema":
        return iteravg.EMASchedule(decay=0.9, update_after_step=2)
    return iteravg.EveryNSteps(iteravg.AlphaSuffixSchedule(epochs=EPOCHS, alpha=0.5), 2)


def main() -> None:
    out, kind = Path(sys.argv[1]), sys.argv[2]
    avg = iteravg.Averager(schedule(kind))
    rank = avg.comm.rank
    params = {k: np.zeros(shape, dtype=dt) for k, (shape, dt) in SHAPES.items()}
    for epoch in range(EPOCHS):
        for step in range(STEPS):
            for k, v in iterate(rank, epoch, step, SHAPES).items():
                params[k][...] = v  # in place: the averager holds views of these arrays
            avg.step(params)
        avg.epoch_end(params, metric=metric(rank, epoch), epoch=epoch + 1)
    with avg.swapped(params) as loaded:
        swapped = {k: v.copy() for k, v in params.items()}
    restored = all(np.array_equal(params[k], v) for k, v in iterate(rank, EPOCHS - 1, STEPS - 1, SHAPES).items())
    saved = avg.save(out / "ckpt", epoch=EPOCHS)
    fresh = iteravg.Averager(schedule(kind))
    fresh.load(out / "ckpt", {k: np.zeros_like(v) for k, v in params.items()})
    averaged = avg.averaged()
    digest = hashlib.sha256(b"".join(averaged[k].tobytes() for k in sorted(averaged))).hexdigest()
    reloaded = hashlib.sha256(b"".join(fresh.averaged()[k].tobytes() for k in sorted(averaged))).hexdigest()
    (out / f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "size": avg.comm.size, "comm": avg.comm.name, "digest": digest, "reloaded": reloaded,
        "counter": avg.average_counter, "trigger_epoch": avg.schedule.state_dict().get("trigger_epoch"),
        "swapped_equals_average": loaded and all(np.array_equal(swapped[k], averaged[k]) for k in averaged),
        "training_restored": restored, "saved": None if saved is None else str(saved),
        "averaged": {k: v.astype(np.float64).tolist() for k, v in averaged.items()},
        "binding": getattr(avg.comm, "binding", None),  # Horovod's: "torch" or "mxnet"
        "frameworks": sorted(m for m in ("mxnet", "torch", "horovod.mxnet", "horovod.torch") if m in sys.modules),
    }))
    collectives.finish(avg.comm)


if __name__ == "__main__":
    main()
