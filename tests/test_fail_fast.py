"""Fail fast, in real jobs at the default settings: a certain deadlock ends the job in seconds (not at the 300 s
deadline), a rank that leaves ends the job in seconds with its own exit code, a merely slow rank gets the full
deadline, and a stranger on the watchdog's side channel learns nothing and changes nothing.

Every job runs under each launcher of ``launch.LAUNCHERS`` (mpirun + mpi4py, horovodrun with the MPI and the Gloo
controller; a torchrun entry there adds it). Times are measured from the moment the failure happens (the worker
writes the wall time) to the launcher's exit; each test prints its figure (``pytest -s``)."""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import LAUNCHERS, launch, run  # noqa: E402

from iteravg.comm import watchdog  # noqa: E402

pytestmark = [pytest.mark.multirank]
WORKER = "tests/multirank/worker_fail.py"
BOUND = 15.0  # seconds from the failure to the end of the job (the bound)


def _job(launcher: str, out: Path, scenario: str, env: dict | None = None, timeout: float = 180):
    cmd, extra = launch(launcher, 2, [WORKER, str(out), scenario, "--rank", "1"])
    extra.update(env or {})
    extra.setdefault(watchdog.ENV_TIMEOUT, "")  # the default deadline (300 s), whatever the caller's shell says
    proc = run(cmd, timeout=timeout, env=extra, check=False)
    ended = time.time()
    stamps = [float((out / f"rank{r}.t").read_text()) for r in range(2) if (out / f"rank{r}.t").exists()]
    assert stamps, f"the job never reached the scenario:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc, proc.stdout + proc.stderr, ended - max(stamps)


# -- 2. a rank that leaves ends the job in seconds, with its code ------------------------------------
#: scenario -> (exit code of mpirun / horovodrun-mpi, text every launcher's output must hold)
EXITS = {
    "sysexit": (3, None),
    "osexit": (4, None),
    "kill": (137, None),
    "thread": (1, "uncaught RuntimeError on thread 'loader' on rank 1 of 2"),
    "exit0": (None, None),
}


#: Launchers whose own exit status is always 1: how their message names the first failing rank's code (torchrun's
#: agent logs each child's code, a signal as its negative number).
CODE_IN_MESSAGE = {"horovodrun-gloo": lambda code: re.escape(f"Exit code: {code}"),
                   "torchrun": lambda code: rf"exitcode\s*:\s*{code if code < 128 else 128 - code}\b"}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
@pytest.mark.parametrize("scenario", list(EXITS))
def test_a_rank_that_leaves_ends_the_job_in_seconds_with_its_code(tmp_path, launcher, scenario):
    proc, text, elapsed = _job(launcher, tmp_path, scenario)
    code, message = EXITS[scenario]
    assert proc.returncode != 0, text[-3000:]
    assert elapsed <= BOUND, f"{scenario} under {launcher}: the job took {elapsed:.1f} s to end\n{text[-3000:]}"
    if message:
        assert message in text, text[-3000:]
    if scenario == "sysexit":  # said by the leaving rank, or by the waiting one (whichever ends the job first)
        assert "rank 1 of 2 exits with code 3" in text or "rank 1: exited with code 3 after #" in text, text[-3000:]
    if scenario == "exit0":  # nobody failed: the waiting rank names the deadlock and the leaver
        assert "rank 1: exited with code 0 after #" in text or "Horovod has been shut down" in text, text[-3000:]
    elif launcher in CODE_IN_MESSAGE:  # the launcher exits 1 whatever happened, and names the first failing code
        assert re.search(CODE_IN_MESSAGE[launcher](code), text), text[-3000:]
    else:
        assert proc.returncode == code, f"{launcher} exited {proc.returncode}, not {code}\n{text[-3000:]}"
    print(f"time to failure ({scenario}, {launcher}): {elapsed:.1f} s, exit code {proc.returncode}")


@pytest.mark.parametrize("launcher", ["mpirun-mpi4py", "horovodrun-mpi"])
def test_every_rank_leaving_with_the_same_code_is_no_failure_of_one(tmp_path, launcher):
    """Every rank exits with 3 at the same point (an error they all raise): the job exits 3, and nobody aborts it."""
    proc, text, elapsed = _job(launcher, tmp_path, "allexit")
    assert proc.returncode == 3, text[-3000:]
    assert "ending the whole job" not in text and "MPI_ABORT" not in text, text[-3000:]
    assert elapsed <= BOUND


# -- 1. certain deadlocks end in seconds; a slow rank gets the full deadline ---------------------------
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
@pytest.mark.parametrize("scenario", ["validate0", "uneven"])
def test_different_collectives_end_the_job_in_seconds(tmp_path, launcher, scenario):
    proc, text, elapsed = _job(launcher, tmp_path, scenario)
    assert proc.returncode != 0, text[-3000:]
    assert elapsed <= BOUND, f"{scenario} under {launcher}: the job took {elapsed:.1f} s to end\n{text[-3000:]}"
    # Each rank's collective and hook are named: by the watchdog ("certain deadlock"), or -- when MPI itself
    # fails first on the mismatched buffers -- by the failing rank's diagnosis.
    # Gloo under torchrun aborts a rank inside the mismatched collective itself (SIGABRT, no Python runs after it):
    # the survivor's diagnosis names its own collective and the dead rank.
    named = [r for r in range(2) if re.search(rf"rank {r}\b[^\n]*#\d+ 'iteravg\.[a-z0-9.]+' from hook '[^']+'", text)]
    assert named == [0, 1] or (launcher == "torchrun" and named), text[-3000:]
    assert "certain deadlock" in text or "(this rank): not inside any collective; the last" in text, text[-3000:]
    print(f"time to failure ({scenario}, {launcher}): {elapsed:.1f} s")


@pytest.mark.parametrize("launcher", ["mpirun-mpi4py", "horovodrun-gloo"])
def test_a_slow_rank_is_not_a_deadlock(tmp_path, launcher):
    """Rank 1 computes for 8 s outside any collective while rank 0 waits: nothing is certain, the job completes."""
    proc, text, elapsed = _job(launcher, tmp_path, "slow", env={"ITERAVG_TEST_SLOW": "8"})
    assert proc.returncode == 0, text[-3000:]
    assert elapsed >= 8
    assert "watchdog" not in text, text[-3000:]


# -- 3. a stranger on the side channel learns nothing and changes nothing -------------------------------
def _stranger(ports: list, stop: threading.Event, seen: list) -> None:
    """Hold many connections open on every rank's status port, send garbage and forged requests, keep what comes
    back."""
    held = []
    forged = [b"status\n", b"IAV1 " + b"0" * 64 + b' {"kind":"status","from":0,"to":0,"port":1,"nonce":"x"}\n',
              b"\xff" * 5000, b"IAV1 x y\n" * 100]
    while not stop.is_set():
        for port in ports:
            for i in range(40):
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=1)
                except OSError:
                    continue
                s.settimeout(0.2)
                if i % 4:
                    try:
                        s.sendall(forged[i % len(forged)])
                    except OSError:
                        pass
                held.append(s)
        for s in held[:-300]:  # keep the newest 300 open, read what the others got
            try:
                seen.append(s.recv(65536))
            except OSError:
                pass
            s.close()
        del held[:-300]
        stop.wait(0.2)
    for s in held:
        s.close()


def _outward_ip() -> str | None:
    """This host's address on its default route (no packet is sent), or None without one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_a_stranger_on_the_side_channel_learns_nothing_and_changes_nothing(tmp_path):
    import subprocess

    from launch import REPO, job_env

    deadline = 8
    cmd, extra = launch("mpirun-mpi4py", 2, [WORKER, str(tmp_path), "stuck", "--rank", "1"])
    extra[watchdog.ENV_TIMEOUT] = str(deadline)
    job = subprocess.Popen(cmd, cwd=REPO, env=job_env(extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    stop, seen = threading.Event(), []
    try:
        t0 = time.time()
        while not all((tmp_path / f"rank{r}.t").exists() for r in range(2)) and time.time() < t0 + 120:
            time.sleep(0.05)
        ports = [int((tmp_path / f"rank{r}.port").read_text()) for r in range(2)]
        attacker = threading.Thread(target=_stranger, args=(ports, stop, seen), daemon=True)
        attacker.start()
        # The status sockets listen on 127.0.0.1 only (one host): another interface refuses outright.
        ip = _outward_ip()
        if ip is not None:
            with pytest.raises(OSError):
                socket.create_connection((ip, ports[0]), timeout=1).close()
        output, _ = job.communicate(timeout=120)
        elapsed = time.time() - max(float((tmp_path / f"rank{r}.t").read_text()) for r in range(2))
    finally:
        stop.set()
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    # The diagnosis is what it is without the stranger: rank 1 answered, and is named as outside any collective.
    assert f"past the deadline of {deadline} s" in output, output[-3000:]
    assert "rank 1: not inside any collective" in output, output[-3000:]
    assert "did not answer" not in output
    assert elapsed <= deadline + BOUND, f"{elapsed:.1f} s"
    # What the stranger learnt: challenges (random bytes) and nothing else -- no status, no error text.
    got = b"".join(seen)
    assert seen and got, "the stranger connected nowhere"
    for line in got.split(b"\n"):
        assert line == b"" or (line.startswith(b"IAV1 ") and len(line) == 37), line[:200]
    assert b"iteravg" not in got and b"{" not in got
    print(f"stranger: {len(seen)} connections read, the job ended {elapsed:.1f} s after rank 0 blocked")


# -- 4. the backend is agreed before any collective that depends on it ----------------------------------
def _mpmd(out: Path, envs: list) -> list:
    """mpirun with one rank per entry of ``envs`` (extra environment of that rank only, set through env(1))."""
    from launch import mpirun

    cmd = mpirun(1, [WORKER, str(out), "backend"])
    head, prog = cmd[: cmd.index(sys.executable)], cmd[cmd.index(sys.executable):]
    full = list(head[:1])
    for i, env in enumerate(envs):
        full += ([":"] if i else []) + head[1:] + ["env", *[f"{k}={v}" for k, v in env.items()], *prog]
    return full


def test_a_host_without_horovod_makes_every_rank_use_mpi4py(tmp_path):
    """Rank 1's ``import horovod.mxnet`` really fails (a package earlier on its PYTHONPATH raises ImportError);
    rank 0 has Horovod. Both end up on mpi4py (before: rank 0 Horovod, rank 1 mpi4py, a hang)."""
    import os

    shadow = tmp_path / "shadow" / "horovod"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("horovod is not built on this host (test)")\n')
    path = f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    proc = run(_mpmd(tmp_path, [{}, {"PYTHONPATH": path}]), timeout=180, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert [(tmp_path / f"rank{r}.comm").read_text() for r in range(2)] == ["mpi", "mpi"]
    assert "horovod.mxnet does not import on rank(s) [1]" in text and "not built on this host (test)" in text


def test_ranks_told_different_backends_fail_alike(tmp_path):
    t0 = time.time()
    proc = run(_mpmd(tmp_path, [{"ITERAVG_COMM": "mpi"}, {"ITERAVG_COMM": "horovod"}]), timeout=180, check=False)
    elapsed = time.time() - t0
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [ln for ln in text.splitlines() if "CommError: the ranks chose different communicators" in ln]
    assert len(lines) == 2 and lines[0] == lines[1], text[-3000:]  # every rank, the same message
    assert "'mpi' (ITERAVG_COMM); rank 1" in lines[0] and "'horovod' (ITERAVG_COMM)" in lines[0]
    assert not list(tmp_path.glob("rank*.comm")), "no rank may get a communicator"
    assert elapsed < 60
