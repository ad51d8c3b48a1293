#!/usr/bin/env python3
"""The multi-host suite: iteravg across three containers (h1, h2, h3) with sshd, on a podman network of their own.

Run it with `make test-hosts` (which builds the image first with scripts/image.sh). Standard library only, so it
runs with the machine's python3; every container command has a timeout and the containers and network are
removed on every exit path (finally + SIGTERM/SIGINT handlers).

What it shows, with the launchers users run (commands printed as they run, quoted in docker/README.md):
* horovodrun (MPI controller, ranks started over ssh), horovodrun --gloo, and mpirun with ITERAVG_COMM=mpi
  (mpi4py), each running `iteravg train` (tests/hosts/train_hash.py: the CLI plus a per-rank hash) and the
  GluonTS-API worker (tests/hosts/gluon_worker.py): every rank's averaged parameters hash the same; rank 0's
  checkpoint exists on rank 0's host only and `iteravg inspect` verifies it;
* resume on a different set of hosts: a 3-host run stopped at epoch 3, its checkpoint copied (tar over ssh) from h1
  to h2, resumed there on h2+h3;
* faults, each timed from the fault to the launcher's exit: a worker container killed mid-epoch, a worker's
  network cut mid-epoch and, separately, while the other ranks wait in the epoch-end sync. The job must end
  non-zero within BOUND seconds, no iteravg/MPI process may remain on any host, and rank 0's last snapshot must
  verify with `iteravg inspect`.

The network is 10.89.77.0/24 (ITERAVG_HOSTS_SUBNET=a.b.c to change it); nothing outside it is contacted.
Results: a table on stdout and in runs/hosts/summary.txt (and summary.json).
Usage: tests/hosts/suite.py IMAGE [--only NAME,...] [--keep]   (names: see SCENARIOS at the bottom)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
PREFIX = os.environ.get("ITERAVG_HOSTS_SUBNET", "10.89.77")
NETWORK = "iteravg-hosts"
HOSTS = {"h1": f"{PREFIX}.11", "h2": f"{PREFIX}.12", "h3": f"{PREFIX}.13"}
PODMAN = ["podman", "--runtime", "runc"]  # crun rejects this kind of machine's cgroups (v1/hybrid)
# Container flags (ulimits, sysctl net.ipv4.tcp_retries2=5, --add-host): see launch/containers.sh.
SRC = "/opt/iteravg"  # the image's copy of the repository (scripts/image.sh rebuilds it when the tree changes)
BOUND = float(os.environ.get("ITERAVG_HOSTS_FAULT_BOUND", "180"))  # s from a fault to the launcher's exit
HOLD = 20  # s rank 2 is late to epoch 3's sync in the cut-sync scenarios
GRACE = 30.0  # s allowed after the launcher's exit for the ranks' processes to disappear
# Fault-detection settings passed to every job (see docker/README.md, "Faults"):
JOB_ENV = {
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "HOROVOD_STALL_CHECK_TIME_SECONDS": "10",     # warn about a rank that did not join a collective
    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "30",  # ... and shut the job down after this long
    "HOROVOD_GLOO_TIMEOUT_SECONDS": "30",         # Gloo rendezvous / connect timeout
    "ITERAVG_COLLECTIVE_TIMEOUT": "45",           # iteravg's own collective watchdog, where present
}
PROCESS_PATTERN = "python|orted|mpirun|horovodrun|prted"
RESULTS: List[Dict[str, object]] = []
INFO: Dict[str, str] = {}


class Failure(AssertionError):
    pass


def log(msg: str) -> None:
    print(f"[hosts {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: Sequence[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise Failure(f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def name(host: str) -> str:
    return f"iteravg-{host}"


def on(host: str, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command inside host's container (podman exec needs no network: it works on a partitioned host)."""
    return run([*PODMAN, "exec", name(host), *cmd], timeout=timeout, check=check)


# -- the cluster: launch/containers.sh (the documented commands) brings it up and down ------------------------
def containers(action: str, *args: str) -> None:
    env = dict(os.environ, ENGINE="podman", HOSTS_N=str(len(HOSTS)), ITERAVG_HOSTS_SUBNET=PREFIX, NETWORK=NETWORK)
    proc = subprocess.run(["bash", str(REPO / "launch" / "containers.sh"), action, *args], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise Failure(f"launch/containers.sh {action} exited {proc.returncode}: {proc.stderr[-3000:]}")
    if proc.stdout.strip():
        log(proc.stdout.strip())


def teardown() -> None:
    containers("down")


def wait_ssh(hosts: Sequence[str], timeout: float = 60) -> None:
    """Every host reaches every host over ssh (the launchers' transport)."""
    deadline = time.monotonic() + timeout
    for src in hosts:
        for dst in hosts:
            while True:
                proc = on(src, "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", dst, "true",
                          timeout=20, check=False)
                if proc.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise Failure(f"ssh {src} -> {dst} failed: {proc.stderr.strip()}")
                time.sleep(1)


def setup(image: str) -> None:
    containers("up", image)  # removes a previous run's leftovers first
    INFO["image"] = image
    probe = ("import sys, importlib.util as u; from iteravg.core import _kernel; "
             "print('C fold kernel' if _kernel.KERNELS else 'numpy fallback (no C kernel)', end='; '); "
             "print('collective watchdog' if u.find_spec('iteravg.comm.watchdog') else 'no collective watchdog')")
    proc = on("h1", "python", "-c", probe, check=False, timeout=120)
    INFO["iteravg"] = proc.stdout.strip() if proc.returncode == 0 else f"probe failed: {proc.stderr.strip()[-200:]}"
    log(f"image {image}: {INFO['iteravg']}")


# -- launch commands (the exact commands docs/launching.md and docker/README.md quote) ---------------------
def launch(launcher: str, hosts: Sequence[str], program: Sequence[str]) -> List[str]:
    """The command run on the first host for one rank per host."""
    n = str(len(hosts))
    if launcher in ("horovodrun", "horovodrun-gloo"):
        cmd = ["horovodrun", "-np", n, "-H", ",".join(f"{h}:1" for h in hosts), "--network-interface", "eth0"]
        if launcher == "horovodrun-gloo":
            cmd.append("--gloo")
        return cmd + list(program)
    if launcher == "mpirun":
        cmd = ["mpirun", "-np", n, "-H", ",".join(f"{h}:1" for h in hosts), "--bind-to", "none",
               "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "eth0",
               "--mca", "oob_tcp_if_include", "eth0", "-x", "ITERAVG_COMM=mpi", "-x", "PATH"]
        for key in JOB_ENV:
            cmd += ["-x", key]
        return cmd + list(program)
    raise ValueError(f"unknown launcher {launcher!r}")


def exec_cmd(host: str, cmd: Sequence[str], extra_env: Optional[Dict[str, str]] = None) -> List[str]:
    env = dict(JOB_ENV, **(extra_env or {}))
    return [*PODMAN, "exec", "-w", SRC, *[a for k, v in env.items() for a in ("-e", f"{k}={v}")], name(host), *cmd]


def train_program(out: str, *args: str) -> List[str]:
    return ["python", "tests/hosts/train_hash.py", "--out", out, "--no-progress", "--epochs", "6", *args]


def gluon_program(out: str, *args: str) -> List[str]:
    return ["python", "tests/hosts/gluon_worker.py", out, *args]


# -- checks ---------------------------------------------------------------------------------------------
def rank_records(out: str, hosts: Sequence[str]) -> Dict[str, List[dict]]:
    records = {}
    for host in hosts:
        proc = on(host, "bash", "-c", f"cat {shlex.quote(out)}/rank*.json 2>/dev/null; true")
        records[host] = [json.loads(line) for line in proc.stdout.replace("}{", "}\n{").splitlines() if line.strip()]
    return records


def check_identical(out: str, hosts: Sequence[str]) -> str:
    """One rank per host, each wrote its own record on its own file system, all hashes equal."""
    records = rank_records(out, hosts)
    for i, host in enumerate(hosts):
        recs = records[host]
        if len(recs) != 1 or recs[0]["host"] != host or recs[0]["rank"] != i or recs[0]["size"] != len(hosts):
            raise Failure(f"{host}:{out} should hold exactly rank {i}'s record, found {recs}")
    hashes = {host: records[host][0]["sha256"] for host in hosts}
    if len(set(hashes.values())) != 1:
        raise Failure(f"averaged models differ across hosts: {hashes}")
    if records[hosts[0]][0]["average_counter"] < 1:
        raise Failure(f"nothing was averaged: {records[hosts[0]][0]}")
    return next(iter(hashes.values()))


def inspect(host: str, ckpt: str) -> dict:
    proc = on(host, "iteravg", "inspect", "--json", ckpt, timeout=120, check=False)
    try:
        summary = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise Failure(f"iteravg inspect {ckpt} on {host} exited {proc.returncode}: {proc.stderr[-2000:]}") from exc
    if proc.returncode != 0 or not summary.get("verified"):
        raise Failure(f"{host}:{ckpt} does not verify: {summary.get('problems')} {proc.stderr[-1000:]}")
    return summary


def check_checkpoint_only_on(host: str, ckpt: str, hosts: Sequence[str]) -> dict:
    for other in hosts:
        exists = on(other, "test", "-e", ckpt, check=False).returncode == 0
        if exists != (other == host):
            raise Failure(f"{ckpt} {'exists' if exists else 'is missing'} on {other} (rank 0 is on {host})")
    return inspect(host, ckpt)


def leftovers(hosts: Sequence[str]) -> Dict[str, str]:
    found = {}
    for host in hosts:
        proc = on(host, "pgrep", "-af", PROCESS_PATTERN, check=False)
        if proc.stdout.strip():
            found[host] = proc.stdout.strip()
    return found


def wait_no_leftovers(hosts: Sequence[str], watch: float = 90.0) -> tuple:
    """(seconds until no rank process is left on any host, what was left at the first look); watches at most
    ``watch`` seconds (then seconds is None), so that a failure still says how long the processes lingered."""
    t0 = time.monotonic()
    first: Dict[str, str] = {}
    while True:
        found = leftovers(hosts)
        if not found:
            return time.monotonic() - t0, first
        first = first or found
        if time.monotonic() - t0 > watch:
            return None, first
        time.sleep(1)


# -- scenarios ------------------------------------------------------------------------------------------
def record(scenario: str, launcher: str, hosts: Sequence[str], seconds: float, result: str, **extra: object) -> None:
    RESULTS.append(dict(scenario=scenario, launcher=launcher, hosts=",".join(hosts), seconds=round(seconds, 1),
                        result=result, **extra))


def job(host: str, cmd: Sequence[str], timeout: float, extra_env: Optional[Dict[str, str]] = None,
        expect_rc: Optional[int] = 0) -> subprocess.CompletedProcess:
    full = exec_cmd(host, cmd, extra_env)
    log(f"on {host}: {shlex.join(cmd)}")
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise Failure(f"exit {proc.returncode} (expected {expect_rc})\n--- stdout\n{proc.stdout[-3000:]}\n"
                      f"--- stderr\n{proc.stderr[-5000:]}")
    return proc


def scenario_train(launcher: str) -> Callable[[], None]:
    def body() -> None:
        hosts = ["h1", "h2", "h3"]
        for kind, program in (("iteravg train", train_program), ("gluon API", gluon_program)):
            out = f"/runs/{launcher}-{kind.split()[-1]}"
            t0 = time.monotonic()
            job("h1", launch(launcher, hosts, program(out)), timeout=600)
            digest = check_identical(out, hosts)
            summary = check_checkpoint_only_on("h1", f"{out}/checkpoints", hosts)
            record(f"{kind}: 3 hosts, identical average", launcher, hosts, time.monotonic() - t0, "pass",
                   sha256=digest[:16], ckpt_epoch=summary.get("epoch"))
            log(f"{launcher} {kind}: sha256 {digest[:16]} on {', '.join(hosts)}; checkpoint on h1 only, verified")
    return body


def scenario_resume() -> None:
    """A 3-host run stops at epoch 3; its checkpoint is copied from h1 to h2 (tar over ssh); h2+h3 finish it."""
    out = "/runs/resume"
    t0 = time.monotonic()
    first = ["h1", "h2", "h3"]
    proc = job("h1", launch("horovodrun-gloo", first, train_program(out)), timeout=600,
               extra_env={"ITERAVG_STOP_AFTER_EPOCH": "3"}, expect_rc=None)
    if proc.returncode == 0:
        raise Failure("ITERAVG_STOP_AFTER_EPOCH=3 should have stopped the run with a non-zero exit")
    before = inspect("h1", f"{out}/checkpoints")
    if before["epoch"] != 3:
        raise Failure(f"expected the epoch-3 snapshot, got {before}")
    # `latest` is a symlink, which scp -r does not copy: tar over ssh (or rsync -a) keeps it.
    on("h2", "bash", "-c", f"mkdir -p {out} && ssh h1 tar -C {out} -c checkpoints | tar -C {out} -x", timeout=120)
    second = ["h2", "h3"]
    on("h3", "rm", "-rf", out)
    job("h2", launch("horovodrun-gloo", second, train_program(out, "--resume")), timeout=600)
    digest = check_identical(out, second)
    report = json.loads(on("h2", "cat", f"{out}/report.json").stdout)
    if report["resumed_from_epoch"] != 3 or report["world_size"] != 2 or report["epochs_done"] != 6:
        raise Failure(f"unexpected resumed report: {report}")
    after = inspect("h2", f"{out}/checkpoints")
    record("resume: 3 hosts (h1 rank 0) -> 2 other hosts (h2 rank 0)", "horovodrun-gloo", second,
           time.monotonic() - t0, "pass", sha256=digest[:16], ckpt_epoch=after["epoch"])
    log(f"resumed on h2,h3 from h1's epoch-3 snapshot (copied with tar over ssh); sha256 {digest[:16]}")


def restore(host: str, fault: str) -> None:
    """Bring a faulted host back: restart a killed container, reconnect a cut one; drop any leftover process."""
    if fault == "kill":
        run([*PODMAN, "start", name(host)], timeout=120)
    else:
        run([*PODMAN, "network", "connect", "--ip", HOSTS[host], NETWORK, name(host)], timeout=60)
    for h in HOSTS:
        on(h, "pkill", "-9", "-f", PROCESS_PATTERN, check=False)
    wait_ssh(list(HOSTS))


def scenario_fault(launcher: str, fault: str) -> Callable[[], None]:
    """fault: kill (podman kill the worker mid-epoch), cut-epoch (disconnect it mid-epoch), cut-sync (disconnect
    it while the other ranks wait for it inside the epoch-end sync)."""
    def body() -> None:
        hosts, victim = ["h1", "h2", "h3"], "h3"
        out = f"/runs/fault-{launcher}-{fault}"
        args = ["--epochs", "40", "--batch-sleep", "0.15"]
        if fault == "cut-sync":
            # rank 2 (h3) arrives 20 s late to epoch 3's sync: the network is cut 3 s into that wait. A rank busy
            # outside any collective (here: sleeping) notices the cut at its next collective at the earliest
            # (under Horovod's Gloo controller nothing kills it sooner; under MPI its orted does), so the hold
            # is kept short: it is part of the "processes gone" time this scenario reports.
            args += ["--hold-before-sync", f"2:3:{HOLD}"]
        cmd = launch(launcher, hosts, gluon_program(out, *args))
        log(f"on h1: {shlex.join(cmd)}")
        proc = subprocess.Popen(exec_cmd("h1", cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 300
            marker = f"{out}/holding-r2" if fault == "cut-sync" else f"{out}/checkpoints/epoch-000003"
            where = "h3" if fault == "cut-sync" else "h1"
            while on(where, "test", "-e", marker, check=False).returncode != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise Failure(f"the job did not reach {marker} on {where}: {proc.communicate()[0][-3000:]}")
                time.sleep(0.5)
            if fault == "cut-sync":
                time.sleep(3)  # h1 and h2 are now blocked in epoch 3's sync collective, waiting for h3
            else:
                time.sleep(1.0)  # well inside epoch 4's batches (about 1 s per epoch)
            where_now = on(victim, "cat", f"{out}/progress-r2").stdout.strip()
            t0 = time.monotonic()
            if fault == "kill":
                run([*PODMAN, "kill", name(victim)], timeout=60)
            else:
                run([*PODMAN, "network", "disconnect", NETWORK, name(victim)], timeout=60)
            log(f"{fault}: {victim} at epoch/batch {where_now}; waiting for the job to end (bound {BOUND:.0f} s)")
            try:
                output, _ = proc.communicate(timeout=BOUND)
            except subprocess.TimeoutExpired:
                raise Failure(f"{launcher} did not end within {BOUND:.0f} s of the fault ({fault} on {victim})")
            ttf = time.monotonic() - t0
            if proc.returncode == 0:
                raise Failure(f"the job exited 0 after the fault: {output[-2000:]}")
            alive = [h for h in hosts if not (fault == "kill" and h == victim)]
            clean_after, left = wait_no_leftovers(alive)  # a cut-off host is checked too (podman exec)
            summary = inspect("h1", f"{out}/checkpoints")
            ok = clean_after is not None and clean_after <= GRACE
            record(f"fault {fault}: {victim} {'killed' if fault == 'kill' else 'cut off'}", launcher, hosts, ttf,
                   "pass" if ok else "FAIL", exit_code=proc.returncode, time_to_failure_s=round(ttf, 1),
                   processes_gone_after_s=None if clean_after is None else round(clean_after, 1),
                   last_snapshot_epoch=summary["epoch"], fault_at=where_now)
            gone = "over 90 s" if clean_after is None else f"{clean_after:.1f} s"
            log(f"{launcher} {fault}: exit {proc.returncode} {ttf:.1f} s after the fault; rank processes gone "
                f"{gone} after the exit; rank 0's last snapshot: epoch {summary['epoch']}, verified")
            if not ok:
                raise Failure(f"processes left after the job ended ({gone}, limit {GRACE:.0f} s): {left}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            restore(victim, fault)
    return body


SCENARIOS: Dict[str, Callable[[], None]] = {
    "horovodrun": scenario_train("horovodrun"),
    "gloo": scenario_train("horovodrun-gloo"),
    "mpirun": scenario_train("mpirun"),
    "resume": scenario_resume,
    "kill": scenario_fault("horovodrun", "kill"),
    "cut-epoch": scenario_fault("horovodrun", "cut-epoch"),
    "cut-sync": scenario_fault("horovodrun", "cut-sync"),
    "gloo-kill": scenario_fault("horovodrun-gloo", "kill"),
    "gloo-cut-epoch": scenario_fault("horovodrun-gloo", "cut-epoch"),
    "gloo-cut-sync": scenario_fault("horovodrun-gloo", "cut-sync"),
    "mpirun-kill": scenario_fault("mpirun", "kill"),
    "mpirun-cut-epoch": scenario_fault("mpirun", "cut-epoch"),
    "mpirun-cut-sync": scenario_fault("mpirun", "cut-sync"),
}
DEFAULT = list(SCENARIOS)


def write_summary(path: Path, failures: Dict[str, str], elapsed: float) -> str:
    lines = [f"iteravg multi-host suite: hosts {', '.join(f'{h}={ip}' for h, ip in HOSTS.items())} "
             f"(podman network {NETWORK}), {elapsed:.0f} s total",
             f"image {INFO.get('image', '?')}: {INFO.get('iteravg', '?')}", ""]
    lines.append(f"{'scenario':<58} {'launcher':<16} {'hosts':<9} {'s':>6}  result / time-to-failure")
    for r in RESULTS:
        detail = r["result"]
        if "time_to_failure_s" in r:
            gone = r["processes_gone_after_s"]
            detail = (f"{r['result']}: exit {r['exit_code']} {r['time_to_failure_s']} s after the fault; processes "
                      f"gone +{'>90' if gone is None else gone} s; snapshot epoch {r['last_snapshot_epoch']} verified")
        elif "sha256" in r:
            detail = f"pass, sha256 {r['sha256']} on every host, ckpt epoch {r['ckpt_epoch']} verified"
        lines.append(f"{r['scenario']:<58} {r['launcher']:<16} {r['hosts']:<9} {r['seconds']:>6}  {detail}")
    for scenario, msg in failures.items():
        lines.append(f"FAILED {scenario}: {msg.splitlines()[0] if msg else ''}")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    (path.parent / "summary.json").write_text(json.dumps({"info": INFO, "results": RESULTS, "failures": failures},
                                                         indent=1))
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("image")
    ap.add_argument("--only", default=os.environ.get("HOSTS_ONLY", ""), help="comma-separated scenario names")
    ap.add_argument("--keep", action="store_true", help="leave the containers running afterwards (debugging)")
    ap.add_argument("--summary", default=str(REPO / "runs" / "hosts" / "summary.txt"))
    args = ap.parse_args()
    chosen = [s for s in args.only.split(",") if s] or DEFAULT
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    failures: Dict[str, str] = {}
    t0 = time.monotonic()
    try:
        setup(args.image)
        for scenario in chosen:
            log(f"=== {scenario}")
            try:
                SCENARIOS[scenario]()
            except (Failure, subprocess.TimeoutExpired) as exc:
                failures[scenario] = str(exc)
                log(f"FAILED {scenario}: {exc}")
    finally:
        if not args.keep:
            teardown()
    text = write_summary(Path(args.summary), failures, time.monotonic() - t0)
    print("\n" + text, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
