"""The watchdog's side channel, its deadlock rule and the backend agreement's rule, on real sockets in one process
(the multi-rank behaviour: tests/test_fail_fast.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from iteravg.comm import sidechannel as sc
from iteravg.comm.agreement import decide
from iteravg.comm.base import CommError
from iteravg.comm.watchdog import STABLE_S, PeerView, certain_deadlock

KEY = b"k" * 32


@pytest.fixture
def servers():
    made = []

    def make(rank: int, key: bytes = KEY, notices: list | None = None):
        srv = sc.StatusServer(key, rank, lambda: {"rank": rank, "seq": 7, "current": None},
                              (lambda r, d: notices.append((r, d))) if notices is not None else (lambda r, d: None),
                              "127.0.0.1")
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.close()


def test_a_peer_with_the_key_gets_the_status_and_a_stranger_gets_nothing(servers):
    srv = servers(3)
    answers = sc.query({3: ("127.0.0.1", srv.port)}, KEY, 0, timeout=2)
    assert answers[3].ok and answers[3].status == {"rank": 3, "seq": 7, "current": None}
    wrong = sc.query({3: ("127.0.0.1", srv.port)}, b"x" * 32, 0, timeout=2)
    assert not wrong[3].ok and wrong[3].error == "bad reply"
    # A request addressed to another rank, or to another port, is not answered either.
    assert not sc.query({2: ("127.0.0.1", srv.port)}, KEY, 0, timeout=2)[2].ok
    with socket.create_connection(("127.0.0.1", srv.port), timeout=2) as s:
        s.settimeout(3)
        challenge = s.recv(100)
        s.sendall(b'status\n{"kind":"status"}\n')
        rest = s.recv(100)
    assert challenge.startswith(b"IAV1 ") and len(challenge) == 38 and rest == b""
    assert srv.stats["rejected"] >= 3 and srv.stats["served"] == 1


def test_strangers_holding_connections_and_sending_garbage_delay_nobody(servers):
    srv = servers(1)
    held = []
    for i in range(300):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=2)
        if i % 3 == 1:
            s.sendall(b"\x00garbage" * 50)
        elif i % 3 == 2:
            s.sendall(b"A" * (sc.MAX_REQUEST + 10))  # no newline, over the size limit
        held.append(s)
    try:
        t0 = time.monotonic()
        answers = sc.query({1: ("127.0.0.1", srv.port)}, KEY, 0, timeout=2)
        took = time.monotonic() - t0
    finally:
        for s in held:
            s.close()
    assert answers[1].ok, answers[1]
    assert took < 1.0, f"a real peer waited {took:.2f} s behind 300 stranger connections"
    assert srv.stats["accepted"] >= 301 and srv.stats["loop_errors"] == 0


def test_bye_notices_are_delivered_only_with_the_key(servers):
    notices: list = []
    srv = servers(2, notices=notices)
    assert sc.query({2: ("127.0.0.1", srv.port)}, KEY, 0, kind="bye", data={"code": 3}, timeout=2)[2].ok
    sc.query({2: ("127.0.0.1", srv.port)}, b"y" * 32, 1, kind="bye", data={"code": 9}, timeout=2)
    assert notices == [(0, {"code": 3})]


def test_asking_many_peers_takes_as_long_as_asking_a_few(servers):
    """Peers that accept the connection but never answer (frozen) cost the deadline once, not once each."""
    live = {r: ("127.0.0.1", servers(r).port) for r in range(3)}

    def frozen(n: int) -> list:
        socks = []
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(4)  # the kernel completes the handshake; nobody ever reads or writes
            socks.append(s)
        return socks

    times = {}
    for n in (5, 300):
        socks = frozen(n)
        peers = {**live, **{100 + i: ("127.0.0.1", s.getsockname()[1]) for i, s in enumerate(socks)}}
        t0 = time.monotonic()
        answers = sc.query(peers, KEY, 99, timeout=1.0)
        times[n] = time.monotonic() - t0
        for s in socks:
            s.close()
        assert all(answers[r].ok for r in live)
        assert all(answers[r].error == "timeout" for r in peers if r >= 100)
    assert times[300] < 2.0 and times[300] < times[5] + 0.8, times


def test_a_closed_port_is_reported_refused():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert sc.query({1: ("127.0.0.1", port)}, KEY, 0, timeout=1)[1].error == "refused"


def test_failing_accepts_do_not_end_the_server():
    """With the file-descriptor limit reached, ``accept`` fails (EMFILE) over and over; once descriptors are free
    again the server answers as before."""
    script = textwrap.dedent(f"""
        import resource, sys, time
        from iteravg.comm import sidechannel as sc
        srv = sc.StatusServer({KEY!r}, 0, lambda: {{"ok": 1}}, lambda r, d: None, "127.0.0.1")
        print(srv.port, flush=True)
        import os
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 3, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        sys.stdin.readline()
        print(srv.stats["accept_errors"], srv._thread.is_alive(), flush=True)
        sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        time.sleep(0.3)
        flood = []
        for _ in range(40):
            try:
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            except OSError:
                pass
        time.sleep(1.0)
        proc.stdin.write("\n")
        proc.stdin.flush()
        errors, alive = proc.stdout.readline().split()
        for s in flood:
            s.close()
        time.sleep(sc.SERVE_SECONDS + 0.5)  # the server drops the strangers' connections at their deadline
        answer = sc.query({0: ("127.0.0.1", port)}, KEY, 1, timeout=3)[0]
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=10)
    assert int(errors) > 0 and alive == "True"
    assert answer.ok and answer.status == {"ok": 1}


# -- the deadlock rule ---------------------------------------------------------------------------------
def _v(rank: int, kind: str, seq: int = 5, age: float = 10.0) -> PeerView:
    return PeerView(rank, kind, f"rank {rank}: {kind}", seq, age)


@pytest.mark.parametrize("views,age,certain", [
    ({1: _v(1, "same")}, 30.0, False),                                  # waiting for nobody: just slow
    ({1: _v(1, "idle")}, 30.0, False),                                  # a slow rank gets the full deadline
    ({1: _v(1, "unknown")}, 30.0, False),                               # no answer: maybe frozen, maybe slow
    ({1: _v(1, "other", seq=5, age=0.1)}, 0.1, True),                   # same number, other name: certain at once
    ({1: _v(1, "other", seq=4, age=0.5)}, 30.0, False),                 # one behind, just now: a broadcast's root
    ({1: _v(1, "other", seq=4, age=STABLE_S)}, 30.0, True),             # ... both blocked for STABLE_S: certain
    ({1: _v(1, "same"), 2: _v(2, "other", seq=5)}, 5.0, True),
    ({1: _v(1, "idle"), 2: _v(2, "other", seq=5)}, 5.0, False),         # rank 1 may still come
    ({1: _v(1, "idle"), 2: _v(2, "gone")}, 0.0, True),                  # a rank that left never comes
])
def test_certain_deadlock(views, age, certain):
    assert certain_deadlock(views, 5, age) is certain


# -- the backend agreement's rule ----------------------------------------------------------------------
def _row(choice: str, forced: bool = False, host: str = "h", **extra) -> dict:
    return dict(choice=choice, forced=forced, host=host, **extra)


def test_agreement_rule():
    assert decide([_row("horovod"), _row("horovod")]) == ("horovod", None)
    backend, note = decide([_row("horovod", host="a"), _row("mpi", host="b", why="ImportError: no horovod")])
    assert backend == "mpi" and "rank(s) [1]" in note and "ImportError: no horovod" in note
    backend, note = decide([_row("mpi", forced=True), _row("horovod")])
    assert backend == "mpi" and "-x ITERAVG_COMM" in note
    rows = [_row("mpi", forced=True, host="a"), _row("horovod", forced=True, host="b")]
    with pytest.raises(CommError, match=r"rank 0 \(a\): 'mpi' \(ITERAVG_COMM\); rank 1 \(b\): 'horovod'"):
        decide(rows)
    with pytest.raises(CommError, match="different communicators"):
        decide([_row("horovod", forced=True), _row("mpi")])  # Horovod asked for, missing on rank 1
    with pytest.raises(CommError, match="ITERAVG_COMM must be one of"):
        decide([_row("?", forced=True, error="ITERAVG_COMM must be one of horovod, mpi, local"), _row("mpi")])
    # The message is computed from the gathered rows only: every rank raises the same text.
    a = pytest.raises(CommError, decide, json.loads(json.dumps(rows))).value
    assert str(a) == str(pytest.raises(CommError, decide, rows).value)


# -- liveness: the exit code a leaving rank reports ------------------------------------------------------------------
@pytest.mark.parametrize("status,code", [(None, 0), (0, 0), (3, 3), (256 + 4, 4), ("bye", 1), (True, 1), (False, 0)])
def test_the_recorded_exit_code_is_the_interpreters(status, code):
    """``sys.exit(status)`` exits with this code (checked against a real interpreter)."""
    from iteravg.comm import liveness

    assert liveness.exit_code_of(status) == code
    real = subprocess.run([sys.executable, "-c", f"import sys; sys.exit({status!r})"], capture_output=True)
    assert real.returncode == code
