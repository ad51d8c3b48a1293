"""The real client: GluonTS's own Trainer training a GluonTS estimator with iteravg's callback.

The same seeded training run is done twice, once with GluonTS's ``ModelIterationAveraging`` and once with
iteravg's; the networks the two trainers hand back (the averaged models, loaded at train end) must agree.
"""

from __future__ import annotations

import random

import mxnet as mx
import numpy as np
import pandas as pd
import pytest

import iteravg.mx as ours

gl_avg = pytest.importorskip("gluonts.mx.trainer.model_iteration_averaging")
pytestmark = pytest.mark.filterwarnings("ignore")

EPOCHS = 6


def dataset():
    from gluonts.dataset.common import ListDataset

    rng = np.random.default_rng(0)
    t = np.arange(120)
    series = [np.sin(t / 6.0 + phase) + 0.3 * rng.standard_normal(len(t)) for phase in rng.uniform(0, 6, 8)]
    start = pd.Period("2020-01-01 00:00", freq="1H")
    return ListDataset([{"target": s, "start": start} for s in series], freq="1H")


def train(callback, hybridize: bool = True):
    from gluonts.mx import SimpleFeedForwardEstimator
    from gluonts.mx.trainer import Trainer

    mx.random.seed(7)
    np.random.seed(7)
    random.seed(7)
    estimator = SimpleFeedForwardEstimator(
        num_hidden_dimensions=[16], prediction_length=6, context_length=24,
        trainer=Trainer(ctx="cpu", epochs=EPOCHS, num_batches_per_epoch=5, learning_rate=1e-2,
                        hybridize=hybridize, callbacks=[callback], add_default_callbacks=False),
    )
    predictor = estimator.train(dataset(), dataset())  # with validation data: exercises the swap hooks
    return {k: v.data().asnumpy() for k, v in predictor.prediction_net.collect_params().items()}


def test_iteravg_callback_in_the_gluonts_trainer_matches_gluonts_callback():
    ref_strategy = gl_avg.NTA(epochs=EPOCHS, n=1, fallback_alpha=0.5)
    ref = train(gl_avg.ModelIterationAveraging(avg_strategy=ref_strategy))
    strategy = ours.NTA(epochs=EPOCHS, n=1, fallback_alpha=0.5)
    got = train(ours.ModelIterationAveraging(avg_strategy=strategy))
    assert strategy.averaging_started and strategy.average_counter == ref_strategy.average_counter > 1
    assert len(got) == len(ref)  # names differ only by Gluon's global block counter; compare in order
    for (k, a), b in zip(ref.items(), got.values()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=k)


def test_checkpoint_written_from_the_gluonts_trainer_loads(tmp_path):
    from gluonts.mx import SimpleFeedForwardEstimator  # noqa: F401

    strategy = ours.Alpha_Suffix(epochs=EPOCHS, alpha=0.5)
    params = train(ours.ModelIterationAveraging(strategy, checkpoint_dir=tmp_path))
    avg = strategy.averaged_model
    for name, value in params.items():  # on_train_end loaded the average into the network
        np.testing.assert_array_equal(value, avg[name].asnumpy())
    loaded = mx.nd.load(str(tmp_path / "averaged.params"))
    structural = strategy.binding.structural
    for name, value in params.items():
        np.testing.assert_array_equal(loaded[structural[name]].asnumpy(), value)
