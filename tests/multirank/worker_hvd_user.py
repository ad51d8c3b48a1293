"""A Horovod user's own MXNet training loop, written the way Horovod's MXNet examples are, with iteravg's callback
called by hand -- not iteravg's loop, not GluonTS's Trainer.

    hvd.init(); broadcast_parameters; hvd.DistributedTrainer; shard the data by rank; validate every epoch.

The model mixes the layer types oneDNN reorders (Conv1D) with an LSTM, an Embedding and BatchNorm. Writes
OUT_DIR/rank-R.json: SHA-256 of the final (averaged) network, of the last iterate, and the validation losses.
usage: worker_hvd_user.py OUT_DIR [--rank0-validation]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import horovod.mxnet as hvd
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn, rnn

import iteravg.mx as im

EPOCHS, BATCH, SEQ = 5, 8, 12


class Net(gluon.HybridBlock):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.embed = nn.Embedding(10, 4)
            self.conv = nn.Conv1D(6, 3, padding=1, in_channels=5)
            self.norm = nn.BatchNorm(in_channels=6)
            self.lstm = rnn.LSTM(8, layout="NTC", input_size=6)
            self.out = nn.Dense(1, in_units=8)

    def hybrid_forward(self, F, x, cat):
        h = F.concat(x, self.embed(cat), dim=2)              # (N, T, 5)
        h = self.norm(self.conv(h.transpose((0, 2, 1))))      # (N, 6, T)
        h = self.lstm(h.transpose((0, 2, 1)))                 # (N, T, 8)
        return self.out(h.mean(axis=1))


def data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, SEQ, 1)).astype(np.float32)
    cat = rng.integers(0, 10, (n, SEQ)).astype(np.float32)
    y = (x.sum(axis=(1, 2)) * 0.3 + (cat % 3).mean(axis=1)).astype(np.float32)[:, None]
    return x, cat, y


def sha(net: gluon.Block, trainable_only: bool = False) -> str:
    """Of every parameter, or only the trainable ones: BatchNorm's running statistics are per rank in a plain
    Horovod loop (no gradient reduces them); iteravg's averaged model averages them too."""
    return hashlib.sha256(b"".join(p.data().asnumpy().tobytes() for p in net.collect_params().values()
                                   if not trainable_only or p.grad_req != "null")).hexdigest()


def main() -> None:
    out, rank0_validation = Path(sys.argv[1]), "--rank0-validation" in sys.argv
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    mx.random.seed(100 + rank)  # different inits: broadcast_parameters must make them equal
    net = Net()
    net.initialize(mx.init.Xavier())
    net.hybridize()
    x, cat, y = data(256, 0)
    net(mx.nd.array(x[:2]), mx.nd.array(cat[:2]))
    params = net.collect_params()
    hvd.broadcast_parameters(params, root_rank=0)
    trainer = hvd.DistributedTrainer(params, "adam", {"learning_rate": 0.01})
    loss_fn = gluon.loss.L2Loss()
    strategy = im.Alpha_Suffix(epochs=EPOCHS, alpha=0.6)  # averages from the end of epoch 2
    cb = im.ModelIterationAveraging(strategy)
    vx, vcat, vy = data(64, 1)
    mine = np.arange(rank, len(y), size)
    val_losses = []
    cb.on_train_start(max_epochs=EPOCHS)
    cb.on_network_initializing_end(training_network=net)
    for epoch in range(EPOCHS):
        for i in range(0, len(mine) - BATCH + 1, BATCH):
            idx = mine[i : i + BATCH]
            with autograd.record():
                loss = loss_fn(net(mx.nd.array(x[idx]), mx.nd.array(cat[idx])), mx.nd.array(y[idx]))
            loss.backward()
            trainer.step(BATCH)
            cb.on_train_batch_end(training_network=net)
        if rank0_validation:  # the common Horovod pattern: only rank 0 evaluates, no collective inside
            if rank == 0:
                with strategy.averaged_weights(net, sync=False):
                    val = float(loss_fn(net(mx.nd.array(vx), mx.nd.array(vcat)), mx.nd.array(vy)).mean().asscalar())
                val_losses.append(val)
            metric = float(hvd.broadcast(mx.nd.array([val_losses[-1] if rank == 0 else 0.0]), 0, name=f"v{epoch}")
                           .asscalar())
        else:  # every rank validates (GluonTS's hook order)
            cb.on_validation_epoch_start(training_network=net)
            metric = float(loss_fn(net(mx.nd.array(vx), mx.nd.array(vcat)), mx.nd.array(vy)).mean().asscalar())
            cb.on_validation_epoch_end(epoch_no=epoch, epoch_loss=metric, training_network=net, trainer=trainer)
            val_losses.append(metric)
        cb.on_epoch_end(epoch_no=epoch, epoch_loss=metric, training_network=net, trainer=trainer)
    last = sha(net, trainable_only=True)
    cb.on_train_end(training_network=net)
    (out / f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "final": sha(net), "final_trainable": sha(net, trainable_only=True), "last": last, "val": val_losses, "counter": strategy.average_counter,
        "trigger": strategy.schedule.trigger_epoch, "started": strategy.averaging_started}))
    hvd.shutdown()


if __name__ == "__main__":
    main()
