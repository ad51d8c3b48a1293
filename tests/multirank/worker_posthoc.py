"""Post-hoc averaging windows under a launcher (``Averager(..., posthoc=True)``), on a numpy model.

usage: worker_posthoc.py OUT_DIR MODE      (MODE: independent | data-parallel)

``independent``: every rank's iterates differ (only the syncs combine the ranks); ``data-parallel``: every rank
holds the same iterates. Per rank, in one process:

* an NTA run with ``posthoc=True`` (snapshots every epoch into OUT_DIR/ckpt), its own average and the post-hoc
  average of every start;
* for every start epoch e, an ``AlphaSuffixSchedule`` run without post-hoc that starts at e (the reference), and a
  ``Schedule`` started up front (start 0);
* a run stopped after epoch ``STOP`` and resumed from its snapshot (OUT_DIR/resume): its post-hoc averages.

Writes OUT_DIR/rank-R.json (float64 lists and SHA-256 digests of the bits).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

import iteravg
from iteravg import collectives

EPOCHS, STEPS, STOP = 7, 4, 3
SHAPES = {"conv.weight": ((6, 3, 3), "float32"), "conv.bias": ((6,), "float32"), "head": ((5, 2), "float64")}
METRICS = [5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 3.0]  # NTA(n=1): 3.2 > min(5, 4, 3) starts it at epoch 5


def iterate(rank: int, epoch: int, step: int, independent: bool) -> dict:
    rng = np.random.default_rng([rank if independent else 0, epoch, step])
    return {k: (rng.standard_normal(shape) * 0.2 + np.cos(epoch + step / 5.0)).astype(dt)
            for k, (shape, dt) in SHAPES.items()}


def train(avg: iteravg.Averager, rank: int, independent: bool, epochs: range, ckpt: Path = None) -> None:
    params = {k: np.zeros(shape, dtype=dt) for k, (shape, dt) in SHAPES.items()}
    for epoch in epochs:
        for step in range(STEPS):
            for k, v in iterate(rank, epoch, step, independent).items():
                params[k][...] = v
            avg.step(params)
        avg.epoch_end(params, metric=METRICS[epoch] + 0.01 * rank, epoch=epoch + 1)
        if ckpt is not None:
            avg.save(ckpt, epoch=epoch + 1)


def as_lists(tensors: dict) -> dict:
    return {k: np.asarray(v, dtype=np.float64).tolist() for k, v in tensors.items()}


def digest(tensors: dict) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(tensors[k]).tobytes() for k in sorted(tensors))).hexdigest()


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    independent = mode == "independent"
    avg = iteravg.Averager(iteravg.NTASchedule(epochs=EPOCHS, n=1), posthoc=True)
    rank = avg.comm.rank
    train(avg, rank, independent, range(EPOCHS), out / "ckpt")
    starts = avg.posthoc_starts()
    posthoc = {e: avg.posthoc_average(e) for e, _ in starts}
    result = {"rank": rank, "size": avg.comm.size, "comm": avg.comm.name, "trigger_epoch": avg.schedule.trigger_epoch,
              "counter": avg.average_counter, "starts": starts, "own": as_lists(avg.averaged()),
              "posthoc": {e: as_lists(t) for e, t in posthoc.items()},
              "posthoc_digests": {e: digest(t) for e, t in posthoc.items()}, "reference": {}}
    for e, _ in starts:
        if e == 0:
            schedule = iteravg.Schedule()
            schedule.start(0)
        else:
            schedule = iteravg.AlphaSuffixSchedule(epochs=EPOCHS, alpha=1 - e / EPOCHS)
        ref = iteravg.Averager(schedule)
        train(ref, rank, independent, range(EPOCHS))
        assert ref.schedule.trigger_epoch == e, (e, ref.schedule.trigger_epoch)
        result["reference"][e] = {"average": as_lists(ref.averaged()), "counter": ref.average_counter}
    first = iteravg.Averager(iteravg.NTASchedule(epochs=EPOCHS, n=1), posthoc=True)
    train(first, rank, independent, range(STOP), out / "resume")
    resumed = iteravg.Averager(iteravg.NTASchedule(epochs=EPOCHS, n=1), posthoc=True)
    resumed.load(out / "resume", {k: np.zeros(shape, dtype=dt) for k, (shape, dt) in SHAPES.items()})
    train(resumed, rank, independent, range(STOP, EPOCHS), out / "resume")
    result["resumed_starts"] = resumed.posthoc_starts()
    result["resumed_digests"] = {e: digest(resumed.posthoc_average(e)) for e, _ in resumed.posthoc_starts()}
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    collectives.finish(avg.comm)


if __name__ == "__main__":
    main()
