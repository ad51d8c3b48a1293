"""GluonTS's own test cases for NTA and Alpha_Suffix (test/mx/trainer/test_model_iteration_averaging.py),
run against iteravg with only the import changed: same model, same loss list, same expected averages."""

import math

import mxnet as mx
import numpy as np
import pandas as pd
import pytest

from iteravg.mx import NTA, Alpha_Suffix  # the one changed import

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def model():
    from gluonts.dataset.common import ListDataset
    from gluonts.mx import SimpleFeedForwardEstimator
    from gluonts.mx.trainer import Trainer

    N, T, prediction_length, freq = 10, 100, 24, "1H"
    start = pd.Period("01-01-2019", freq=freq)
    train_ds = ListDataset(
        [{"target": x, "start": start} for x in np.zeros((N, T))[:, :-prediction_length]], freq=freq
    )
    estimator = SimpleFeedForwardEstimator(
        num_hidden_dimensions=[10],
        prediction_length=prediction_length,
        context_length=T,
        trainer=Trainer(ctx="cpu", epochs=1, learning_rate=1e-3, num_batches_per_epoch=1),
    )
    return estimator.train(train_ds).prediction_net


def _assert_all(params, val):
    for v in params.values():
        for arr in v.list_data():
            assert mx.nd.norm(arr - val).asscalar() < 1e-30


@pytest.mark.parametrize("n", [-2, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 20])
@pytest.mark.parametrize("last_n_trigger", [True, False])
def test_NTA_V1(model, n, last_n_trigger):
    params = model.collect_params()
    loss_list = [5, 4, 3, 2, 3, 3, 3, 3, 3, 3, 3]
    avg_strategy = NTA(epochs=len(loss_list), n=n, last_n_trigger=last_n_trigger, fallback_alpha=0.0)
    for i, loss in enumerate(loss_list):
        for v in params.values():
            for arr in v.list_data():
                arr[:] = i
        avg_strategy.update_average_trigger(metric=loss)
        avg_strategy.apply(model)
    avg_strategy.load_cached_model(model)  # nothing cached yet: no change
    _assert_all(params, 10)
    avg_strategy.load_averaged_model(model)
    len_limit = (len(loss_list) - 1) if last_n_trigger else 6
    if n <= 0 or n > len_limit:
        _assert_all(params, 10)
    elif last_n_trigger:
        _assert_all(params, 7 if n <= 4 else (n + 10) / 2.0)
    else:
        _assert_all(params, (4 + n + 10) / 2.0)
    avg_strategy.load_cached_model(model)
    _assert_all(params, 10)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0])
def test_Alpha_Suffix(model, alpha):
    params = model.collect_params()
    loss_list = [5, 4, 3, 2, 3, 3, 3, 3, 3, 3, 3]
    avg_strategy = Alpha_Suffix(epochs=len(loss_list), alpha=alpha)
    for i, _loss in enumerate(loss_list):
        for v in params.values():
            for arr in v.list_data():
                arr[:] = i
        avg_strategy.update_average_trigger(epoch=i + 1)
        avg_strategy.apply(model)
    avg_strategy.load_cached_model(model)
    _assert_all(params, 10)
    avg_strategy.load_averaged_model(model)
    n = max(int(math.ceil(len(loss_list) * (1 - alpha))), 1)
    if n > len(loss_list):
        _assert_all(params, 10)
    else:
        _assert_all(params, (n + 9) / 2.0)
    avg_strategy.load_cached_model(model)
    _assert_all(params, 10)
