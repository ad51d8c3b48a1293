"""The collective watchdog in real jobs: a rank that raises, or skips a collective, ends the whole job in bounded
time with a message naming the collective, the hook, the deadline and the missing rank. Plus the cross-rank sync
rules that must hold on every host: float16 under mpi4py, a host without the C kernel, sync="broadcast" with an
empty rank 0."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import horovodrun, mpirun, run  # noqa: E402

from iteravg.comm import watchdog  # noqa: E402

WORKER = "tests/multirank/worker_hang.py"
DEADLINE = 5


# -- configuration (single process) --------------------------------------------------------------
def test_timeout_from_env_python_and_off(monkeypatch):
    monkeypatch.delenv(watchdog.ENV_TIMEOUT, raising=False)
    assert watchdog.get_timeout() == watchdog.DEFAULT_TIMEOUT == 300
    monkeypatch.setenv(watchdog.ENV_TIMEOUT, "12.5")
    assert watchdog.get_timeout() == 12.5
    monkeypatch.setenv(watchdog.ENV_TIMEOUT, "0")
    assert watchdog.get_timeout() is None
    monkeypatch.setenv(watchdog.ENV_TIMEOUT, "soon")
    with pytest.raises(ValueError, match=watchdog.ENV_TIMEOUT):
        watchdog.get_timeout()
    watchdog.set_timeout(7)
    try:
        assert watchdog.get_timeout() == 7
        with pytest.raises(ValueError, match="timeout"):
            watchdog.set_timeout(-1)
    finally:
        watchdog.set_timeout(None)


def test_phase_names_the_hook_and_nests():
    from iteravg import collectives

    assert collectives.current_phase() == "unknown"
    with collectives.phase("on_epoch_end"):
        assert collectives.current_phase() == "on_epoch_end"
        with collectives.phase("save"):
            assert collectives.current_phase() == "on_epoch_end > save"  # the user's hook, then iteravg's step
        with collectives.phase("on_epoch_end"):
            assert collectives.current_phase() == "on_epoch_end"
        assert collectives.current_phase() == "on_epoch_end"
    assert collectives.current_phase() == "unknown"


# -- hangs become bounded failures (real jobs) ----------------------------------------------------
def _timed(cmd, out: Path, env: dict, timeout: float = 180):
    proc = run(cmd, timeout=timeout, env=env, check=False)
    ended = time.time()
    started = min(float((out / f"rank{r}.t").read_text()) for r in range(2) if (out / f"rank{r}.t").exists())
    return proc, ended - started


@pytest.mark.multirank
def test_mpi4py_exception_on_one_rank_aborts_the_job_in_seconds(tmp_path):
    env = {"ITERAVG_COMM": "mpi", watchdog.ENV_TIMEOUT: "120"}  # the deadline is not what ends it
    proc, elapsed = _timed(mpirun(2, [WORKER, str(tmp_path), "raise", "--rank", "1"]), tmp_path, env)
    assert proc.returncode != 0
    assert "boom on rank 1" in proc.stderr and "uncaught RuntimeError on rank 1 of 2" in proc.stderr
    assert "MPI_ABORT" in proc.stderr or "MPI_Abort" in proc.stderr
    assert elapsed < 20, f"job took {elapsed:.1f} s to end after the exception"
    print(f"time to failure (exception, mpi4py): {elapsed:.1f} s")


def _assert_watchdog_message(text: str) -> None:
    assert "collective 'iteravg.dirty'" in text, text[-3000:]
    assert "from hook 'on_validation_end'" in text
    assert f"past the deadline of {DEADLINE} s (ITERAVG_COLLECTIVE_TIMEOUT)" in text
    assert "ranks that did not arrive: [1]" in text
    assert "rank 1: not inside any collective" in text


@pytest.mark.multirank
def test_mpi4py_skipped_collective_ends_within_the_deadline(tmp_path):
    env = {"ITERAVG_COMM": "mpi", watchdog.ENV_TIMEOUT: str(DEADLINE)}
    proc, elapsed = _timed(mpirun(2, [WORKER, str(tmp_path), "skip", "--rank", "1"]), tmp_path, env)
    assert proc.returncode != 0
    _assert_watchdog_message(proc.stderr)
    assert "Ending the whole job (MPI_Abort)" in proc.stderr
    assert elapsed < DEADLINE + 15, f"job took {elapsed:.1f} s"
    print(f"time to failure (skipped collective, mpi4py, deadline {DEADLINE} s): {elapsed:.1f} s")


@pytest.mark.multirank
def test_mpi4py_different_collectives_on_two_ranks_are_named(tmp_path):
    env = {"ITERAVG_COMM": "mpi", watchdog.ENV_TIMEOUT: str(DEADLINE)}
    proc, elapsed = _timed(mpirun(2, [WORKER, str(tmp_path), "mismatch", "--rank", "1"]), tmp_path, env)
    assert proc.returncode != 0
    text = proc.stderr
    # Whichever rank's watchdog fires first reports the other inside a different collective of the same number --
    # a certain deadlock, reported at once (the first check, 2 s in), not at the deadline.
    assert ("rank 1: inside another collective #4 'iteravg.finish'" in text
            or "rank 0: inside another collective #4 'iteravg.dirty' from hook 'on_train_batch_end'" in text), text[-3000:]
    assert "the ranks issued different collectives" in text and "certain deadlock" in text
    assert elapsed < DEADLINE, f"job took {elapsed:.1f} s"
    print(f"time to failure (different collectives of the same number, mpi4py, deadline {DEADLINE} s): "
          f"{elapsed:.1f} s")


@pytest.mark.multirank
@pytest.mark.parametrize("gloo", [False, True], ids=["mpi", "gloo"])
def test_horovod_skipped_collective_ends_within_the_deadline(tmp_path, gloo):
    env = {watchdog.ENV_TIMEOUT: str(DEADLINE)}
    proc, elapsed = _timed(horovodrun(2, [WORKER, str(tmp_path), "skip", "--rank", "1"], gloo=gloo), tmp_path, env)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    _assert_watchdog_message(text)
    assert "(horovod)" in text
    assert elapsed < DEADLINE + 20, f"job took {elapsed:.1f} s"
    print(f"time to failure (skipped collective, horovod {'gloo' if gloo else 'mpi'}, deadline {DEADLINE} s): "
          f"{elapsed:.1f} s")


# -- sync rules that must not depend on the host ---------------------------------------------------
def _sync_job(launcher: str, out: Path, *args: str):
    cmd_args = [WORKER, str(out), "sync", *args]
    if launcher == "mpi4py":
        run(mpirun(2, cmd_args), timeout=180, env={"ITERAVG_COMM": "mpi"})
    else:
        run(horovodrun(2, cmd_args), timeout=180)
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    bins = [(out / f"rank{r}.bin").read_bytes() for r in range(2)]
    inputs = [(out / f"rank{r}-in.bin").read_bytes() for r in range(2)]
    assert {i["comm"] for i in infos} == {"mpi" if launcher == "mpi4py" else "horovod"}
    return infos, bins, inputs


def _split(raw: bytes, dtypes):
    n = 21
    out, pos = [], 0
    for dt in dtypes:
        size = n * np.dtype(dt).itemsize
        out.append(np.frombuffer(raw[pos:pos + size], dtype=dt))
        pos += size
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("launcher", ["mpi4py", "horovod"])
def test_every_dtype_syncs_bitwise_identically_even_without_the_kernel_on_one_rank(tmp_path, launcher):
    dtypes = ["float16", "float32", "float64"]
    infos, bins, inputs = _sync_job(launcher, tmp_path, "--dtypes", ",".join(dtypes), "--rank", "-1",
                                    "--no-kernel-rank", "1")
    assert [i["kernel"] for i in infos] == [True, False], "the scenario needs the kernel on rank 0 only"
    assert bins[0] == bins[1], "averaged buffers differ across ranks"
    assert infos[0]["fingerprint"] == infos[1]["fingerprint"] and infos[0]["counter"] == 1
    got = _split(bins[0], dtypes)
    per_rank = [_split(b, dtypes) for b in inputs]
    for g, dt in enumerate(dtypes):
        want = (per_rank[0][g].astype(np.float64) + per_rank[1][g].astype(np.float64)) / 2
        tol = {"float16": 2e-3, "float32": 1e-6, "float64": 1e-12}[dt]
        np.testing.assert_allclose(got[g].astype(np.float64), want, rtol=tol, atol=tol)


@pytest.mark.multirank
def test_sync_broadcast_when_rank_0_never_folded_uses_the_lowest_rank_with_an_average(tmp_path):
    infos, bins, inputs = _sync_job("mpi4py", tmp_path, "--mode", "broadcast", "--rank", "0")
    assert bins[0] == bins[1] == inputs[1], "every rank must hold rank 1's average, not rank 0's zeros"
    assert [i["counter"] for i in infos] == [1, 1]
