"""Multi-rank worker for tests/test_disk_full.py: a numpy model trained for EPOCHS epochs, a snapshot after each
(``Averager.save``, keep=2) into CKPT, which lies on a small, nearly full tmpfs.

    worker_disk.py OUT CKPT POLICY FILLER FREE_AFTER

POLICY is ``on_save_error`` (raise | warn). After epoch FREE_AFTER, rank 0 deletes FILLER (space is freed, as an
operator would). Each rank writes OUT/rank{r}.json: the snapshots it saw written, and the error it got (class and
message) if the job stopped.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

import iteravg
from iteravg import collectives

EPOCHS = 6


def main() -> int:
    out, ckpt, policy, filler, free_after = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    params = {"w": np.zeros((300, 250), np.float32)}  # 300 kB per snapshot
    avg = iteravg.Averager(iteravg.EMASchedule(decay=0.9))
    rank = avg.comm.rank
    written, error = [], None
    for epoch in range(1, EPOCHS + 1):
        params["w"] += np.float32(0.01 * (rank + 1))
        avg.step(params)
        avg.epoch_end(params, metric=1.0, epoch=epoch)
        try:
            path = avg.save(ckpt, keep=2, on_save_error=policy)
        except Exception as exc:  # noqa: BLE001 -- recorded for the test: it must be the same on every rank
            error = {"class": type(exc).__name__, "message": str(exc), "epoch": epoch}
            break
        written.append(None if path is None else os.path.basename(path))
        if epoch == free_after and rank == 0 and os.path.exists(filler):
            os.unlink(filler)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"written": written, "error": error}, f)
    collectives.finish(avg.comm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
