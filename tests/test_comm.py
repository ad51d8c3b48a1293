"""Communicator choice from the launcher's environment, and the single-process fallback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from iteravg.comm import LocalComm, detect_backend, resolve_comm

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import mpirun, run  # noqa: E402


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, "local"),
        ({"HOROVOD_RANK": "0", "HOROVOD_HOSTNAME": "localhost"}, "horovod"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "horovod"),  # plain mpirun: Horovod is built here
        ({"OMPI_COMM_WORLD_SIZE": "2", "ITERAVG_COMM": "mpi"}, "mpi"),
        ({"HOROVOD_RANK": "0", "ITERAVG_COMM": "local"}, "local"),
        ({"ITERAVG_COMM": " Horovod "}, "horovod"),
    ],
)
def test_detect_backend(monkeypatch, env, expected):
    for k in ("ITERAVG_COMM", "HOROVOD_RANK", "HOROVOD_HOSTNAME", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert detect_backend() == expected


def test_bad_choices_name_the_argument(monkeypatch):
    monkeypatch.setenv("ITERAVG_COMM", "nccl")
    with pytest.raises(ValueError, match="ITERAVG_COMM"):
        detect_backend()
    with pytest.raises(ValueError, match="comm"):
        resolve_comm("bogus")
    with pytest.raises(ValueError, match="comm"):
        resolve_comm(42)


def test_single_process_needs_no_launcher_mpi_or_horovod():
    code = ("import sys, iteravg.mx as m; s = m.NTA(epochs=3); "
            "print(s.comm.name, s.comm.size, 'horovod' in sys.modules, 'mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["local", "1", "False", "False"]
    assert isinstance(resolve_comm("local"), LocalComm)


@pytest.mark.multirank
def test_plain_mpirun_picks_horovod_when_built(tmp_path):
    run(mpirun(2, ["tests/multirank/worker_sync.py", str(tmp_path)]), timeout=180)
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["comm"] for i in infos] == ["horovod", "horovod"] and infos[0]["size"] == 2
