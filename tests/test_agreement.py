"""Agree before you act: the decisions that used to be per rank (rank-0-only validation, all iterates refused, an
unwritable checkpoint directory) in real jobs under horovodrun and mpirun + mpi4py, each in bounded time."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import horovodrun, mpirun, run  # noqa: E402

pytestmark = [pytest.mark.multirank, pytest.mark.filterwarnings("ignore")]
WORKER = "tests/multirank/worker_agree.py"
LAUNCH = {"horovodrun": lambda out, s: (horovodrun(2, [WORKER, str(out), s]), {}),
          "mpirun-mpi4py": lambda out, s: (mpirun(2, [WORKER, str(out), s]), {"ITERAVG_COMM": "mpi"})}


def job(tmp_path, launcher, scenario, timeout=120):
    cmd, env = LAUNCH[launcher](tmp_path, scenario)
    t0 = time.monotonic()
    proc = run(cmd, env=dict(env, ITERAVG_COLLECTIVE_TIMEOUT="30"), timeout=timeout)
    return [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)], proc, time.monotonic() - t0


@pytest.mark.timeout(200)
@pytest.mark.parametrize("launcher", sorted(LAUNCH))
def test_rank0_only_validation_with_sync_false_needs_no_collective(tmp_path, launcher):
    ranks, _, _ = job(tmp_path, launcher, "rank0-validation")
    assert len(ranks[0]["evaluated"]) == 4 and ranks[1]["evaluated"] == []
    assert ranks[0]["digest"] == ranks[1]["digest"]  # train end: the synced average on both ranks


@pytest.mark.timeout(200)
@pytest.mark.parametrize("launcher", sorted(LAUNCH))
def test_all_refused_ends_every_rank_on_rank0s_weights_with_one_warning(tmp_path, launcher):
    ranks, proc, _ = job(tmp_path, launcher, "all-refused")
    assert all(r["counter"] == 0 and r["refused"] > 0 and r["started"] for r in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"], "ranks ended on different networks"
    assert (proc.stdout + proc.stderr).count("no iterate could be averaged") == 1


@pytest.mark.timeout(200)
@pytest.mark.parametrize("launcher", sorted(LAUNCH))
def test_unwritable_checkpoint_dir_fails_on_every_rank_at_start(tmp_path, launcher):
    ranks, _, seconds = job(tmp_path, launcher, "unwritable")
    assert ranks[0]["error"] == ranks[1]["error"] and "not writable" in ranks[0]["error"]
    assert "rank 0" in ranks[0]["error"] and seconds < 60
