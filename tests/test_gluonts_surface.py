"""The whole GluonTS surface of the strategies, side by side with GluonTS's own: held dicts stay current,
assignable attributes, numpy scalars, serialisation with ``gluonts.core.serde``, readable ``repr``."""

from __future__ import annotations

import numpy as np
import pytest

import iteravg.mx as ours
from test_differential import make_net, set_params

gl = pytest.importorskip("gluonts.mx.trainer.model_iteration_averaging")
serde = pytest.importorskip("gluonts.core.serde")
pytestmark = pytest.mark.filterwarnings("ignore")


def started(strategy):
    strategy.averaging_started = True
    return strategy


def bits(mapping):
    return {k: v.asnumpy().tobytes() for k, v in mapping.items()}


def test_held_averaged_model_stays_current_like_gluontss():
    rng = np.random.default_rng(0)
    a, b = make_net("g_"), make_net("o_")
    theirs, mine = started(gl.IterationAveragingStrategy(eta=1.0)), started(ours.IterationAveragingStrategy(eta=1.0))
    held_theirs = held_mine = None
    for step in range(6):
        set_params([a, b], rng)
        t, m = theirs.apply(a), mine.apply(b)
        if step == 0:
            held_theirs, held_mine = t, m  # a user keeps the dict apply() returned
    assert list(held_mine) == list(b.collect_params().keys())
    assert list(bits(held_mine).values()) == list(bits(held_theirs).values())
    assert mine.apply(b) is held_mine or bits(mine.apply(b)) == bits(held_mine)


def test_resetting_averaged_model_to_none_restarts_the_average_as_in_gluonts():
    rng = np.random.default_rng(1)
    a, b = make_net("g_"), make_net("o_")
    theirs, mine = started(gl.NTA(epochs=5)), started(ours.NTA(epochs=5))
    for step in range(7):
        set_params([a, b], rng)
        if step == 3:
            theirs.averaged_model = None
            mine.averaged_model = None
            assert mine.averaged_model is None
        theirs.apply(a)
        mine.apply(b)
    assert theirs.average_counter == mine.average_counter == 7
    assert list(bits(mine.averaged_model).values()) == list(bits(theirs.averaged_model).values())


def test_assignable_attributes_and_numpy_scalars():
    s = ours.NTA(epochs=np.int64(10), n=np.int32(2), eta=np.float32(0.5), fallback_alpha=np.float64(0.1))
    g = gl.NTA(epochs=np.int64(10), n=np.int32(2), eta=np.float32(0.5), fallback_alpha=np.float64(0.1))
    assert (s.n, s.eta, s.fallback_alpha_suffix) == (2, 0.5, g.fallback_alpha_suffix)
    s.eta = np.float64(2.0)
    s.average_counter = 3
    s.averaging_started = True
    assert (s.eta, s.average_counter, s.averaging_started) == (2.0, 3, True)
    s.cached_model = None
    with pytest.raises(ValueError, match="eta must be a finite number > -1"):
        s.eta = -1
    with pytest.raises(ValueError, match="epochs"):
        ours.Alpha_Suffix(epochs=np.float64(3.5))
    ours.Alpha_Suffix(epochs=np.uint8(4), alpha=np.float16(0.5))


def test_averaged_model_assignment_replaces_the_average():
    rng = np.random.default_rng(2)
    net = make_net("o_")
    s = started(ours.IterationAveragingStrategy())
    set_params([net], rng)
    s.apply(net)
    replacement = {k: v.data() * 0 + 1 for k, v in net.collect_params().items()}
    s.averaged_model = replacement
    assert all(np.all(v.asnumpy() == 1) for v in s.averaged_model.values())


def test_strategies_and_callback_round_trip_through_gluonts_serde():
    from gluonts.mx import SimpleFeedForwardEstimator
    from gluonts.mx.trainer import Trainer

    for strategy in (ours.NTA(epochs=np.int64(8), n=3, maximize=True, eta=0.5), ours.Alpha_Suffix(epochs=8, alpha=0.3),
                     ours.IterationAveragingStrategy(eta=2.0, sync="broadcast", sync_every_batches=4)):
        cb = ours.ModelIterationAveraging(strategy, recount_epoch_end=False, keep_checkpoints=3)
        est = SimpleFeedForwardEstimator(prediction_length=3, trainer=Trainer(epochs=8, callbacks=[cb]))
        back = serde.load_json(serde.dump_json(est))
        cb2 = [c for c in back.trainer.callbacks.callbacks if isinstance(c, ours.ModelIterationAveraging)][0]
        assert repr(cb2) == repr(cb) and cb2.avg_strategy.__getnewargs_ex__() == strategy.__getnewargs_ex__()
        assert type(cb2.avg_strategy) is type(strategy) and repr(strategy).startswith(type(strategy).__name__ + "(")
