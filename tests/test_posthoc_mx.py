"""``posthoc=True`` on the MXNet face: the real callback inside ``iteravg.mx.train.fit`` records the prefixes a run
started at each epoch would build on -- with GluonTS's recount and with ``recount_epoch_end=False`` -- so every
post-hoc average equals a real ``Alpha_Suffix`` run started there (same seed: the same iterates); the strategies
serialise ``posthoc`` through GluonTS's serde; ``iteravg.gluonts.Trainer``'s sharding default leaves a post-hoc
strategy unsharded."""

from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest

import iteravg.mx as im
from iteravg.mx.train import fit

pytestmark = pytest.mark.filterwarnings("ignore")
EPOCHS = 5


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.0]], np.float32) + 0.3 * rng.standard_normal((96, 1))).astype(np.float32)
    return (x[:64], y[:64]), (x[64:], y[64:])


def net():
    mx.random.seed(3)
    n = mx.gluon.nn.HybridSequential()
    n.add(mx.gluon.nn.Dense(6, activation="relu", in_units=4), mx.gluon.nn.Dense(1, in_units=6))
    n.initialize(mx.init.Xavier())
    n(mx.nd.zeros((1, 4)))
    return n


def train(strategy, recount: bool, ckpt=None):
    train_split, val_split = data()
    callback = im.ModelIterationAveraging(strategy, recount_epoch_end=recount)
    model = net()
    fit(model, mx.gluon.loss.L2Loss(), train_split, val_split, comm=strategy.comm, callbacks=[callback], epochs=EPOCHS,
        batch_size=16, learning_rate=0.05, seed=1, checkpoint_dir=ckpt)
    return strategy


@pytest.mark.parametrize("recount", [True, False], ids=["recount", "no-recount"])
def test_callback_prefixes_match_real_runs(tmp_path, recount):
    strategy = train(im.Alpha_Suffix(epochs=EPOCHS, alpha=0.4, comm="local", posthoc=True), recount, tmp_path / "ck")
    assert strategy.schedule.trigger_epoch == 3
    starts = dict(strategy.averager.posthoc_starts())
    assert sorted(starts) == list(range(EPOCHS + 1)) and starts[EPOCHS] == 1  # the last end iterate alone
    for e in (1, 3, EPOCHS - 1):
        ref = train(im.Alpha_Suffix(epochs=EPOCHS, alpha=1 - e / EPOCHS, comm="local"), recount)
        assert ref.schedule.trigger_epoch == e and ref.average_counter == starts[e]
        mine = strategy.averager.posthoc_average(e)
        for k, v in ref.averager.averaged().items():
            assert np.max(np.abs(mine[k] - v)) <= 1e-5 * np.max(np.abs(v)), (e, k)
    # The run's snapshots hold the sums: the framework-free reader rebuilds the same bits.
    from iteravg.core.posthoc import read_run

    run = read_run(tmp_path / "ck")
    assert run.candidates() == strategy.averager.posthoc_starts() and run.schedule_start == 3
    a, b = run.average(3), strategy.averager.posthoc_average(3)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_serde_and_sharding_default():
    strategy = im.NTA(epochs=8, n=3, comm="local", posthoc=True, posthoc_keep=4)
    assert strategy.__getnewargs_ex__()[1]["posthoc"] is True and strategy.__getnewargs_ex__()[1]["posthoc_keep"] == 4
    strategy.default_sharded(True)  # what iteravg.gluonts.Trainer does
    assert not strategy.averager.sharded
    plain = im.NTA(epochs=8, comm="local")
    assert "posthoc" not in plain.__getnewargs_ex__()[1]
    serde = pytest.importorskip("gluonts.core.serde")
    cb = im.ModelIterationAveraging(strategy)
    back = serde.load_json(serde.dump_json(cb))
    assert back.avg_strategy.__getnewargs_ex__() == strategy.__getnewargs_ex__() and back.avg_strategy.averager.posthoc
