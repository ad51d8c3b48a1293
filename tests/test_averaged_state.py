"""The flat averaged state: GluonTS's arithmetic bit for bit, the C kernel and the numpy path agree,
non-finite iterates are refused, fingerprints see one-ulp changes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from iteravg.core import _kernel
from iteravg.core.averaged import BUCKET_ELEMS, AveragedState, FoldPlan, Layout, TensorSpec, fingerprint

SHAPES = [(3, 4), (7,), (BUCKET_ELEMS + 123,), (1,), (2, 2, 2)] + [(5,)] * 50


def make(dtypes=("float32",)):
    specs = tuple(TensorSpec(f"t{i}", s, dtypes[i % len(dtypes)]) for i, s in enumerate(SHAPES))
    return Layout(specs)


def iterates(layout, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s.shape).astype(s.dtype) for s in layout.specs] for _ in range(steps)]


def naive(layout, seq, eta=0.0):
    avg = None
    for k, xs in enumerate(seq, start=1):
        if avg is None:
            avg = [x.copy() for x in xs]
            continue
        alpha = (eta + 1.0) / (eta + k)
        for a, x in zip(avg, xs):
            a[...] = a + a.dtype.type(alpha) * (x - a)  # GluonTS: param_avg += alpha * (x - param_avg)
    return avg


def run(layout, seq, eta=0.0):
    state = AveragedState(layout)
    views = [np.empty(s.shape, s.dtype) for s in layout.specs]
    plan = FoldPlan(layout, views)
    for k, xs in enumerate(seq, start=1):
        for v, x in zip(views, xs):
            v[...] = x
        alpha = 1.0 if k == 1 else (eta + 1.0) / (eta + k)
        assert state.fold(plan, alpha).folded
    return state


@pytest.mark.parametrize("dtypes", [("float32",), ("float64",), ("float32", "float64", "float16")])
@pytest.mark.parametrize("eta", [0.0, 1.5])
def test_fold_is_bitwise_gluonts_arithmetic(dtypes, eta):
    layout = make(dtypes)
    seq = iterates(layout, 6)
    state = run(layout, seq, eta)
    for spec, ref in zip(layout.specs, naive(layout, seq, eta)):
        np.testing.assert_array_equal(state.tensor(spec.name), ref)


def test_kernel_is_built():
    assert _kernel.KERNELS is not None, "the C fold kernel was not built (pip install -e . builds it)"


def test_numpy_fallback_equals_kernel_bitwise(tmp_path):
    code = (
        "import numpy as np, sys; sys.path.insert(0, %r); import test_averaged_state as t; "
        "from iteravg.core import _kernel; assert _kernel.KERNELS is None; "
        "l = t.make(('float32', 'float64')); s = t.run(l, t.iterates(l, 5, seed=3), 0.7); "
        "np.save(%r, np.concatenate([s.current(g).view(np.uint8) for g in range(2)]))"
    ) % (os.path.dirname(__file__), str(tmp_path / "np.npy"))
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, ITERAVG_NO_KERNEL="1"), timeout=120)
    layout = make(("float32", "float64"))
    state = run(layout, iterates(layout, 5, seed=3), 0.7)
    ours = np.concatenate([state.current(g).view(np.uint8) for g in range(2)])
    np.testing.assert_array_equal(np.load(tmp_path / "np.npy"), ours)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("first", [True, False])
def test_non_finite_iterates_are_refused(bad, first):
    layout = make()
    seq = iterates(layout, 4)
    state = AveragedState(layout)
    views = [np.empty(s.shape, s.dtype) for s in layout.specs]
    plan = FoldPlan(layout, views)
    good = []
    for k, xs in enumerate(seq, start=1):
        for v, x in zip(views, xs):
            v[...] = x
        if (k == 1) == first and k <= 2:
            views[2][BUCKET_ELEMS + 5] = bad  # deep inside a large tensor
            before = [state.current(0).copy()]
            assert not state.fold(plan, 1.0 if not good else 1.0 / (len(good) + 1)).folded
            np.testing.assert_array_equal(state.current(0), before[0])
            continue
        good.append(xs)
        assert state.fold(plan, 1.0 if len(good) == 1 else 1.0 / len(good)).folded
    assert state.refused_nonfinite == 1
    for spec, ref in zip(layout.specs, naive(layout, good)):
        np.testing.assert_array_equal(state.tensor(spec.name), ref)


def test_fingerprint_sees_one_ulp_and_ignores_nothing():
    a = np.random.default_rng(0).standard_normal(1001).astype(np.float32)
    b = a.copy()
    assert np.array_equal(fingerprint([a]), fingerprint([b]))
    b[1000] = np.nextafter(b[1000], np.float32(10))
    assert not np.array_equal(fingerprint([a]), fingerprint([b]))
    assert not np.array_equal(fingerprint([a[:500], a[500:]]), fingerprint([a[500:], a[:500]]))


def test_layout_rules():
    with pytest.raises(ValueError, match="floating"):
        Layout((TensorSpec("i", (2,), "int32"),))
    with pytest.raises(ValueError, match="duplicate"):
        Layout((TensorSpec("a", (2,), "float32"), TensorSpec("a", (3,), "float32")))
    a = Layout((TensorSpec("a", (2, 3), "float32"),))
    assert a.digest() == Layout((TensorSpec("a", (2, 3), "float32"),)).digest()
    assert a.digest() != Layout((TensorSpec("a", (3, 2), "float32"),)).digest()
