"""The validation swap on every zoo model: ``load_averaged_model`` -> inference forward (plain, and GluonTS's
``record()`` + ``predict_mode()``) -> ``load_cached_model`` must leave the training weights bit-identical, and the
averaged network must compute exactly what MXNet computes with the averaged weights loaded by ``set_data``.

Under oneDNN an inference forward reorders Conv / FullyConnected weights in place into a blocked layout; these
tests fail if anything reads or writes parameter memory assuming the default layout.
"""

from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import iteravg.mx as ours

from .models import BY_NAME, cases, infer, make_trainer, step, to_default_layout, weights

pytestmark = pytest.mark.filterwarnings("ignore")


def same_bits(a, b) -> bool:
    return len(a) == len(b) and all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


HYBRIDIZE = {"imperative": None, "hybridized": {}, "static": dict(static_alloc=True, static_shape=True)}


@pytest.mark.parametrize("hybridize", list(HYBRIDIZE))
@pytest.mark.parametrize("name,dtype", cases())
def test_swap_round_trip_keeps_training_weights(name, dtype, hybridize):
    model = BY_NAME[name]
    built, twin = model.build(dtype), model.build(dtype)
    if HYBRIDIZE[hybridize] is not None:
        built.net.hybridize(**HYBRIDIZE[hybridize])
        twin.net.hybridize(**HYBRIDIZE[hybridize])
    trainer = make_trainer(built)
    strategy = ours.IterationAveragingStrategy(eta=0.5)
    strategy.averaging_started = True
    rng = np.random.default_rng(11)
    x = built.batch(np.random.default_rng(5))
    for round_ in range(3):
        for b in range(3):
            step(model, dtype, built, trainer, 10 * round_ + b, built.batch(rng))
            strategy.update_average(built.net)
        if round_ == 1:
            infer(built, x, recording=False)  # training weights left in oneDNN layout before the swap
        training = weights(built.net)
        strategy.load_averaged_model(built.net)
        averaged = [v.asnumpy() for v in strategy.averaged_model.values()]
        assert same_bits(weights(built.net), averaged), "the averaged weights were not loaded exactly"
        outs = [infer(built, x, recording=r).asnumpy() for r in (True, False, True)]
        # The same weights put in by MXNet itself must give the same outputs: no stale oneDNN copy is used.
        to_default_layout(twin.net)
        for p, value in zip(twin.net.collect_params().values(), strategy.averaged_model.values()):
            p.set_data(value.copy())
        expected = [infer(twin, x, recording=r).asnumpy() for r in (True, False, True)]
        if hybridize != "static" or model.static_alloc_reproducible:
            assert same_bits(outs, expected), "the averaged network computes something else than its weights"
        assert same_bits(weights(built.net), averaged), "an inference forward changed the loaded average"
        strategy.load_cached_model(built.net)
        assert same_bits(weights(built.net), training), f"round {round_}: training weights changed by the swap"


@pytest.mark.parametrize("name", ["conv1d", "conv2d"])
def test_context_manager_swap_after_inference(name):
    """``averaged_weights`` (iteravg's exception-safe swap) around an inference forward, then training resumes."""
    model = BY_NAME[name]
    built = model.build("float32")
    trainer = make_trainer(built)
    strategy = ours.NTA(epochs=3, n=1)
    strategy.averaging_started = True
    rng = np.random.default_rng(0)
    for b in range(4):
        step(model, "float32", built, trainer, b, built.batch(rng))
        strategy.update_average(built.net)
    training = weights(built.net)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with strategy.averaged_weights(built.net):
            infer(built, built.batch(rng), recording=True)
            raise RuntimeError("evaluation failed")
    assert same_bits(weights(built.net), training)
    step(model, "float32", built, trainer, 99, built.batch(rng))  # training continues on intact weights
    assert np.isfinite(np.concatenate([w.ravel() for w in weights(built.net)])).all()


def test_onednn_fused_subgraph_sees_the_swapped_weights():
    """``hybridize(backend="MKLDNN")`` fuses Conv + BatchNorm and caches the folded weights until the weights'
    version changes; numpy writes do not change it by themselves, so the swap must (``ModelBinding.write``)."""

    def make():
        net = nn.HybridSequential()
        net.add(nn.Conv2D(8, 3, in_channels=3), nn.BatchNorm(in_channels=8), nn.Activation("relu"),
                nn.Conv2D(4, 3, in_channels=8))
        mx.random.seed(1)
        net.initialize(mx.init.Xavier())
        net.hybridize(backend="MKLDNN", static_alloc=True, static_shape=True)
        return net

    x = mx.nd.array(np.random.default_rng(0).standard_normal((2, 3, 8, 8)))
    net, twin = make(), make()
    strategy = ours.IterationAveragingStrategy()
    strategy.averaging_started = True
    net(x)
    strategy.update_average(net)  # the average: the initial weights, which the twin keeps
    for p in net.collect_params().values():  # "training" moves the weights; the fused graph runs on them
        p.set_data(p.data() * 1.5 + 0.1)
    before = net(x).asnumpy()
    training = [p.data().asnumpy() for p in net.collect_params().values()]
    strategy.load_averaged_model(net)
    assert same_bits([net(x).asnumpy()], [twin(x).asnumpy()]), "stale fused weights after the swap"
    strategy.load_cached_model(net)
    assert same_bits([p.data().asnumpy() for p in net.collect_params().values()], training)
    assert same_bits([net(x).asnumpy()], [before]), "stale fused weights after swapping back"
