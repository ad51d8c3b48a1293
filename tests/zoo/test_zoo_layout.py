"""The two MXNet facts the binding depends on, checked against MXNet itself.

1. oneDNN reorders a Conv weight in place on an inference forward (the bytes under a numpy view get permuted),
   and ``DefaultLayout.refresh`` -- one C call, or the ctypes fallback -- puts it back in the same buffer.
2. ``mxnet_scalar`` reproduces the double MXNet's scalar operators compute with (dmlc-core's string parse).
"""

from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest

from iteravg.mx import ndarray
from iteravg.mx.ndarray import DefaultLayout, mxnet_scalar, numpy_view

from .models import BY_NAME, infer

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("kernel", [True, False], ids=["one-C-call", "ctypes-loop"])
def test_inference_forward_reorders_conv_weights_and_refresh_restores_them(kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(ndarray, "_LAYOUT_KERNEL", None)
    elif ndarray._LAYOUT_KERNEL is None:
        pytest.skip("_ndkernel was not built")
    built = BY_NAME["conv2d"].build("float32")
    weight = built.net[0].weight.data()
    layout = DefaultLayout([weight])
    view = numpy_view(weight)
    before = view.copy()
    infer(built, built.batch(np.random.default_rng(0)), recording=False)
    mx.nd.waitall()
    if view.tobytes() == before.tobytes():
        pytest.skip("this MXNet build did not reorder the weight (no oneDNN)")
    assert weight.asnumpy().tobytes() == before.tobytes()  # MXNet still knows the values: only the layout moved
    assert layout.refresh() is False  # same buffer ...
    assert view.tobytes() == before.tobytes()  # ... back in the default layout, so the old view is valid again


def test_mxnet_scalar_is_what_mxnet_computes_with():
    rng = np.random.default_rng(0)
    values = [(eta + 1.0) / (eta + k) for eta in (0.0, 0.5, 2.0, 3.0) for k in range(1, 200)]
    values += [float(v) for v in rng.uniform(0, 1, 300)] + [float(v) for v in 10.0 ** rng.uniform(-9, 4, 300)]
    values += [1.0, 0.1, 1e-5, 3.3e-7, 123456.789, -0.25]
    one = mx.nd.ones((1,), dtype="float64")
    got = [mxnet_scalar(v) for v in values]
    mxnet = [(one * v).asnumpy()[0] for v in values]
    assert got == mxnet
    assert sum(g != v for g, v in zip(got, values)) > len(values) // 20  # MXNet's parse really is inexact
