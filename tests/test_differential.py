"""Differential tests: GluonTS's implementation and iteravg's, driven through their callbacks with the same
random parameter sequences and metrics, must take the same trigger decisions and hold the same averages."""

import itertools

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import iteravg.mx as ours

gl = pytest.importorskip("gluonts.mx.trainer.model_iteration_averaging")
pytestmark = pytest.mark.filterwarnings("ignore")


def make_net(prefix: str = "m_") -> nn.HybridBlock:
    net = nn.HybridSequential(prefix=prefix)
    with net.name_scope():
        net.add(nn.Dense(7, in_units=5), nn.BatchNorm(in_channels=7), nn.Dense(3, in_units=7))
    net.initialize(mx.init.Xavier())
    net(mx.nd.ones((2, 5)))
    return net


def set_params(nets, rng):
    for params in zip(*(n.collect_params().values() for n in nets)):
        value = rng.standard_normal(params[0].shape).astype(np.float32)
        for p in params:
            p.set_data(mx.nd.array(value))


def weights(net):
    return [p.data().asnumpy() for p in net.collect_params().values()]


def run_both(make_strategy, metrics, batches=3, validate_every=2, seed=0, recount=True):
    rng = np.random.default_rng(seed)
    net_ref, net_ours = make_net(), make_net()
    s_ref, s_ours = make_strategy(gl), make_strategy(ours)
    cb_ref = gl.ModelIterationAveraging(avg_strategy=s_ref)
    cb_ours = ours.ModelIterationAveraging(s_ours)
    history = []
    for epoch, metric in enumerate(metrics):
        for _ in range(batches):
            set_params([net_ref, net_ours], rng)
            cb_ref.on_train_batch_end(training_network=net_ref)
            cb_ours.on_train_batch_end(training_network=net_ours)
        if epoch % validate_every == 1:
            for cb, net in ((cb_ref, net_ref), (cb_ours, net_ours)):
                cb.on_validation_epoch_start(training_network=net)
            np.testing.assert_allclose(np.concatenate([w.ravel() for w in weights(net_ref)]),
                                       np.concatenate([w.ravel() for w in weights(net_ours)]), rtol=1e-5, atol=1e-6)
            for cb, net in ((cb_ref, net_ref), (cb_ours, net_ours)):
                cb.on_validation_epoch_end(epoch_no=epoch, epoch_loss=metric, training_network=net, trainer=None)
        for cb, net in ((cb_ref, net_ref), (cb_ours, net_ours)):
            cb.on_epoch_end(epoch_no=epoch, epoch_loss=metric, training_network=net, trainer=None,
                            best_epoch_info={}, ctx=mx.cpu())
        assert s_ours.averaging_started == s_ref.averaging_started, f"trigger differs at epoch {epoch}"
        assert s_ours.average_counter == s_ref.average_counter
        history.append(s_ref.averaging_started)
        ref_avg, our_avg = s_ref.averaged_model, s_ours.averaged_model
        assert (ref_avg is None) == (our_avg is None)
        if ref_avg is not None:
            assert list(ref_avg) == list(our_avg)
            for k in ref_avg:
                np.testing.assert_allclose(our_avg[k].asnumpy(), ref_avg[k].asnumpy(), rtol=1e-5, atol=1e-6)
    for cb, net in ((cb_ref, net_ref), (cb_ours, net_ours)):
        cb.on_train_end(training_network=net, temporary_dir=None)
    for a, b in zip(weights(net_ref), weights(net_ours)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    return history


def noisy_metrics(seed, epochs=14, maximize=False):
    rng = np.random.default_rng(seed)
    trend = np.linspace(3.0, 1.0, epochs) + rng.normal(0, 0.25, epochs)
    return list(-trend if maximize else trend)


NTA_CASES = list(itertools.product([-1, 0, 1, 2, 3, 5], [False, True], [False, True], [0.0, 0.3], [0.0, 2.0]))


@pytest.mark.parametrize("n,last_n_trigger,maximize,fallback_alpha,eta", NTA_CASES)
def test_nta_matches_gluonts(n, last_n_trigger, maximize, fallback_alpha, eta):
    metrics = noisy_metrics(seed=n + 2 + 10 * last_n_trigger, maximize=maximize)
    history = run_both(
        lambda m: m.NTA(epochs=len(metrics), n=n, maximize=maximize, last_n_trigger=last_n_trigger,
                        eta=eta, fallback_alpha=fallback_alpha),
        metrics, seed=n + 2,
    )
    assert len(history) == len(metrics)


def test_nta_triggers_in_the_middle():
    """Guard against a vacuous differential test: at least one case must trigger by the metric, mid-run."""
    metrics = [5, 4, 3, 2, 3, 3, 2.5, 2.4, 2.3, 2.2]
    history = run_both(lambda m: m.NTA(epochs=10, n=2, fallback_alpha=0.0), metrics)
    assert 0 < history.index(True) < len(metrics) - 1  # (window [:-2] first exceeded at epoch 6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("eta", [0.0, 0.5, 3.0])
def test_alpha_suffix_matches_gluonts(alpha, eta):
    run_both(lambda m: m.Alpha_Suffix(epochs=8, alpha=alpha, eta=eta), [1.0] * 8, seed=int(alpha * 10 + eta))
