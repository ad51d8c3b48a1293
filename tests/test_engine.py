"""``iteravg.Averager`` on one process, with plain numpy parameters: arithmetic, schedules, swaps, NaN refusal,
state and snapshots (safetensors, read by the reference implementation), the resume rule, and no framework import."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

import iteravg
from iteravg.checkpoint import CheckpointError
from iteravg.core.tensorfile import load_tensors, save_tensors


def model(dtype=np.float32):
    return {"w": np.zeros((3, 4), dtype=dtype), "b": np.zeros(4, dtype=dtype)}


def set_iterate(params, k, rng):
    for v in params.values():
        v[...] = rng.standard_normal(v.shape).astype(v.dtype) + k


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("eta", [0.0, 2.5])
def test_poly_fold_is_the_formula_bit_for_bit(dtype, eta):
    """a_1 = x_1, a_k = a + alpha_k (x_k - a) in the tensors' dtype, alpha_k = (eta+1)/(eta+k)."""
    rng = np.random.default_rng(0)
    sched = iteravg.Schedule(eta=eta)
    sched.averaging_started = True
    avg, params = iteravg.Averager(sched, comm="local"), model(dtype)
    ref = None
    for k in range(1, 8):
        set_iterate(params, k, rng)
        assert avg.step(params)
        if ref is None:
            ref = {n: v.copy() for n, v in params.items()}
        else:
            alpha = dtype((eta + 1.0) / (eta + k))
            ref = {n: (ref[n] + alpha * (params[n] - ref[n])).astype(dtype) for n in ref}
    for n, v in avg.averaged().items():
        assert v.tobytes() == ref[n].tobytes(), n


def test_ema_matches_timm_model_ema_v3():
    """timm's ModelEmaV3.get_decay with warmup, and ema = decay * ema + (1 - decay) * x (float64 here)."""
    rng = np.random.default_rng(1)
    avg, params = iteravg.Averager(iteravg.EMASchedule(decay=0.99, min_decay=0.1), comm="local"), model(np.float64)
    ema = None
    for step in range(30):
        set_iterate(params, step, rng)
        avg.step(params)
        decay = 0.0 if step == 0 else max(min(1 - (1 + step / 1.0) ** (-2 / 3), 0.99), 0.1)
        ema = {n: v.copy() for n, v in params.items()} if ema is None else \
            {n: ema[n] * decay + (1 - decay) * params[n] for n in ema}
    for n, v in avg.averaged().items():
        np.testing.assert_allclose(v, ema[n], rtol=1e-12, atol=1e-12)


def test_ema_update_after_step_and_every_n_steps():
    avg = iteravg.Averager(iteravg.EMASchedule(decay=0.5, update_after_step=3), comm="local")
    params = model()
    assert [avg.step(params) for _ in range(5)] == [False, False, False, True, True]
    every = iteravg.Schedule()
    every.averaging_started = True
    avg = iteravg.Averager(iteravg.EveryNSteps(every, 3), comm="local")
    assert [avg.step(params) for _ in range(7)] == [False, False, True, False, False, True, False]
    assert avg.average_counter == 2 and avg.schedule.state_dict()["step_count"] == 7


def test_nta_epoch_end_triggers_folds_and_syncs():
    avg, params, rng = iteravg.Averager(iteravg.NTASchedule(epochs=10, n=1), comm="local"), model(), \
        np.random.default_rng(2)
    for epoch, metric in enumerate([3.0, 2.0, 3.5, 1.0], start=1):  # 3.5 > min(logs[:-1])
        set_iterate(params, epoch, rng)
        avg.step(params)
        avg.epoch_end(params, metric=metric)
        assert avg.averaging_started == (epoch >= 3)
    assert avg.schedule.trigger_epoch == 3 and avg.average_counter == 3  # epoch 3's end, epoch 4's step + end


def test_swapped_restores_training_weights_even_on_error():
    sched = iteravg.Schedule()
    sched.averaging_started = True
    avg, params, rng = iteravg.Averager(sched, comm="local"), model(), np.random.default_rng(3)
    for k in range(3):
        set_iterate(params, k, rng)
        avg.step(params)
    training = {n: v.copy() for n, v in params.items()}
    with pytest.raises(RuntimeError):
        with avg.swapped(params):
            assert all(np.array_equal(params[n], v) for n, v in avg.averaged().items())
            raise RuntimeError("evaluation failed")
    assert all(params[n].tobytes() == v.tobytes() for n, v in training.items())


def test_nan_iterates_are_refused_and_all_refused_finalize_keeps_the_model(caplog):
    sched = iteravg.Schedule()
    sched.averaging_started = True
    avg, params = iteravg.Averager(sched, comm="local"), model()
    params["w"][0, 0] = np.nan
    with caplog.at_level(logging.WARNING, logger="iteravg"):
        assert not avg.step(params) and not avg.step(params)
        assert avg.averaged() is None and avg.refused_nonfinite == 2 and avg.average_counter == 0
        assert not avg.finalize(params)
    assert "no iterate could be averaged (2 refused" in caplog.text
    params["w"][0, 0] = 1.0
    assert avg.step(params) and avg.average_counter == 1


def test_bad_params_name_the_argument():
    avg = iteravg.Averager(iteravg.NTASchedule(epochs=3), comm="local")
    with pytest.raises(ValueError, match=r"params\['w'\] must be a C-contiguous"):
        avg.fold({"w": np.zeros((4, 4), np.float32)[:, ::2]})
    with pytest.raises(ValueError, match=r"params\['w'\] must be a numpy array"):
        avg.fold({"w": [1.0, 2.0]})
    with pytest.raises(ValueError, match="only floating-point"):
        avg.fold({"w": np.zeros(3, np.int32)})
    avg.fold(model())
    with pytest.raises(ValueError, match="changed"):
        avg.fold({"w": np.zeros((3, 5), np.float32), "b": np.zeros(4, np.float32)})
    for bad in (dict(metric_reduce="median"), dict(sync="gossip"), dict(sync_every_batches=-1)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            iteravg.Averager(iteravg.NTASchedule(epochs=3), comm="local", **bad)


def test_save_and_load_restore_bits_and_progress(tmp_path):
    rng = np.random.default_rng(4)
    a, params = iteravg.Averager(iteravg.NTASchedule(epochs=6, n=1, eta=0.5), comm="local"), model()
    for epoch, metric in enumerate([3.0, 2.0, 4.0], start=1):  # starts at epoch 3
        set_iterate(params, epoch, rng)
        a.step(params)
        a.epoch_end(params, metric=metric)
    snap = a.save(tmp_path / "ck")
    assert snap.name == "epoch-000003"
    # Convenience links only for files the snapshot holds: none dangles (a numpy snapshot has no averaged.params).
    links = sorted(p.name for p in (tmp_path / "ck").iterdir() if p.is_symlink())
    assert links == ["averaged.safetensors", "averaging-state.json", "latest"]
    assert all((tmp_path / "ck" / n).exists() for n in links)
    b = iteravg.Averager(iteravg.NTASchedule(epochs=6, n=1, eta=0.5), comm="local")
    b.load(tmp_path / "ck", model())
    assert b.state_dict() == a.state_dict()
    for n, v in a.averaged().items():
        assert b.averaged()[n].tobytes() == v.tobytes()
    # The averaged model is a standard safetensors file: the reference implementation reads it.
    st = pytest.importorskip("safetensors.numpy")
    theirs = st.load_file(str(snap / "averaged.safetensors"))
    assert {n: v.tobytes() for n, v in theirs.items()} == {n: v.tobytes() for n, v in a.averaged().items()}


def test_resume_rule_constructor_config_wins_and_each_difference_is_warned(tmp_path, caplog):
    a, params = iteravg.Averager(iteravg.NTASchedule(epochs=20, n=1), comm="local"), model()
    for metric in (3.0, 2.0):
        a.step(params)
        a.epoch_end(params, metric=metric)
    a.save(tmp_path / "ck")
    b = iteravg.Averager(iteravg.NTASchedule(epochs=40, n=2, eta=1.0), comm="local")
    with caplog.at_level(logging.WARNING, logger="iteravg"):
        b.load(tmp_path / "ck", model())
    for arg in ("epochs=40", "n=2", "eta=1.0"):
        assert arg in caplog.text
    assert b.schedule.epochs == 40 and b.schedule.fallback_alpha_suffix == 38.0  # not the checkpoint's 19
    assert b.schedule.val_logs == [3.0, 2.0]
    c = iteravg.Averager(iteravg.AlphaSuffixSchedule(epochs=20), comm="local")
    with pytest.raises(CheckpointError, match="'nta' averaging state, but this strategy is 'alpha_suffix'"):
        c.load(tmp_path / "ck", model())
    with pytest.raises(CheckpointError, match="another model"):
        iteravg.Averager(iteravg.NTASchedule(epochs=20), comm="local").load(tmp_path / "ck", {"w": np.zeros(2)})


def test_tensorfile_round_trip_and_damage(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.array(1.5), "c": np.zeros(0, np.float64)}
    save_tensors(tmp_path / "t.safetensors", tensors)
    back = load_tensors(tmp_path / "t.safetensors")
    assert {k: (v.dtype, v.shape, v.tobytes()) for k, v in back.items()} == \
        {k: (v.dtype, v.shape, v.tobytes()) for k, v in tensors.items()}
    st = pytest.importorskip("safetensors.numpy")
    st.save_file({"x": np.ones((2, 2), np.float32)}, str(tmp_path / "theirs.safetensors"))
    assert load_tensors(tmp_path / "theirs.safetensors")["x"].tolist() == [[1, 1], [1, 1]]
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="outside the file"):
        load_tensors(tmp_path / "cut.safetensors")


def test_importing_iteravg_imports_no_framework():
    code = ("import sys, iteravg; iteravg.Averager; "
            "print(sorted(m for m in ('mxnet', 'horovod', 'mpi4py', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
