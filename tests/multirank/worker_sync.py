"""Multi-rank worker: runs iteravg's callback on each rank's replica and dumps what each rank ended with.

Launched by tests/test_multirank_sync.py under horovodrun / mpirun. Args: OUT_DIR [--variant-on-rank R]
[--stop-after K] [--resume] [--strategy nta|alpha]. Writes OUT_DIR/rank{r}.json and rank{r}-avg.npy; rank 0
checkpoints into OUT_DIR/ckpt. On error, writes OUT_DIR/rank{r}.error with the message and exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

import iteravg.mx as ours  # noqa: E402
from iteravg import collectives  # noqa: E402
from scenario import BATCHES, EPOCHS, iterate, make_net, metric, nta_kwargs, set_iterate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--variant-on-rank", type=int, default=-1, help="this rank (-2: every rank) builds another model")
    ap.add_argument("--stop-after", type=int, default=EPOCHS)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--strategy", default="nta")
    ap.add_argument("--nan-metric-ranks", default="", help="comma-separated ranks whose metric is NaN")
    ap.add_argument("--nan-param-rank", type=int, default=-1, help="this rank's iterate at --nan-param-at has a NaN")
    ap.add_argument("--nan-param-at", default="3,1", help="EPOCH,BATCH of the NaN iterate")
    ap.add_argument("--sync-every", type=int, default=0, help="sync_every_batches")
    ap.add_argument("--ckpt-per-rank", action="store_true", help="checkpoint_dir OUT/ckpt-r<rank> (only r0 may write)")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per batch, to make the job slow for kill tests")
    ap.add_argument("--sharded", action="store_true", help="sharded=True: each rank keeps 1/N of the average")
    ap.add_argument("--data-parallel", action="store_true",
                    help="every rank holds the same trained parameters (only BatchNorm's statistics differ)")
    args = ap.parse_args()
    extra = dict(sync_every_batches=args.sync_every, sharded=args.sharded)
    strategy = (ours.NTA(**nta_kwargs(), **extra) if args.strategy == "nta"
                else ours.Alpha_Suffix(epochs=EPOCHS, alpha=0.5, **extra))
    comm = strategy.comm
    rank = comm.rank
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    try:
        net = make_net("other" if args.variant_on_rank in (rank, -2) else "same")
        ckpt = os.path.join(args.out, f"ckpt-r{rank}" if args.ckpt_per_rank else "ckpt")
        cb = ours.ModelIterationAveraging(strategy, checkpoint_dir=ckpt, resume=args.resume)
        cb.on_network_initializing_end(training_network=net)
        start = cb._epochs_done
        started = []
        for epoch in range(start, args.stop_after):
            for b in range(BATCHES):
                values = iterate(net, rank, epoch, b, data_parallel=args.data_parallel)
                if rank == args.nan_param_rank and f"{epoch},{b}" == args.nan_param_at:
                    values[0][0, 0] = np.nan
                set_iterate(net, values)
                time.sleep(args.sleep)
                cb.on_train_batch_end(training_network=net)
            if epoch % 3 == 2:  # validation swaps now and then: must not disturb anything
                cb.on_validation_epoch_start(training_network=net)
                cb.on_validation_epoch_end(epoch_no=epoch, epoch_loss=0.0, training_network=net, trainer=None)
            nan_ranks = [int(r) for r in args.nan_metric_ranks.split(",") if r]
            loss = float("nan") if rank in nan_ranks else metric(rank, epoch)
            cb.on_epoch_end(epoch_no=epoch, epoch_loss=loss, training_network=net, trainer=None,
                            best_epoch_info={}, ctx=mx.cpu())
            started.append(strategy.averaging_started)
        if args.stop_after == EPOCHS:
            cb.on_train_end(training_network=net, temporary_dir=None)
        avg = strategy.averager.averaged()  # gathered when sharded (collective)
        flat = (np.concatenate([v.ravel() for v in avg.values()]) if avg is not None else np.zeros(0, np.float32))
        digests = {} if avg is None else {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
                                          for k, v in avg.items()}
        trained = [s for s, p in zip(strategy.binding.structural_names, strategy.binding.params) if p.grad_req != "null"]
        np.save(os.path.join(args.out, f"rank{rank}-avg.npy"), flat)
        weights = np.concatenate([p.data().asnumpy().ravel() for p in net.collect_params().values()])
        np.save(os.path.join(args.out, f"rank{rank}-net.npy"), weights)
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump(dict(rank=rank, size=comm.size, comm=comm.name, started=started,
                           trigger_epoch=strategy.schedule.trigger_epoch, counter=strategy.average_counter,
                           names=list(net.collect_params().keys()), digests=digests, trained=trained,
                           sharded=strategy.averager.state.partitioned), f)
        collectives.finish(comm)
        return 0
    except Exception as exc:  # noqa: BLE001 -- reported to the test, then a non-zero exit
        with open(os.path.join(args.out, f"rank{rank}.error"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n")
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
