"""``iteravg.mx.EMA``: the engine's ``EMASchedule`` behind GluonTS's strategy interface.

Differential: without warmup, the averaged network equals PyTorch's ``swa_utils`` EMA (``get_ema_multi_avg_fn``)
folded over the same iterates; with warmup, iteravg's numpy engine on the same iterates. Also: GluonTS's Trainer
drives it through ``ModelIterationAveraging`` (one fold per step, none at epoch end with ``recount_epoch_end=False``)
and an estimator holding it survives GluonTS's serde.
"""

from __future__ import annotations

import numpy as np
import pytest
from mxnet import gluon, nd

import iteravg
import iteravg.mx as ours

pytestmark = pytest.mark.filterwarnings("ignore")


def network() -> gluon.Block:
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(5, in_units=3), gluon.nn.Dense(2, in_units=5))
    net.initialize()
    return net


def set_iterate(net: gluon.Block, k: int, rng: np.random.Generator) -> None:
    for p in net.collect_params().values():
        p.set_data(nd.array(rng.standard_normal(p.shape) + k, dtype=p.dtype))


def tiny_dataset():
    import pandas as pd
    from gluonts.dataset.common import ListDataset

    t = np.arange(60)
    start = pd.Period("2020-01-01 00:00", freq="1H")
    return ListDataset([{"target": np.sin(t / 5.0 + k), "start": start} for k in range(4)], freq="1H")


def fold_ema(strategy: ours.EMA, steps: int, seed: int = 0) -> tuple:
    """Drive the strategy as GluonTS's callback does per batch (``apply``); return (average, iterates)."""
    net, rng, iterates = network(), np.random.default_rng(seed), []
    for k in range(steps):
        set_iterate(net, k, rng)
        iterates.append({n: p.data().asnumpy().copy() for n, p in net.collect_params().items()})
        strategy.apply(net)
    return {n: v.asnumpy() for n, v in strategy.averaged_model.items()}, iterates


def test_ema_without_warmup_matches_torch_swa_utils():
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ours_avg, iterates = fold_ema(ours.EMA(decay=0.9, warmup=False, comm="local"), steps=12)
    names = list(iterates[0])
    module = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(iterates[0][n].shape, dtype=torch.float64))
                                     for n in names])
    ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=False)
    for it in iterates:
        with torch.no_grad():
            for p, n in zip(module, names):
                p.copy_(torch.from_numpy(it[n].astype(np.float64)))
        ema.update_parameters(module)
    for p, n in zip(ema.module, names):  # ours folds in float32 (the parameters' dtype), torch here in float64
        np.testing.assert_allclose(ours_avg[n], p.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert ours.EMA(decay=0.9, warmup=False, comm="local").decay == 0.9


def test_ema_with_warmup_is_the_engine_schedule():
    ours_avg, iterates = fold_ema(ours.EMA(decay=0.99, min_decay=0.1, comm="local"), steps=20, seed=1)
    engine = iteravg.Averager(iteravg.EMASchedule(decay=0.99, min_decay=0.1), comm="local")
    names = list(iterates[0])
    params = {n: np.zeros_like(iterates[0][n]) for n in names}
    for it in iterates:
        for n in names:
            params[n][...] = it[n]
        engine.step(params)
    for n in names:
        assert ours_avg[n].tobytes() == engine.averaged()[n].tobytes(), n


def test_ema_in_gluonts_trainer_folds_every_step_and_round_trips_serde():
    from gluonts.core import serde
    from gluonts.mx import SimpleFeedForwardEstimator
    from gluonts.mx.trainer import Trainer

    strategy = ours.EMA(decay=0.95, comm="local")
    cb = ours.ModelIterationAveraging(strategy, recount_epoch_end=False)
    trainer = Trainer(ctx="cpu", epochs=2, num_batches_per_epoch=3, callbacks=[cb], add_default_callbacks=False)
    est = SimpleFeedForwardEstimator(prediction_length=3, context_length=6, num_hidden_dimensions=[4],
                                     batch_size=4, trainer=trainer)
    back = serde.load_json(serde.dump_json(est))
    cb2 = [c for c in back.trainer.callbacks.callbacks if isinstance(c, ours.ModelIterationAveraging)][0]
    assert type(cb2.avg_strategy) is ours.EMA and repr(cb2) == repr(cb)
    est.train(tiny_dataset())
    assert strategy.averaging_started and strategy.average_counter == 2 * 3  # one fold per batch, none at epoch end
