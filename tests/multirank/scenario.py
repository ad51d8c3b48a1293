"""A deterministic distributed-averaging scenario shared by the multi-rank workers and the tests that check them.

Each rank's "training" sets its network to a known iterate per batch (no optimizer, so the expected average
can be computed independently), and reports a per-rank epoch metric built so that each rank *alone* would
trigger NTA at a different epoch.
"""

from __future__ import annotations

from typing import List

import mxnet as mx
import numpy as np
from mxnet.gluon import nn

EPOCHS = 8
BATCHES = 3


def make_net(variant: str = "same") -> nn.HybridBlock:
    """Dense + BatchNorm (so auxiliary running statistics are averaged too) + Dense."""
    net = nn.HybridSequential(prefix="m_")
    hidden = 7 if variant == "same" else 8
    with net.name_scope():
        net.add(nn.Dense(hidden, in_units=5), nn.BatchNorm(in_channels=hidden), nn.Dense(3, in_units=hidden))
    net.initialize(mx.init.Xavier())
    net(mx.nd.ones((2, 5)))
    mx.nd.waitall()
    return net


def iterate(net: nn.HybridBlock, rank: int, epoch: int, batch: int, data_parallel: bool = False) -> List[np.ndarray]:
    """The parameters rank ``rank`` holds after ``batch`` of ``epoch``: shared drift + a rank-specific offset
    (``data_parallel``: the offset only on auxiliary states, as BatchNorm's statistics in data-parallel training)."""
    out = []
    for i, p in enumerate(net.collect_params().values()):
        shared = np.random.default_rng([epoch, batch, i]).standard_normal(p.shape)
        same = data_parallel and p.grad_req != "null"
        own = np.random.default_rng([1000 + (0 if same else rank), epoch, batch, i]).standard_normal(p.shape)
        out.append((shared + 0.3 * own).astype(np.float32))
    return out


def set_iterate(net: nn.HybridBlock, values: List[np.ndarray]) -> None:
    for p, v in zip(net.collect_params().values(), values):
        p.set_data(mx.nd.array(v))


def metric(rank: int, epoch: int) -> float:
    """Decreasing loss with one bump on each rank, at epoch 2 + 2*rank: alone, rank r triggers there."""
    return 10.0 - epoch + (3.0 if epoch == 2 + 2 * rank else 0.0)


def nta_kwargs() -> dict:
    return dict(epochs=EPOCHS, n=1, last_n_trigger=True, fallback_alpha=0.0)
