"""``examples/torch_averaging.py``: a PyTorch model averaged by ``iteravg.Averager`` through numpy views, on one
process and under ``mpirun -np 2`` with mpi4py (real subprocesses); and the engine on torch parameter views against
PyTorch's own ``torch.optim.swa_utils`` averaging. Skipped when torch is not installed (requirements/torch.txt).

torch is only ever imported in subprocesses (``python -c "import test_torch_example as t; t.check_...()"``), so the
pytest process that runs the MXNet tests never has two frameworks' OpenMP runtimes loaded at once."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import REPO, job_env, mpirun, run  # noqa: E402

import iteravg  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                reason="PyTorch is not installed (optional: requirements/torch.txt)")
EXAMPLE = "examples/torch_averaging.py"
TESTS = Path(__file__).resolve().parent


def in_subprocess(call: str) -> str:
    """Run ``t.<call>`` with this module imported as ``t`` in a fresh interpreter; returns its stdout."""
    proc = subprocess.run([sys.executable, "-c", f"import test_torch_example as t; {call}"], cwd=TESTS,
                          env=job_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def ranks(out: Path, size: int) -> list:
    found = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(size)]
    assert [r["rank"] for r in found] == list(range(size)) and {r["size"] for r in found} == {size}
    return found


def check_common(found: list) -> dict:
    """What every run must show: one averaged model, bit for bit, loaded into every rank's torch model; rank 0
    reports its loss, which beats the untrained model's."""
    assert len({r["averaged_digest"] for r in found}) == 1, "the ranks' averaged models differ"
    assert found[0]["averaged_digest"] is not None and all(r["loaded"] for r in found)
    assert all(r["model_digest"] == r["averaged_digest"] for r in found), "finalize did not load the average"
    assert all(r["training_restored"] for r in found), "the rank-0 swap did not restore the training weights"
    r0 = found[0]
    assert math.isfinite(r0["averaged_loss"]) and r0["averaged_loss"] < 0.5 * r0["first_loss"], r0
    assert r0["finalized_loss"] == r0["averaged_loss"], "rank 0 evaluated other bits than finalize loaded"
    assert all(r["averaged_loss"] is None for r in found[1:]), "only rank 0 evaluates"
    return r0


def snapshot_in_torch(snapshot: str) -> None:
    """(subprocess) Load the snapshot's averaged.safetensors with safetensors' torch loader into a fresh model;
    print the bits' digest and the model's validation loss as JSON."""
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(REPO / "examples"))
    import torch_averaging as ex  # noqa: E402

    fresh = torch.nn.Sequential(torch.nn.Linear(ex.FEATURES, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    fresh.load_state_dict(load_file(str(Path(snapshot) / "averaged.safetensors")), strict=True)
    x_val, y_val = ex.make_data(512, seed=2)
    print(json.dumps({"digest": ex.digest({n: p.detach().numpy() for n, p in fresh.named_parameters()}),
                      "loss": ex.mse(fresh, x_val, y_val)}))


def load_snapshot_into_torch(snapshot: str) -> dict:
    return json.loads(in_subprocess(f"t.snapshot_in_torch({snapshot!r})"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["nta", "ema"])
def test_example_single_process(tmp_path, schedule):
    proc = subprocess.run([sys.executable, EXAMPLE, "--schedule", schedule, "--epochs", "6", "--out",
                           str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ck")],
                          cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (r0,) = ranks(tmp_path / "out", 1)
    assert r0["comm"] == "local" and r0["counter"] > 0
    check_common([r0])
    assert "averaged model val_loss" in proc.stdout
    theirs = load_snapshot_into_torch(r0["snapshot"])
    assert theirs["digest"] == r0["averaged_digest"] and theirs["loss"] == r0["averaged_loss"]


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_example_mpirun_data_parallel(tmp_path):
    """Gradients averaged over numpy views of .grad: both ranks hold the same iterates and the same average."""
    run(mpirun(2, [EXAMPLE, "--epochs", "6", "--out", str(tmp_path), "--checkpoint-dir", str(tmp_path / "ck")]),
        env={"ITERAVG_COMM": "mpi"}, timeout=240)
    found = ranks(tmp_path, 2)
    assert {r["comm"] for r in found} == {"mpi"} and not any(r["mxnet_imported"] for r in found)
    check_common(found)
    assert len({r["last_digest"] for r in found}) == 1, "data-parallel replicas diverged"
    assert found[0]["snapshot"] and found[1]["snapshot"] is None, "only rank 0 writes"
    assert load_snapshot_into_torch(found[0]["snapshot"])["digest"] == found[0]["averaged_digest"]


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_example_mpirun_independent_replicas_ema(tmp_path):
    """No gradient reduction: the ranks' last iterates differ, and only the averaging sync makes the averages
    (EMA) bitwise identical."""
    run(mpirun(2, [EXAMPLE, "--schedule", "ema", "--independent", "--epochs", "4", "--out", str(tmp_path)]),
        env={"ITERAVG_COMM": "mpi"}, timeout=240)
    found = ranks(tmp_path, 2)
    assert {r["comm"] for r in found} == {"mpi"}
    assert found[0]["last_digest"] != found[1]["last_digest"], "replicas should differ without gradient averaging"
    check_common(found)


def _fold_both(schedule: iteravg.Schedule, reference, steps: int = 25) -> tuple:
    """Train a tiny torch model; fold each iterate into iteravg (numpy views) and into torch's AveragedModel."""
    import torch

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    avg = iteravg.Averager(schedule, comm="local")
    theirs = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=reference, use_buffers=False)
    x, y = torch.randn(64, 5), torch.randn(64, 2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        assert avg.step(params)
        theirs.update_parameters(model)
    ours = avg.averaged()
    return ours, {n.removeprefix("module."): p.detach().numpy() for n, p in theirs.named_parameters()}


def check_polyak_matches_swa_utils() -> None:
    """eta=0 polynomial averaging is SWA's running mean (PyTorch computes a + (x - a) / (n + 1), iteravg
    a + (1/k) (x - a): equal up to float32 rounding)."""
    import torch

    sched = iteravg.Schedule(eta=0)
    sched.averaging_started = True
    ours, theirs = _fold_both(sched, torch.optim.swa_utils.get_swa_multi_avg_fn())
    assert set(ours) == set(theirs)
    for n in ours:
        np.testing.assert_allclose(ours[n], theirs[n], rtol=2e-6, atol=1e-7, err_msg=n)


def check_ema_matches_swa_utils() -> None:
    """EMA without warmup is torch's get_ema_multi_avg_fn (a lerp); the first fold copies in both."""
    import torch

    ours, theirs = _fold_both(iteravg.EMASchedule(decay=0.9, warmup=False),
                              torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    for n in ours:
        np.testing.assert_allclose(ours[n], theirs[n], rtol=2e-6, atol=1e-7, err_msg=n)


def check_views_survive_optimizer_steps() -> None:
    """The premise of the example: CPU parameters' numpy views share memory with the tensors across steps."""
    import torch

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    views = {n: p.detach().numpy() for n, p in model.named_parameters()}
    before = {n: v.copy() for n, v in views.items()}
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    for n, p in model.named_parameters():
        assert np.shares_memory(views[n], p.detach().numpy()), n
        assert not np.array_equal(views[n], before[n]) and views[n].tobytes() == p.detach().numpy().tobytes(), n


def test_engine_on_torch_views_matches_torch_swa_utils():
    """The three checks above, in one fresh interpreter (torch is never imported into the pytest process)."""
    out = in_subprocess("t.check_views_survive_optimizer_steps(); t.check_polyak_matches_swa_utils(); "
                        "t.check_ema_matches_swa_utils(); print('checked')")
    assert out.strip() == "checked"
