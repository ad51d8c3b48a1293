"""Structural names: a model's identity (layout digest, cross-rank check, checkpoints, resume) must not depend on
Gluon's process-wide block counter, while ``averaged_model`` keeps GluonTS's ``collect_params()`` keys."""

from __future__ import annotations

import pytest

import iteravg.mx as ours
from iteravg.mx.binding import ModelBinding

from .models import BY_NAME, ZOO, cases

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("name,dtype", cases())
def test_same_architecture_built_twice_is_the_same_model(name, dtype):
    model = BY_NAME[name]
    first, second = model.build(dtype), model.build(dtype)
    b1, b2 = ModelBinding(first.net), ModelBinding(second.net)
    assert b1.param_names != b2.param_names  # Gluon's counter moved on: the auto names differ ...
    assert b1.layout.digest() == b2.layout.digest()  # ... the structural identity does not
    assert b1.layout.names == b2.layout.names
    assert b1.param_names == list(first.net.collect_params().keys())
    # Structural names are what save_parameters writes, so checkpoints load into a fresh process's model.
    saved = set(first.net._collect_params_with_prefix().keys())
    assert set(b1.layout.names) <= saved
    assert all(b1.structural[p] == s for p, s in zip(b1.param_names, b1.layout.names))


def test_structural_names_look_like_save_parameters_keys():
    names = ModelBinding(BY_NAME["lstm"].build("float32").net).layout.names
    # gluon.rnn layers save their fused parameters under the unfused cells' keys; so do we
    assert "rnn._unfused.0.i2h_weight" in names and "head.weight" in names, names
    assert ModelBinding(BY_NAME["dense"].build("float32").net).layout.names == ["0.weight", "0.bias", "1.weight",
                                                                                "1.bias"]


def test_shared_parameters_appear_once():
    built = BY_NAME["shared"].build("float32")
    binding = ModelBinding(built.net)
    assert len(binding.layout.specs) == len(list(built.net.collect_params().keys())) == 4
    assert "first.weight" in binding.layout.names and not any(n.startswith("second.") for n in binding.layout.names)


def test_averaged_model_keeps_gluonts_keys():
    built = BY_NAME["conv1d"].build("float32")
    strategy = ours.IterationAveragingStrategy()
    strategy.averaging_started = True
    strategy.update_average(built.net)
    assert list(strategy.averaged_model) == list(built.net.collect_params().keys())
    for key, p in built.net.collect_params().items():
        assert strategy.averaged_model[key].asnumpy().tobytes() == p.data().asnumpy().tobytes()


def test_every_zoo_model_binds():
    """Guard for the registry itself: every runnable case builds and binds with a float layout."""
    for model in ZOO:
        for dtype in model.runnable():
            layout = ModelBinding(model.build(dtype).net).layout
            assert layout.num_elements > 0
            expected = {"float16+float32": {"float16", "float32"}}.get(dtype, {dtype})
            if model.name == "embedding_batchnorm" and dtype == "float16":
                expected = {"float16", "float32"}  # MXNet keeps BatchNorm's parameters in float32
            assert set(layout.groups) == expected, (model.name, dtype, layout.groups)
