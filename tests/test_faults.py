"""Faults in real jobs: a rank killed mid-epoch ends the whole job fast, without losing the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import REPO, horovodrun, job_env  # noqa: E402
from scenario import make_net  # noqa: E402

from iteravg.checkpoint import read_snapshot  # noqa: E402

pytestmark = [pytest.mark.multirank, pytest.mark.filterwarnings("ignore")]
WORKER = "tests/multirank/worker_sync.py"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("gloo", [False, True], ids=["mpi", "gloo"])
def test_kill_9_of_a_rank_ends_the_job_and_keeps_the_checkpoint(tmp_path, gloo):
    cmd = horovodrun(3, [WORKER, str(tmp_path), "--strategy", "alpha", "--sleep", "0.4"], gloo=gloo)
    job = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        ckpt = tmp_path / "ckpt"
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for a checkpoint written after averaging started (epoch >= 5)
            try:
                _, state = read_snapshot(ckpt, verify=False)
                if state["epoch"] >= 5:
                    break
            except (ValueError, KeyError, OSError):
                pass
            assert job.poll() is None, job.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared")
        pids = [int((tmp_path / f"rank{r}.pid").read_text()) for r in range(3)]
        time.sleep(0.5)  # mid-epoch
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.time()
        job.wait(timeout=30)
        elapsed = time.time() - t0
        assert job.returncode != 0
        assert elapsed < 30
        deadline = time.time() + 5
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)], "ranks left behind"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    # The last complete checkpoint is intact: SHA-256 verified, loads, and matches its fingerprint.
    snap, state = read_snapshot(tmp_path / "ckpt")
    import iteravg.mx as ours

    strategy = ours.Alpha_Suffix(epochs=8, alpha=0.5, comm="local")
    net = make_net()
    restored = ours.load_checkpoint(strategy, net, tmp_path / "ckpt")  # verifies the fingerprint
    assert restored["epoch"] == state["epoch"] and strategy.averaging_started
    net.load_parameters(str(snap / "averaged.params"))


@pytest.mark.parametrize("fault", ["crash-before-publish:epoch-000005", "kill-at:renamed:epoch-000005"])
def test_crash_of_rank_0_while_publishing_a_checkpoint_keeps_the_previous_one(tmp_path, fault):
    """Rank 0 dies while writing epoch 5's snapshot (documented fault switch): after the files are written but
    before the rename (exit 17), or by SIGKILL after the rename but before ``latest`` moved."""
    from launch import run

    proc = run(horovodrun(2, [WORKER, str(tmp_path), "--strategy", "alpha"]), timeout=120, check=False,
               env={"ITERAVG_FAULT": fault})
    assert proc.returncode != 0
    ckpt = tmp_path / "ckpt"
    if fault.startswith("crash-before-publish"):
        assert list(ckpt.glob(".tmp-epoch-000005-*")), "the crash should have left the unpublished snapshot behind"
    else:
        assert (ckpt / "epoch-000005").is_dir(), "the kill came after the rename"
    snap, state = read_snapshot(ckpt)  # SHA-256 verified
    assert state["epoch"] == 4 and snap.name == "epoch-000004"
    # Resuming from it works (on 2 ranks); the crashed temp snapshot is cleaned by the next write, and a name
    # that was published once is never reused for the new state at epoch 5.
    run(horovodrun(2, [WORKER, str(tmp_path), "--strategy", "alpha", "--resume"]), timeout=120)
    assert not list(ckpt.glob(".tmp-*"))
    assert json.loads((ckpt / "averaging-state.json").read_text())["epoch"] == 8
    if fault.startswith("kill-at"):
        names = [line.split()[1] for line in (ckpt / ".iteravg-snapshots").read_text().splitlines()]
        assert "epoch-000005" in names and "epoch-000005.1" in names, names
