"""The numpy fold (float16, and any dtype without the C kernel) refuses exactly what the C kernel refuses: a fold
whose *result* is not finite, even when every input and the increment are (float16: -19312 + -46208 rounds to
-inf). Before, the numpy path checked the increment and let such an overflow into the average."""

from __future__ import annotations

import numpy as np
import pytest

from iteravg.core import averaged
from iteravg.core.averaged import AveragedState, FoldPlan, Layout, TensorSpec


def _fold_pair(dtype: str, first: np.ndarray, second: np.ndarray, alpha: float, kernel: bool, monkeypatch):
    if not kernel:
        monkeypatch.setattr(averaged, "KERNELS", None)
    elif not averaged.KERNELS or dtype not in averaged.KERNELS:
        pytest.skip("the C kernel is not built here")
    layout = Layout((TensorSpec("x", first.shape, dtype),))
    state = AveragedState(layout)
    x = first.copy()
    plan = FoldPlan(layout, [x])
    assert state.fold(plan, 1.0).folded
    x[...] = second
    result = state.fold(plan, alpha)
    return result.folded, state.current(0).copy(), state.refused_nonfinite


def test_a_float16_fold_that_overflows_is_refused(monkeypatch):
    with np.errstate(all="ignore"):  # numpy says "overflow encountered in add"; the fold must refuse it
        folded, avg, refused = _fold_pair("float16", np.array([-19312.0], np.float16),
                                          np.array([-65504.0], np.float16), 0.99999, kernel=False,
                                          monkeypatch=monkeypatch)
    assert not folded and refused == 1
    assert avg.tolist() == [-19312.0]  # the average is untouched, still finite


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_and_c_refuse_the_same_folds_with_the_same_bits(monkeypatch, dtype):
    """Near the largest finite values, with weights close to 1: every decision and every bit agree."""
    rng = np.random.default_rng(7)
    big = float(np.finfo(dtype).max)
    for trial in range(300):
        a = (rng.uniform(-1, 1, 64) * big).astype(dtype)
        x = (rng.uniform(-1, 1, 64) * big).astype(dtype)
        if trial % 3 == 0:
            x[rng.integers(64)] = rng.choice([np.inf, -np.inf, np.nan])
        alpha = float(rng.choice([0.5, 0.9, 0.99999, 1 / 3, 0.75]))
        outcomes = []
        for kernel in (True, False):
            with monkeypatch.context() as m:
                with np.errstate(all="ignore"):
                    folded, avg, _ = _fold_pair(dtype, a, x, alpha, kernel, m)
            outcomes.append((folded, avg.tobytes()))
        assert outcomes[0] == outcomes[1], (trial, alpha)


def test_float16_refusals_match_an_exact_check():
    """float16 has no C kernel: its refusals must be exactly the folds whose float16 result is not finite."""
    rng = np.random.default_rng(3)
    layout = Layout((TensorSpec("x", (1,), "float16"),))
    outcomes = set()
    for _ in range(3000):
        alpha = float(rng.choice([0.5, 0.99999, 0.9, 0.999]))
        a, x = (rng.uniform(-1, 1, 2) * rng.choice([30000, 65504])).astype(np.float16)
        with np.errstate(all="ignore"):
            want = bool(np.isfinite(a + np.float16(np.multiply(x - a, alpha))))
        state = AveragedState(layout)
        view = np.array([a])
        plan = FoldPlan(layout, [view])
        state.fold(plan, 1.0)
        view[0] = x
        with np.errstate(all="ignore"):
            assert state.fold(plan, alpha).folded == want, (a, x, alpha)
        outcomes.add(want)
    assert outcomes == {True, False}  # both outcomes really happened
