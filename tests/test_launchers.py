"""Launcher detection: a process whose launcher says it has peers never carries on alone.

Each case starts a fresh interpreter with a launcher's environment and no peers (the singleton communicator and
MPI / Horovod / torch.distributed initialise once per process), and asserts what ``get_comm`` does: the backend it
picks, or the error naming the launcher's variable -- at once, not after a rendezvous timeout of minutes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

PROBE = "import iteravg; c = iteravg.get_comm(); print('COMM', c.name, c.rank, c.size)"
CLEAN = ("ITERAVG_COMM", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_HOSTNAME", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
         "PMIX_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
         "SLURM_STEP_NUM_TASKS", "TORCHELASTIC_RUN_ID")


def probe(env: dict, code: str = PROBE, timeout: float = 120):
    full = {k: v for k, v in os.environ.items() if k not in CLEAN}
    full.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONWARNINGS="ignore", **env)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def test_no_launcher_is_one_process_and_imports_nothing():
    proc, _ = probe({}, PROBE + "; import sys; print(sorted(m for m in ('torch', 'mxnet', 'mpi4py', 'horovod') "
                            "if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert "COMM local 0 1" in proc.stdout and "[]" in proc.stdout


@pytest.mark.parametrize("env,variable,backend", [
    ({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"}, "HOROVOD_SIZE=2", "horovod"),       # horovodrun's env, no peers
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_STEP_NUM_TASKS=2", "mpi"),  # srun without MPI
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "ITERAVG_COMM": "mpi"},
     "WORLD_SIZE=2", "mpi"),                                                         # torchrun env, wrong backend
])
def test_declared_peers_that_cannot_be_reached_are_an_error(env, variable, backend):
    proc, seconds = probe(env)
    assert proc.returncode != 0 and "COMM" not in proc.stdout
    assert f"declares {variable} processes, but the {backend!r} communicator sees 1" in proc.stderr, proc.stderr
    assert seconds < 60


def test_torchrun_env_whose_peer_never_comes_fails_within_the_deadline():
    """torchrun's variables for rank 0 of 2 and no rank 1: the rendezvous gives up at the collective deadline
    (ITERAVG_COLLECTIVE_TIMEOUT) with a CommError, instead of torch's 30-minute default."""
    pytest.importorskip("torch")
    import socket

    with socket.socket() as s:  # a free port for the store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, seconds = probe({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port), "ITERAVG_COLLECTIVE_TIMEOUT": "4"})
    assert proc.returncode != 0 and "CommError" in proc.stderr and "init_process_group" in proc.stderr
    assert "1/2 clients joined" in proc.stderr, proc.stderr[-2000:]
    assert seconds < 40


def test_explicit_local_under_a_launcher_is_allowed_and_said():
    proc, _ = probe({"ITERAVG_COMM": "local", "WORLD_SIZE": "2", "RANK": "1"})
    assert proc.returncode == 0 and "COMM local 0 1" in proc.stdout
    assert "ITERAVG_COMM=local under a launcher that declares WORLD_SIZE=2" in proc.stderr


def test_single_process_torchrun_env_is_local():
    proc, _ = probe({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    assert proc.returncode == 0 and "COMM local 0 1" in proc.stdout


def test_an_initialised_default_group_is_reused():
    """A script that set up torch.distributed itself (one process here) gets the torch communicator on it."""
    pytest.importorskip("torch")
    code = ("import torch.distributed as d, tempfile; "
            "d.init_process_group('gloo', init_method='file://' + tempfile.mktemp(), rank=0, world_size=1); "
            + PROBE + "; print('SAME', d.is_initialized())")
    proc, _ = probe({}, code)
    assert proc.returncode == 0, proc.stderr
    assert "COMM torch 0 1" in proc.stdout and "SAME True" in proc.stdout
