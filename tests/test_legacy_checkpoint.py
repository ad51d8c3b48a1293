"""A checkpoint written by iteravg 0.1 (tests/fixtures/ckpt-0.1, made by that release's own code: auto-generated
parameter names, format version 1, only averaged.params) loads into today's structural-name model, bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet.gluon import nn

import iteravg.mx as im

FIXTURE = Path(__file__).parent / "fixtures"


def net_like_the_fixture() -> nn.HybridBlock:
    nn.Dense(1, in_units=1)  # shift Gluon's block counter: names differ from the fixture's, structure does not
    net = nn.HybridSequential()
    net.add(nn.Dense(4, in_units=3), nn.BatchNorm(in_channels=4), nn.Dense(2, in_units=4))
    net.initialize()
    net(mx.nd.ones((2, 3)))
    return net


def test_an_iteravg_0_1_checkpoint_loads_bit_for_bit(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE / "ckpt-0.1", ckpt, symlinks=True)
    expected = np.load(FIXTURE / "expected-0.1.npz")
    net = net_like_the_fixture()
    strategy = im.NTA(epochs=6, n=1, eta=0.5)
    record = im.load_checkpoint(strategy, net, ckpt)
    assert record["format_version"] == 1 and record["epoch"] == 4
    assert strategy.averaging_started and strategy.average_counter == 4 and strategy.val_logs == [3.0, 2.0, 4.0]
    got = [v.asnumpy() for v in strategy.averaged_model.values()]
    want = [expected[k] for k in expected.files]
    assert [g.tobytes() for g in got] == [w.tobytes() for w in want]
    # Training continues and writes a version-2 snapshot next to the old ones, never touching them.
    before = (ckpt / "epoch-000004" / "averaging-state.json").read_bytes()
    cb = im.ModelIterationAveraging(strategy, checkpoint_dir=ckpt)
    cb.on_epoch_end(epoch_no=4, epoch_loss=1.0, training_network=net, trainer=None)
    assert (ckpt / "epoch-000004" / "averaging-state.json").read_bytes() == before
    assert (ckpt / "latest" / "averaged.safetensors").is_file()
