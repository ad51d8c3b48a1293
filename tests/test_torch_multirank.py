"""``iteravg.torch`` in real ``torchrun`` jobs (CPU, Gloo): DDP and FSDP2 models, NTA / EMA / Alpha_Suffix, the
averaged state bitwise identical on every rank, one snapshot per save written by rank 0, resume at another world size
(sharded and not), and a torchrun job whose communicator cannot be built failing at once with a message."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from multirank.launch import REPO, run  # noqa: E402

pytestmark = pytest.mark.multirank
WORKER = "tests/multirank/worker_torch.py"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def torchrun(n: int, *args: str, timeout: float = 240, env: dict = None, check: bool = True):
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={n}", WORKER, *args]
    return run(cmd, timeout=timeout, env={"ITERAVG_COLLECTIVE_TIMEOUT": "60", **(env or {})}, check=check)


def ranks(out: Path, n: int) -> list:
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(n)]


def snapshots(ckpt: Path) -> list:
    return sorted(p.name for p in ckpt.iterdir() if p.is_dir() and not p.is_symlink() and p.name.startswith("epoch-"))


@pytest.mark.parametrize("n,wrap,schedule", [(2, "ddp", "nta"), (3, "ddp", "ema"), (2, "none", "alpha")])
def test_ddp_ranks_identical_one_snapshot(tmp_path, n, wrap, schedule):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    torchrun(n, str(out), "--wrap", wrap, "--schedule", schedule, "--ckpt", str(ckpt))
    res = ranks(out, n)
    assert {r["comm"] for r in res} == {"torch"} and {r["world"] for r in res} == {n}
    assert len({r["averaged_sha"] for r in res}) == 1 and res[0]["averaged_sha"]
    assert len({r["final_model_sha"] for r in res}) == 1
    assert len({r["counter"] for r in res}) == 1 and res[0]["counter"] > 0
    if schedule == "nta":
        assert {r["trigger_epoch"] for r in res} == {3}  # the metric rose at epoch 4: averaging from epoch 3's end
    assert [r["snapshot"] is not None for r in res] == [True] + [False] * (n - 1)
    assert snapshots(ckpt) == ["epoch-000006"]  # exactly one snapshot, written once
    assert not any(r["imported_mxnet"] for r in res)


def test_snapshot_loads_into_a_plain_model_strictly(tmp_path):
    """averaged.safetensors from a DDP job: safetensors.torch.load_file + model.load_state_dict, no prefix."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    torchrun(2, str(out), "--wrap", "ddp", "--ckpt", str(ckpt))
    sys.path.insert(0, str(REPO / "tests" / "multirank"))
    try:
        import worker_torch
    finally:
        sys.path.pop(0)
    model = worker_torch.make_model()
    model.load_state_dict(safetensors_torch.load_file(ckpt / "latest" / "averaged.safetensors"))  # strict
    assert worker_torch.digest(model.state_dict()) == ranks(out, 2)[0]["averaged_sha"]


def test_fsdp2_shard_average_equals_whole_model_average_and_resumes_anywhere(tmp_path):
    """FSDP2 on 3 ranks: each rank folds its shard only, and the gathered average equals, bit for bit, the
    average of whole-model copies of the same iterates; the snapshot resumes on 2 ranks (FSDP2) and on 1 process
    (no wrapper, unsharded) with exactly the saved bits."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    torchrun(3, str(out), "--wrap", "fsdp", "--ckpt", str(ckpt), "--reference")
    res = ranks(out, 3)
    assert all(r["params_equal_reference"] for r in res)
    assert len({r["averaged_sha"] for r in res}) == 1 and len({r["final_model_sha"] for r in res}) == 1
    assert snapshots(ckpt) == ["epoch-000006"]
    saved = res[0]
    for n, wrap in ((2, "fsdp"), (1, "none")):
        copy = tmp_path / f"ckpt-{n}"
        shutil.copytree(ckpt, copy, symlinks=True)
        o = tmp_path / f"resume-{n}"
        if n > 1:
            torchrun(n, str(o), "--wrap", wrap, "--ckpt", str(copy), "--resume", "--epochs", "1")
        else:
            run([sys.executable, WORKER, str(o), "--wrap", wrap, "--ckpt", str(copy), "--resume", "--epochs", "1"],
                timeout=120)
        for r in ranks(o, n):
            assert r["loaded_world"] == 3
            assert r["loaded_sha"] == saved["averaged_sha"] and r["loaded_counter"] == saved["counter"]
            assert r["counter"] > saved["counter"]  # and the average went on


def test_ddp_resume_on_more_ranks_continues_the_average(tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    torchrun(2, str(out), "--wrap", "ddp", "--ckpt", str(ckpt), "--epochs", "4")
    saved = ranks(out, 2)[0]
    torchrun(3, str(tmp_path / "r"), "--wrap", "ddp", "--ckpt", str(ckpt), "--resume", "--epochs", "2")
    res = ranks(tmp_path / "r", 3)
    assert {r["loaded_sha"] for r in res} == {saved["averaged_sha"]}
    assert len({r["averaged_sha"] for r in res}) == 1
    assert snapshots(ckpt) == ["epoch-000004", "epoch-000006"]


def test_torchrun_without_a_working_communicator_fails_at_once(tmp_path):
    """ITERAVG_COMM=mpi under torchrun (no mpirun): mpi4py sees one process while torchrun declared two -- every
    rank stops at the Averager's construction with a message naming WORLD_SIZE, instead of averaging alone."""
    proc = torchrun(2, str(tmp_path / "o"), "--wrap", "none", env={"ITERAVG_COMM": "mpi"}, check=False, timeout=120)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "WORLD_SIZE=2" in text and "'mpi' communicator sees 1" in text
    assert not (tmp_path / "o").exists()


def test_ddp_sharded_equals_unsharded_and_the_single_process_average(tmp_path):
    """DDP on 3 ranks: the sync moves no parameter bytes (identical replicas), so the average equals, bit for bit,
    each rank's own single-process average of the same iterates -- sharded (1/3 of the state per rank) or not."""
    shas = {}
    for sharded in (True, False):
        out = tmp_path / f"out-{sharded}"
        torchrun(3, str(out), "--wrap", "ddp", "--reference", *(["--sharded"] if sharded else []))
        res = ranks(out, 3)
        assert all(r["sharded"] == sharded for r in res)
        assert all(r["params_equal_reference"] for r in res)
        assert len({r["averaged_sha"] for r in res}) == 1 and len({r["final_model_sha"] for r in res}) == 1
        shas[sharded] = res[0]["averaged_sha"]
    assert shas[True] == shas[False]
