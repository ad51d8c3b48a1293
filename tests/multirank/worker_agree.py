"""Agreement scenarios with the MXNet facade under a launcher (see tests/test_agreement.py).

usage: worker_agree.py OUT_DIR SCENARIO
  rank0-validation  only rank 0 evaluates the averaged model (sync=False): no collective inside, no hang
  all-refused       every iterate holds a NaN: at train end every rank holds rank 0's weights, one warning
  unwritable        checkpoint_dir cannot be written: every rank raises the same error at train start
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet.gluon import nn

import iteravg.mx as im
from iteravg import collectives

logging.basicConfig(level=logging.WARNING, format="%(message)s")


def make_net() -> nn.HybridBlock:
    net = nn.HybridSequential()
    net.add(nn.Dense(6, in_units=4), nn.Dense(2, in_units=6))
    net.initialize(mx.init.Xavier())
    return net


def digest(net: nn.Block) -> str:
    return hashlib.sha256(b"".join(p.data().asnumpy().tobytes() for p in net.collect_params().values())).hexdigest()


def main() -> None:
    out, scenario = Path(sys.argv[1]), sys.argv[2]
    strategy = im.NTA(epochs=4, n=1)
    rank = strategy.comm.rank
    mx.random.seed(rank)  # different replicas: only iteravg's collectives make them agree
    net = make_net()
    result = {"rank": rank}
    cb = im.ModelIterationAveraging(strategy, checkpoint_dir="/proc/iteravg-cannot-write" if scenario == "unwritable"
                                    else None)
    try:
        cb.on_train_start(max_epochs=4)
    except ValueError as exc:
        result["error"] = str(exc)
        (out / f"rank-{rank}.json").write_text(json.dumps(result))
        collectives.finish(strategy.comm)
        return
    rng = np.random.default_rng(rank)
    evaluated = []
    for epoch in range(4):
        for _ in range(3):
            for p in net.collect_params().values():
                value = rng.standard_normal(p.shape).astype(np.float32)
                if scenario == "all-refused":
                    value[(0,) * value.ndim] = np.nan
                p.set_data(mx.nd.array(value))
            cb.on_train_batch_end(training_network=net)
        cb.on_epoch_end(epoch_no=epoch, epoch_loss=[3.0, 2.0, 4.0, 1.0][epoch], training_network=net, trainer=None)
        if scenario == "rank0-validation" and rank == 0:
            with strategy.averaged_weights(net, sync=False):
                evaluated.append(digest(net))
    cb.on_train_end(training_network=net)
    result.update(digest=digest(net), evaluated=evaluated, counter=strategy.average_counter,
                  refused=strategy.averager.refused_nonfinite, started=strategy.averaging_started)
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    collectives.finish(strategy.comm)


if __name__ == "__main__":
    main()
