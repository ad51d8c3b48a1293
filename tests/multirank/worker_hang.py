"""Multi-rank worker for the watchdog and sync-robustness tests (tests/test_watchdog.py). No model, no MXNet
unless the communicator is Horovod: a small AveragedState over numpy buffers.

    worker_hang.py OUT SCENARIO [--rank R] [--dtypes float16,float32] [--mode mean|broadcast]

Scenarios:
  raise       rank R raises an uncaught exception; the others wait in a collective (``collectives.any_rank``).
  skip        rank R skips a collective issued in hook "on_validation_end" (rank-0-only validation), sleeps, then
              goes on to ``collectives.finish``; the others wait in the skipped collective.
  mismatch    rank R issues one collective fewer (as with different batch counts): it reaches
              ``collectives.finish`` while the others are in ``collectives.any_rank`` (hook "on_train_batch_end").
  sync        every rank folds its own values (rank R folds nothing) and syncs; writes OUT/rank{r}.bin (the
              averaged buffers' bytes) and OUT/rank{r}.json (counter, fingerprint, kernel used).
``--no-kernel-rank K`` forces the numpy fallback (ITERAVG_NO_KERNEL=1) on rank K only.
Each rank writes OUT/rank{r}.t (wall time before the event the test times).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _launcher_rank() -> int:
    for key in ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMI_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("scenario", choices=["raise", "skip", "mismatch", "sync"])
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--mode", default="mean")
    ap.add_argument("--no-kernel-rank", type=int, default=-1)
    args = ap.parse_args()
    if _launcher_rank() == args.no_kernel_rank:
        os.environ["ITERAVG_NO_KERNEL"] = "1"  # before iteravg is imported

    import numpy as np

    from iteravg import collectives
    from iteravg.comm import get_comm
    from iteravg.core import _kernel
    from iteravg.core.averaged import AveragedState, FoldPlan, Layout, TensorSpec

    comm = get_comm()
    rank = comm.rank
    os.makedirs(args.out, exist_ok=True)

    def stamp() -> None:
        with open(os.path.join(args.out, f"rank{rank}.t"), "w") as f:
            f.write(repr(time.time()))

    collectives.any_rank(comm, False)  # one matched collective first: everybody is up
    if args.scenario == "raise":
        stamp()
        if rank == args.rank:
            raise RuntimeError(f"boom on rank {rank}")
        with collectives.phase("on_epoch_end"):
            collectives.any_rank(comm, False)
        return 0
    if args.scenario == "mismatch":
        stamp()
        if rank != args.rank:
            with collectives.phase("on_train_batch_end"):
                collectives.any_rank(comm, True)
        collectives.finish(comm)
        return 0
    if args.scenario == "skip":
        stamp()
        if rank == args.rank:
            time.sleep(float(os.environ.get("ITERAVG_COLLECTIVE_TIMEOUT", "5")) * 3)
        else:
            with collectives.phase("on_validation_end"):
                collectives.any_rank(comm, True)
        collectives.finish(comm)
        return 0

    dtypes = args.dtypes.split(",")
    specs = tuple(TensorSpec(f"t{i}", (7, 3), dt) for i, dt in enumerate(dtypes))
    layout = Layout(specs)
    state = AveragedState(layout)
    rng = np.random.default_rng(100 + rank)
    views = [rng.standard_normal(s.shape).astype(s.dtype) for s in specs]
    plan = FoldPlan(layout, views)
    counter = 0
    if rank != args.rank:
        state.fold(plan, 1.0)
        counter = 1
    counter = collectives.sync_average(comm, state, counter, mode=args.mode)
    raw = b"".join(state.current(g).tobytes() for g in range(len(layout.groups)))
    with open(os.path.join(args.out, f"rank{rank}.bin"), "wb") as f:
        f.write(raw)
    inputs = b"".join(v.tobytes() for v in views)
    with open(os.path.join(args.out, f"rank{rank}-in.bin"), "wb") as f:
        f.write(inputs)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(counter=counter, fingerprint=[int(x) for x in state.fingerprint()],
                       kernel=_kernel.KERNELS is not None, comm=comm.name,
                       groups=list(layout.groups)), f)
    collectives.finish(comm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
