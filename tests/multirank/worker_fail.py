"""Multi-rank worker for fail-fast tests (tests/test_fail_fast.py): ranks that leave, deadlock or are slow, at the
default settings unless the test sets ITERAVG_COLLECTIVE_TIMEOUT. numpy only unless the communicator is Horovod.

    worker_fail.py OUT SCENARIO [--rank R]

Scenarios (R is the rank that misbehaves; the others wait in a collective from hook "on_epoch_end"):
  sysexit     R calls sys.exit(3) between collectives
  osexit      R calls os._exit(4)
  kill        R sends itself SIGKILL
  thread      an uncaught exception on a non-main thread of R (its main thread goes on sleeping)
  allexit     every rank calls sys.exit(3) at the same point (as on an error every rank raises alike)
  exit0       R leaves early with sys.exit(0), as a script whose ranks run different numbers of collectives
  validate0   iteravg.Averager: rank 0 validates alone with avg.swapped(params) (sync=True: a collective), the
              others go on to the next epoch end (the README's "validation on rank 0 only" without sync=False)
  uneven      iteravg.Averager(sync_every_batches=2): rank 0 has 5 batches per epoch, the others 4
  slow        R computes for SLOW seconds (env ITERAVG_TEST_SLOW, default 8) outside any collective while the
              others wait; then everybody finishes normally (exit 0)
  backend     nothing more (the test reads OUT/rank{r}.comm: the communicator each rank got)
  stuck       R sleeps (outside any collective) for 3x ITERAVG_COLLECTIVE_TIMEOUT while the others wait in hook
              "on_validation_end": the deadline ends it (used with a stranger attacking the side channel)
Each rank writes OUT/rank{r}.t (wall time when its part of the scenario starts: the failure, or the moment it
blocks), OUT/rank{r}.pid and OUT/rank{r}.port (its watchdog's status port, for the stranger test).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("scenario")
    ap.add_argument("--rank", type=int, default=1)
    args = ap.parse_args()

    import numpy as np

    import iteravg
    from iteravg import collectives
    from iteravg.comm import get_comm

    comm = get_comm()
    rank = comm.rank
    os.makedirs(args.out, exist_ok=True)

    def write(name: str, text: str) -> None:
        with open(os.path.join(args.out, f"rank{rank}.{name}"), "w") as f:
            f.write(text)

    def stamp() -> None:
        write("t", repr(time.time()))

    write("pid", str(os.getpid()))
    write("comm", comm.name)
    wd = getattr(comm, "watchdog", None)
    write("port", str(getattr(wd, "port", None)))
    collectives.any_rank(comm, False)  # one matched collective first: everybody is up
    me = rank == args.rank
    sc = args.scenario

    if sc == "allexit":
        stamp()
        sys.exit(3)
    if sc in ("sysexit", "osexit", "kill", "thread", "exit0"):
        time.sleep(0.3)
        if me:
            stamp()
            if sc == "sysexit":
                sys.exit(3)
            if sc == "osexit":
                os._exit(4)
            if sc == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if sc == "exit0":
                sys.exit(0)

            def loader() -> None:
                raise RuntimeError(f"data loader died on rank {rank}")

            threading.Thread(target=loader, name="loader").start()
            time.sleep(600)
        with collectives.phase("on_epoch_end"):
            collectives.any_rank(comm, True)
        collectives.finish(comm)
        return 0

    if sc == "backend":
        collectives.finish(comm)
        return 0
    if sc == "slow":
        stamp()
        if me:
            time.sleep(float(os.environ.get("ITERAVG_TEST_SLOW", "8")))
        with collectives.phase("on_epoch_end"):
            collectives.any_rank(comm, True)  # the slow rank joins late, but joins
        collectives.finish(comm)
        return 0
    if sc == "stuck":
        stamp()
        if me:
            time.sleep(3 * float(os.environ.get("ITERAVG_COLLECTIVE_TIMEOUT", "5")))
        else:
            with collectives.phase("on_validation_end"):
                collectives.any_rank(comm, True)
        collectives.finish(comm)
        return 0

    # Real training-loop shapes on the numpy engine.
    params = {"w": np.zeros((64, 8), np.float32), "b": np.zeros(8, np.float32)}
    sync_every = 2 if sc == "uneven" else 0
    avg = iteravg.Averager(iteravg.EMASchedule(decay=0.9), sync_every_batches=sync_every)
    rng = np.random.default_rng(rank)
    for epoch in range(1, 4):
        batches = 5 if (sc == "uneven" and rank == 0) else 4
        for b in range(batches):
            if sc == "uneven" and b == 4:
                stamp()  # rank 0's extra batch: from here on the ranks' collectives differ
            for p in params.values():
                p += rng.standard_normal(p.shape).astype(p.dtype) * 0.01
            with collectives.phase("on_train_batch_end"):
                avg.step(params)
        if sc == "uneven" and rank != 0:
            stamp()
        with collectives.phase("on_epoch_end"):
            avg.epoch_end(params, metric=1.0 / epoch)
        if sc == "validate0" and epoch == 2:
            stamp()
            if rank == 0:
                with collectives.phase("on_validation_epoch_start"):
                    with avg.swapped(params):  # sync=True: a collective the other ranks never issue
                        float(params["w"].sum())
    collectives.finish(comm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
