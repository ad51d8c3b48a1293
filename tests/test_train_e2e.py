"""End to end: ``iteravg train`` single-process and under horovodrun; checkpoint, report and plot agree;
``iteravg inspect`` verifies; resume is exact; bad arguments are usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import horovodrun, job_env, run  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
FAST = ["--epochs", "8", "--nta-n", "1", "--batch-size", "16", "--no-progress"]


def cli(*args: str) -> list:
    return [sys.executable, "-m", "iteravg.cli", *args]


def single(out: Path, *extra: str, check: bool = True, env=None):
    return run(cli("train", "--out", str(out), *FAST, *extra), timeout=180, check=check, env=env)


def distributed(np_: int, out: Path, *extra: str, check: bool = True, env=None, gloo: bool = False):
    return run(horovodrun(np_, ["-m", "iteravg.cli", "train", "--out", str(out), *FAST, *extra], gloo=gloo),
               timeout=240, check=check, env=env)


def check_run(out: Path, world_size: int) -> dict:
    import mxnet as mx
    from mxnet.gluon import nn  # noqa: F401

    from iteravg.cli import _make_net

    rep = json.loads((out / "report.json").read_text())
    assert rep["world_size"] == world_size and rep["epochs_done"] == 8
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads((out / "checkpoints" / "averaging-state.json").read_text())
    assert state["fingerprint"] == rep["fingerprint"] and state["world_size"] == world_size
    assert rep["trigger_epoch"] == state["strategy"]["trigger_epoch"] is not None
    assert {"last iterate", "averaged"} <= set(rep["metrics"])
    # The checkpoint loads into the model and evaluates to the reported averaged test MSE.
    from iteravg.data import load

    ds = load()
    net = _make_net(ds.num_features, 64, seed=123)
    net.load_parameters(str(out / "checkpoints" / "averaged.params"))
    pred = net(mx.nd.array(ds.test[0])).asnumpy()
    mse = float(np.mean((pred - ds.test[1]) ** 2))
    assert mse == pytest.approx(rep["metrics"]["averaged"]["test_mse"], rel=1e-4)
    proc = run(cli("inspect", str(out / "checkpoints")), timeout=60)
    assert "verified" in proc.stdout and "True" in proc.stdout
    return rep


def test_single_process_run_and_inspect(tmp_path):
    single(tmp_path)
    check_run(tmp_path, 1)
    params = tmp_path / "checkpoints" / "latest" / "averaged.params"
    data = bytearray(params.read_bytes())
    data[len(data) // 2] ^= 0x01
    params.write_bytes(bytes(data))
    proc = run(cli("inspect", str(tmp_path / "checkpoints")), timeout=60, check=False)
    assert proc.returncode == 1 and "corrupted" in proc.stderr


@pytest.mark.multirank
def test_horovodrun_two_ranks(tmp_path):
    distributed(2, tmp_path)
    check_run(tmp_path, 2)


def _final(out: Path) -> tuple:
    rep = json.loads((out / "report.json").read_text())
    params = (out / "checkpoints" / "latest" / "averaged.params").read_bytes()
    return rep["metrics"], rep["trigger_epoch"], rep["fingerprint"], rep["history"], params


def test_resume_is_exact_single_process(tmp_path):
    single(tmp_path / "full")
    proc = single(tmp_path / "part", check=False, env={"ITERAVG_STOP_AFTER_EPOCH": "5"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert not (tmp_path / "part" / "report.json").exists()
    single(tmp_path / "part", "--resume")
    assert json.loads((tmp_path / "part" / "report.json").read_text())["resumed_from_epoch"] == 5
    assert _final(tmp_path / "part") == _final(tmp_path / "full")


@pytest.mark.multirank
def test_resume_is_exact_under_horovodrun_and_works_on_another_world_size(tmp_path):
    distributed(2, tmp_path / "full")
    proc = distributed(2, tmp_path / "part", check=False, env={"ITERAVG_STOP_AFTER_EPOCH": "5"})
    assert proc.returncode != 0
    import shutil

    shutil.copytree(tmp_path / "part", tmp_path / "three", symlinks=True)
    distributed(2, tmp_path / "part", "--resume")
    assert _final(tmp_path / "part") == _final(tmp_path / "full")
    # Resume on 3 ranks (Gloo controller): a valid continuation (different shards), same trigger epoch.
    distributed(3, tmp_path / "three", "--resume", gloo=True)
    rep = json.loads((tmp_path / "three" / "report.json").read_text())
    assert rep["world_size"] == 3 and rep["resumed_from_epoch"] == 5 and rep["epochs_done"] == 8
    assert rep["trigger_epoch"] == _final(tmp_path / "full")[1]
    assert run(cli("inspect", str(tmp_path / "three" / "checkpoints")), timeout=60).returncode == 0


@pytest.mark.parametrize("args,needle", [
    (["--epochs", "-3"], "--epochs"),
    (["--alpha", "1.5"], "--alpha"),
    (["--eta", "-1"], "--eta"),
    (["--lr", "0"], "--lr"),
    (["--strategy", "swa"], "--strategy"),
    (["--resume", "--checkpoint-dir", "/nonexistent/iteravg"], "does not exist"),
    (["--data", "/nonexistent.csv"], "--data"),
])
def test_bad_arguments_are_usage_errors(tmp_path, args, needle):
    proc = subprocess.run(cli("train", "--out", str(tmp_path / "o"), *args), capture_output=True, text=True,
                          timeout=120, env=job_env())
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "usage:" in proc.stderr


def test_user_csv(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.standard_normal(200)
    path = tmp_path / "data.csv"
    path.write_text("a,b,c,target\n" + "\n".join(",".join(f"{v:.6f}" for v in (*row, t)) for row, t in zip(x, y)))
    single(tmp_path / "run", "--data", str(path))
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["data"] == "data.csv" and rep["metrics"]["averaged"]["test_mse"] < 0.5
