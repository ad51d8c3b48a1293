"""``examples/torch_ddp.py`` and ``examples/torch_fsdp2.py`` as users run them: real ``torchrun --standalone
--nproc_per_node 2`` jobs on CPU (Gloo) and plain one-process runs. Each run must exit 0 with every rank holding the
same averaged bits (the SHA-256 each rank writes), rank 0 alone printing and writing exactly one snapshot, and the
snapshot's ``averaged.safetensors`` must load strictly into a plain, unwrapped model with
``safetensors.torch.load_file`` + ``model.load_state_dict`` and give back those bits. The FSDP2 snapshot resumes on
one process with exactly the saved average and training weights.

torch is imported only in the subprocesses, never in the pytest process (which also runs the MXNet tests)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import REPO, job_env, run  # noqa: E402

pytestmark = [
    pytest.mark.multirank,
    pytest.mark.skipif(importlib.util.find_spec("torch") is None or importlib.util.find_spec("safetensors") is None,
                       reason="PyTorch and safetensors are optional (requirements/torch.txt, requirements/dev.txt)"),
]
DDP, FSDP2 = "examples/torch_ddp.py", "examples/torch_fsdp2.py"
ENV = {"ITERAVG_COLLECTIVE_TIMEOUT": "60"}


def torchrun(n: int) -> list:
    """The torchrun next to this interpreter (its console script), else the same entry point as a module."""
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", f"--nproc_per_node={n}"]


def ranks(out: Path, n: int) -> list:
    found = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(n)]
    assert [r["rank"] for r in found] == list(range(n)) and {r["world"] for r in found} == {n}, found
    return found


def snapshots(ckpt: Path) -> list:
    return sorted(p.name for p in ckpt.iterdir() if p.is_dir() and not p.is_symlink() and p.name.startswith("epoch-"))


def load_into_plain_model(example: str, path: Path) -> str:
    """(subprocess) ``safetensors.torch.load_file`` + strict ``load_state_dict`` into the example's plain model;
    returns the SHA-256 of the model's floating tensors, as the example computes it."""
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'examples')!r}); import {Path(example).stem} as ex; "
            "from safetensors.torch import load_file; m = ex.make_model(); "
            f"m.load_state_dict(load_file({str(path)!r}), strict=True); print(ex.digest(m.state_dict()))")
    proc = subprocess.run([sys.executable, "-c", code], env=job_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def check_one_average(found: list, out: Path) -> dict:
    """Every rank the same averaged bits; rank 0 alone wrote the one snapshot and evaluated."""
    assert len({r["averaged_sha"] for r in found}) == 1 and found[0]["averaged_sha"], found
    assert len({r["counter"] for r in found}) == 1 and found[0]["counter"] > 0
    assert [r["snapshot"] is not None for r in found] == [True] + [False] * (len(found) - 1)
    assert snapshots(out / "checkpoints") == [Path(found[0]["snapshot"]).name]
    r0 = found[0]
    assert math.isfinite(r0["averaged_loss"]) and math.isfinite(r0["last_loss"])
    return r0


@pytest.mark.timeout(300)
def test_ddp_example_under_torchrun(tmp_path):
    out = tmp_path / "out"
    proc = run([*torchrun(2), DDP, "--epochs", "5", "--out", str(out)], env=ENV, timeout=240)
    found = ranks(out, 2)
    assert {r["comm"] for r in found} == {"torch"} and {r["device"] for r in found} == {"cpu"}
    r0 = check_one_average(found, out)
    assert all(r["final_model_sha"] == r["averaged_sha"] for r in found), "finalize did not load the average"
    assert r0["trigger_epoch"] is not None and all(r["last_loss"] is None for r in found[1:]), "rank 0 evaluates"
    assert proc.stdout.count("last iterate val_loss") == 1 and "averaged model val_loss" in proc.stdout
    snapshot = Path(r0["snapshot"]) / "averaged.safetensors"  # names without DDP's "module." prefix
    assert load_into_plain_model(DDP, snapshot) == r0["averaged_sha"]


@pytest.mark.timeout(300)
def test_ddp_example_as_one_process(tmp_path):
    out = tmp_path / "out"
    proc = run([sys.executable, DDP, "--epochs", "3", "--schedule", "ema", "--out", str(out)], timeout=240)
    (r0,) = ranks(out, 1)
    assert r0["comm"] == "local" and r0["final_model_sha"] == r0["averaged_sha"]
    check_one_average([r0], out)
    assert "averaged model val_loss" in proc.stdout
    assert load_into_plain_model(DDP, Path(r0["snapshot"]) / "averaged.safetensors") == r0["averaged_sha"]


@pytest.mark.timeout(420)
def test_fsdp2_example_gathers_the_snapshot_and_resumes_on_one_process(tmp_path):
    out = tmp_path / "out"
    run([*torchrun(2), FSDP2, "--epochs", "3", "--out", str(out)], env=ENV, timeout=240)
    saved = check_one_average(ranks(out, 2), out)
    assert saved["comm"] == "torch"
    snapshot = Path(saved["snapshot"])
    assert load_into_plain_model(FSDP2, snapshot / "averaged.safetensors") == saved["averaged_sha"]
    assert load_into_plain_model(FSDP2, snapshot / "training.safetensors") == saved["training_sha"]

    proc = run([sys.executable, FSDP2, "--epochs", "4", "--out", str(out), "--resume"], env=ENV, timeout=240)
    (resumed,) = ranks(out, 1)
    assert "resumed at epoch 3 (saved by 2 ranks) on 1" in proc.stdout
    assert resumed["resumed_from_world"] == 2 and resumed["loaded_counter"] == saved["counter"]
    assert resumed["loaded_sha"] == saved["averaged_sha"], "the average did not come back bit for bit"
    assert resumed["loaded_training_sha"] == saved["training_sha"], "the training weights did not come back"
    assert resumed["counter"] > saved["counter"], "the average did not go on"
    assert snapshots(out / "checkpoints") == ["epoch-000003", "epoch-000004"]
