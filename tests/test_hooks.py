"""Hooks called in unusual orders behave as GluonTS's; swaps are exception-safe; the recount opt-out."""

from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest

import iteravg.mx as ours
from test_differential import make_net, set_params, weights

gl = pytest.importorskip("gluonts.mx.trainer.model_iteration_averaging")
pytestmark = pytest.mark.filterwarnings("ignore")


def flat(net):
    return np.concatenate([w.ravel() for w in weights(net)])


SEQUENCES = {
    "cached first": ["load_cached", "batch", "epoch", "load_cached"],
    "validation before averaging": ["val_start", "val_end", "batch", "val_start", "val_end"],
    "averaged twice then cached": ["start", "batch", "batch", "load_avg", "load_avg", "load_cached"],
    "train end without epochs": ["train_end"],
    "train end after averaging": ["start", "batch", "batch", "train_end"],
    "cached after train end": ["start", "batch", "train_end", "load_cached"],
}


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_unusual_hook_orders_match_gluonts(name):
    rng = np.random.default_rng(1)
    nets = [make_net(), make_net()]
    strategies = [gl.NTA(epochs=4, n=1), ours.NTA(epochs=4, n=1)]
    cbs = [gl.ModelIterationAveraging(avg_strategy=strategies[0]), ours.ModelIterationAveraging(strategies[1])]
    set_params(nets, rng)  # same starting weights
    for step in SEQUENCES[name]:
        if step == "batch":
            set_params(nets, rng)
        for cb, s, net in zip(cbs, strategies, nets):
            if step == "start":
                s.averaging_started = True
            elif step == "batch":
                cb.on_train_batch_end(training_network=net)
            elif step == "epoch":
                cb.on_epoch_end(epoch_no=0, epoch_loss=1.0, training_network=net, trainer=None,
                                best_epoch_info={}, ctx=mx.cpu())
            elif step == "val_start":
                cb.on_validation_epoch_start(training_network=net)
            elif step == "val_end":
                cb.on_validation_epoch_end(epoch_no=0, epoch_loss=1.0, training_network=net, trainer=None)
            elif step == "load_avg":
                s.load_averaged_model(net)
            elif step == "load_cached":
                s.load_cached_model(net)
            elif step == "train_end":
                cb.on_train_end(training_network=net, temporary_dir=None)
        np.testing.assert_allclose(flat(nets[1]), flat(nets[0]), rtol=1e-6, err_msg=f"after {step}")
        assert strategies[1].average_counter == strategies[0].average_counter


def test_averaged_weights_restores_training_weights_on_exception():
    rng = np.random.default_rng(2)
    net = make_net()
    s = ours.IterationAveragingStrategy()
    s.averaging_started = True
    for _ in range(3):
        set_params([net], rng)
        s.apply(net)
    training = flat(net)
    with pytest.raises(RuntimeError, match="boom"):
        with s.averaged_weights(net):
            assert not np.array_equal(flat(net), training)  # the average is in
            raise RuntimeError("boom")
    np.testing.assert_array_equal(flat(net), training)


def test_recount_opt_out_counts_each_iterate_once():
    rng = np.random.default_rng(3)
    net = make_net()
    s = ours.Alpha_Suffix(epochs=4, alpha=0.5)
    cb = ours.ModelIterationAveraging(s, recount_epoch_end=False)
    seen = []
    for epoch in range(4):
        for _ in range(3):
            set_params([net], rng)
            cb.on_train_batch_end(training_network=net)
            if s.averaging_started:
                seen.append(flat(net))
        cb.on_epoch_end(epoch_no=epoch, epoch_loss=1.0, training_network=net, trainer=None, best_epoch_info={},
                        ctx=mx.cpu())
        if s.averaging_started and not seen:
            seen.append(flat(net))  # the trigger epoch's end iterate starts the average, once
    assert s.average_counter == len(seen) == 1 + 3 * 2
    avg = np.concatenate([v.asnumpy().ravel() for v in s.averaged_model.values()])
    np.testing.assert_allclose(avg, np.mean(seen, axis=0), rtol=1e-5, atol=1e-6)


def test_callback_is_a_gluonts_callback():
    from gluonts.mx.trainer.callback import Callback

    assert isinstance(ours.ModelIterationAveraging(ours.NTA(epochs=2)), Callback)
