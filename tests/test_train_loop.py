"""The training loop as a library: GluonTS's hook order, and exception safety of the averaged-weight swap."""

from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

import iteravg.mx as im
from iteravg.mx.cli import _make_net
from iteravg.comm import get_comm
from iteravg.mx.data import load
from iteravg.mx.train import fit

pytestmark = pytest.mark.filterwarnings("ignore")


class Recorder(im.ModelIterationAveraging.__mro__[1]):  # GluonTS's Callback (or iteravg's hook base)
    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            calls = object.__getattribute__(self, "calls")

            def hook(**kwargs):
                calls.append(name)
                return True

            return hook
        return object.__getattribute__(self, name)


def test_hooks_follow_gluonts_order():
    ds = load()
    rec = Recorder()
    fit(_make_net(ds.num_features, 8, 0), gluon.loss.L2Loss(), ds.train, ds.val, comm=get_comm("local"),
        callbacks=[rec], epochs=2, batch_size=128, learning_rate=0.01)
    per_epoch = ["on_train_epoch_start", "on_train_batch_end", "on_train_batch_end", "on_train_epoch_end",
                 "on_validation_epoch_start", "on_validation_epoch_end", "on_epoch_end"]
    assert rec.calls == ["on_train_start", "on_network_initializing_end"] + per_epoch * 2


class FailsInSecondValidation(gluon.loss.L2Loss):
    """Raises while evaluating the validation set of epoch 2 (the averaged weights are swapped in by then)."""

    def __init__(self):
        super().__init__()
        self.validation_calls = 0

    def forward(self, pred, label):
        if not mx.autograd.is_recording():
            self.validation_calls += 1
            if self.validation_calls > 1:
                raise RuntimeError("validation failed")
        return super().forward(pred, label)


def test_exception_in_validation_leaves_training_weights_in_the_network():
    ds = load()
    net = _make_net(ds.num_features, 8, 0)
    strategy = im.Alpha_Suffix(epochs=3, alpha=1.0)  # averaging from the first epoch end
    with pytest.raises(RuntimeError, match="validation failed"):
        fit(net, FailsInSecondValidation(), ds.train, ds.val, comm=get_comm("local"),
            callbacks=[im.ModelIterationAveraging(strategy)], epochs=3, batch_size=128, learning_rate=0.05)
    mx.nd.waitall()
    now = np.concatenate([p.data().asnumpy().ravel() for p in net.collect_params().values()])
    cached = np.concatenate([v.asnumpy().ravel() for v in strategy.cached_model.values()])
    averaged = np.concatenate([v.asnumpy().ravel() for v in strategy.averaged_model.values()])
    np.testing.assert_array_equal(now, cached)
    assert not np.array_equal(now, averaged)
