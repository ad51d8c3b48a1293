"""Launch real multi-process jobs (horovodrun / mpirun) from tests, always with a timeout."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def job_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    for key in ("ITERAVG_COMM", "ITERAVG_HOROVOD_BINDING", "ITERAVG_FAULT", "HOROVOD_RANK", "HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "RANK",
                "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def horovodrun(np_: int, args: Sequence[str], gloo: bool = False) -> List[str]:
    cmd = [str(BIN / "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}"]
    if gloo:
        cmd += ["--gloo", "--network-interface", "lo"]
    return cmd + [sys.executable, *args]


def torchrun(np_: int, args: Sequence[str]) -> List[str]:
    """``torchrun --standalone`` (a free rendezvous port per job), as PyTorch users launch."""
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={np_}", *args]


def mpirun(np_: int, args: Sequence[str]) -> List[str]:
    mpirun_bin = shutil.which("mpirun") or "mpirun"
    return [mpirun_bin, "-np", str(np_), "--oversubscribe", "--bind-to", "none", sys.executable, *args]


#: Every launcher a fault test runs under: name -> (command for ``np`` ranks running ``args``, extra environment).
#: A launcher added here (e.g. ``torchrun --nproc-per-node N``) is one entry; the tests parametrize over the keys.
LAUNCHERS = {
    "mpirun-mpi4py": (lambda np_, args: mpirun(np_, args), {"ITERAVG_COMM": "mpi"}),
    "horovodrun-mpi": (lambda np_, args: horovodrun(np_, args), {}),
    "horovodrun-gloo": (lambda np_, args: horovodrun(np_, args, gloo=True), {}),
    "torchrun": (lambda np_, args: torchrun(np_, args), {}),
}


def launch(launcher: str, np_: int, args: Sequence[str]):
    """(command, extra environment) of a job under ``launcher`` (a key of ``LAUNCHERS``)."""
    make, env = LAUNCHERS[launcher]
    return make(np_, list(args)), dict(env)


def run(cmd: Sequence[str], timeout: float = 180, env: Optional[dict] = None, check: bool = True):
    proc = subprocess.run(list(cmd), cwd=REPO, env=job_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


@functools.lru_cache(maxsize=None)
def torch_binding_built() -> bool:
    """Whether Horovod's PyTorch library loads here (Horovod built with PyTorch), asked in a fresh interpreter so
    that the test process never loads torch. (``import horovod.torch`` alone succeeds without the library.)"""
    proc = subprocess.run([sys.executable, "-c", "import horovod.torch.mpi_lib_v2"], cwd=REPO, env=job_env(),
                          capture_output=True, timeout=120)
    return proc.returncode == 0
