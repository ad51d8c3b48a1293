"""Real GluonTS estimators trained by GluonTS's own ``Trainer`` (with validation data, so every epoch swaps the
averaged model in and out around an inference-mode forward): iteravg's callback vs GluonTS's, same seeds,
bitwise-identical networks at the end.

WaveNet needs one concession on the reference side: GluonTS's own ``load_cached_model`` crashes on its Conv1D
weights after the validation forward (MXNet 1.9.1 cannot ``set_data`` into a 3-d array that oneDNN left in a
blocked layout: ``Check failed: to.IsDefaultData()``), so the reference callback restores the default layout
(not the values) first. iteravg's callback needs no such help -- and without its oneDNN handling, the WaveNet
comparison fails.
"""

from __future__ import annotations

import random

import mxnet as mx
import numpy as np
import pandas as pd
import pytest

import iteravg.mx as ours

from .models import to_default_layout

gl = pytest.importorskip("gluonts.mx.trainer.model_iteration_averaging")
pytestmark = pytest.mark.filterwarnings("ignore")

EPOCHS = 3


def dataset():
    from gluonts.dataset.common import ListDataset

    rng = np.random.default_rng(0)
    t = np.arange(80)
    series = [np.sin(t / 6.0 + phase) + 0.3 * rng.standard_normal(len(t)) for phase in rng.uniform(0, 6, 4)]
    start = pd.Period("2020-01-01 00:00", freq="1H")
    return ListDataset([{"target": s, "start": start} for s in series], freq="1H")


def estimator(kind: str, trainer):
    from gluonts import mx as gmx

    if kind == "mqcnn":
        return gmx.MQCNNEstimator(freq="1H", prediction_length=4, context_length=12, channels_seq=[4, 4],
                                  kernel_size_seq=[3, 3], dilation_seq=[1, 2], decoder_mlp_dim_seq=[4],
                                  quantiles=[0.5], batch_size=8, trainer=trainer)
    if kind == "wavenet":
        return gmx.WaveNetEstimator(freq="1H", prediction_length=4, n_residue=4, n_skip=4, dilation_depth=2,
                                    n_stacks=1, num_bins=16, embedding_dimension=2, batch_size=8, trainer=trainer)
    return gmx.DeepAREstimator(freq="1H", prediction_length=4, context_length=8, num_layers=2, num_cells=4,
                               batch_size=8, trainer=trainer)


def train(kind: str, callback, hybridize: bool):
    from gluonts.mx.trainer import Trainer

    mx.random.seed(7)
    np.random.seed(7)
    random.seed(7)
    trainer = Trainer(ctx="cpu", epochs=EPOCHS, num_batches_per_epoch=3, learning_rate=1e-2, hybridize=hybridize,
                      callbacks=[callback], add_default_callbacks=False)
    predictor = estimator(kind, trainer).train(dataset(), dataset())
    return [p.data().asnumpy() for p in predictor.prediction_net.collect_params().values()]


class GluonTSReference(gl.ModelIterationAveraging):
    """GluonTS's callback, with the network's layout (never its values) restored before GluonTS's set_data."""

    def on_validation_epoch_end(self, **kwargs):
        to_default_layout(kwargs["training_network"])
        return super().on_validation_epoch_end(**kwargs)

    def on_train_end(self, **kwargs):
        to_default_layout(kwargs["training_network"])
        return super().on_train_end(**kwargs)


@pytest.mark.parametrize("hybridize", [True, False], ids=["hybridized", "imperative"])
@pytest.mark.parametrize("kind", ["mqcnn", "wavenet", "deepar"])
def test_estimator_trained_with_iteravg_equals_gluonts(kind, hybridize):
    ref_strategy = gl.Alpha_Suffix(epochs=EPOCHS, alpha=0.7, eta=0.5)
    ref = train(kind, GluonTSReference(avg_strategy=ref_strategy), hybridize)
    strategy = ours.Alpha_Suffix(epochs=EPOCHS, alpha=0.7, eta=0.5)
    got = train(kind, ours.ModelIterationAveraging(avg_strategy=strategy), hybridize)
    assert strategy.average_counter == ref_strategy.average_counter > 1
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.tobytes() == b.tobytes(), f"{kind}: parameter {i} {a.shape} differs"
