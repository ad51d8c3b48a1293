"""GluonTS-API worker for the multi-host suite: a small MXNet Gluon net trained by SGD in a hand loop, with
iteravg.mx.NTA + ModelIterationAveraging called at GluonTS's hook points (the way GluonTS's Trainer calls them).

Why a separate script: the suite must show the *library* API (not only the CLI) keeps every host's averaged
model bitwise identical, and it needs fault hooks the CLI does not have.

Usage (one process per rank, under horovodrun or mpirun): gluon_worker.py OUT [--epochs E] [--batch-sleep S]
    [--hold-before-sync RANK:EPOCH:SECONDS] [--resume]
Writes into OUT, on the rank's own host: rank{r}.json (host, rank, world size, SHA-256 of the averaged
parameters' bytes, averaging counter); rank 0 also checkpoints into OUT/checkpoints. Progress markers for fault
injection: OUT/progress-r{r} ("epoch batch", rewritten every batch) and, with --hold-before-sync, OUT/holding-r{r}
written just before rank RANK sleeps SECONDS ahead of epoch EPOCH's on_epoch_end -- so the other ranks wait
inside the epoch-end sync's collective while the test cuts the network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import iteravg.mx as im


def make_data(rank: int, n: int = 96, features: int = 6) -> tuple:
    """Each rank's own shard of one linear-regression problem (same true weights, different samples)."""
    w = np.random.default_rng(7).standard_normal((features, 1)).astype(np.float32)
    x = np.random.default_rng(100 + rank).standard_normal((n, features)).astype(np.float32)
    y = x @ w + 0.1 * np.random.default_rng(200 + rank).standard_normal((n, 1)).astype(np.float32)
    return x, y


def params_sha256(params: dict) -> str:
    h = hashlib.sha256()
    for name, value in params.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(value).view(np.uint8).tobytes())
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batch-sleep", type=float, default=0.0, help="seconds per batch (slows the job for faults)")
    ap.add_argument("--hold-before-sync", default="", help="RANK:EPOCH:SECONDS")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    hold = [float(v) for v in args.hold_before_sync.split(":")] if args.hold_before_sync else None

    strategy = im.NTA(epochs=args.epochs, n=2, fallback_alpha=0.5)
    rank, size = strategy.comm.rank, strategy.comm.size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid-r{rank}").write_text(str(os.getpid()))
    mx.random.seed(0)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(16, activation="relu", in_units=6), gluon.nn.Dense(1, in_units=16))
    net.initialize(mx.init.Xavier())  # same seed on every rank: the replicas start equal
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05})
    loss_fn = gluon.loss.L2Loss()
    cb = im.ModelIterationAveraging(strategy, checkpoint_dir=out / "checkpoints", resume=args.resume)
    cb.on_network_initializing_end(training_network=net)
    first = int(cb.resumed_state["epoch"]) if cb.resumed_state else 0
    x, y = make_data(rank)
    for epoch in range(first, args.epochs):
        total = 0.0
        for b, start in enumerate(range(0, len(x), args.batch_size)):
            xb, yb = mx.nd.array(x[start:start + args.batch_size]), mx.nd.array(y[start:start + args.batch_size])
            with autograd.record():
                loss = loss_fn(net(xb), yb)
            loss.backward()
            trainer.step(xb.shape[0])
            total += float(loss.sum().asscalar())
            cb.on_train_batch_end(training_network=net)
            (out / f"progress-r{rank}").write_text(f"{epoch} {b}\n")
            time.sleep(args.batch_sleep)
        cb.on_validation_epoch_start(training_network=net)
        cb.on_validation_epoch_end(epoch_no=epoch, epoch_loss=total / len(x), training_network=net, trainer=trainer)
        if hold is not None and int(hold[0]) == rank and int(hold[1]) == epoch:
            (out / f"holding-r{rank}").write_text(f"{epoch}\n")
            time.sleep(hold[2])
        cb.on_epoch_end(epoch_no=epoch, epoch_loss=total / len(x), training_network=net, trainer=trainer,
                        best_epoch_info={}, ctx=mx.cpu())
    cb.on_train_end(training_network=net)  # loads the averaged model into net, final checkpoint on rank 0
    averaged = {name: p.data().asnumpy() for name, p in net.collect_params().items()}
    record = {"host": socket.gethostname(), "rank": rank, "size": size, "sha256": params_sha256(averaged),
              "average_counter": strategy.average_counter, "trigger_epoch": strategy.schedule.trigger_epoch}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    print(f"RANKHASH {json.dumps(record)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
