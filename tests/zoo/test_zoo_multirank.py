"""The zoo's multi-rank subset under real launchers: every rank trains on its own data, and at the end all ranks
hold a bitwise-identical averaged model and network (``horovodrun -np 2`` and ``mpirun -np 2`` + mpi4py).

One job per launcher runs every subset model (tests/multirank/worker_zoo.py); each (model, dtype) is then its
own test case reading the job's results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from .models import cases

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "multirank"))
from launch import horovodrun, mpirun, run  # noqa: E402

pytestmark = [pytest.mark.multirank, pytest.mark.filterwarnings("ignore")]
WORKER = "tests/multirank/worker_zoo.py"
SIZE = 2
LAUNCHERS = {
    "horovodrun": (lambda out: horovodrun(SIZE, [WORKER, str(out)]), {}, "horovod"),
    "mpirun-mpi4py": (lambda out: mpirun(SIZE, [WORKER, str(out)]), {"ITERAVG_COMM": "mpi"}, "mpi"),
}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Each launcher's job, run once on first use: (reports per rank, arrays per rank)."""
    done = {}

    def get(launcher: str):
        if launcher not in done:
            cmd, env, _ = LAUNCHERS[launcher]
            out = tmp_path_factory.mktemp(f"zoo-{launcher}")
            run(cmd(out), timeout=600, env=env)
            reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(SIZE)]
            arrays = [dict(np.load(out / f"rank{r}.npz")) for r in range(SIZE)]
            done[launcher] = (reports, arrays)
        return done[launcher]

    return get


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
@pytest.mark.parametrize("name,dtype", cases(multirank_only=True))
def test_ranks_hold_identical_averaged_models(jobs, launcher, name, dtype):
    reports, arrays = jobs(launcher)
    assert [r["comm"] for r in reports] == [LAUNCHERS[launcher][2]] * SIZE
    case = f"{name}-{dtype}"
    results = [r["cases"][case] for r in reports]
    errors = [r.get("error") for r in results if "error" in r]
    if errors:
        raise AssertionError(f"{case} under {launcher}: {errors}")
    assert results[0]["counter"] == results[1]["counter"] > 1
    assert results[0]["names"] != results[1]["names"]  # other auto names on rank 1, the same model all the same
    # Not vacuous: each rank trained its own weights ...
    assert arrays[0][f"{case}/training"].tobytes() != arrays[1][f"{case}/training"].tobytes()
    # ... and all ranks end with the same averaged model, loaded into the same network.
    assert arrays[0][f"{case}/avg"].tobytes() == arrays[1][f"{case}/avg"].tobytes()
    assert arrays[0][f"{case}/net"].tobytes() == arrays[1][f"{case}/net"].tobytes()
    assert arrays[0][f"{case}/net"].tobytes() == arrays[0][f"{case}/avg"].tobytes()
