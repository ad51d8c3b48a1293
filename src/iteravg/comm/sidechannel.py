"""The watchdog's status side channel: authenticated, bounded, served concurrently, queried in parallel.

Why a side channel at all: a rank stuck in a collective cannot ask its peers through the collective library (that
is what is stuck), so each rank also answers "where are you?" on a small TCP socket.

Why it trusts nothing that connects to it:

* **A per-job secret.** Every rank draws 32 random bytes; they are exchanged by the launcher's own collective
  (MPI, Gloo, ...) when the communicator is created, and the job's key is the SHA-256 of all of them. Nobody outside
  the job knows it (as Horovod's runner signs its messages with a per-job HMAC key).
* **Challenge-response, both ways authenticated.** On accept the server sends a fresh random challenge; the request
  must carry HMAC-SHA256(key, "request", challenge, body), and name this rank and this port (so a request for one
  rank is not accepted by another); the reply carries HMAC(key, "reply", challenge, body) with the client's own
  nonce in the body, so a client never believes a reply that is not fresh and from the job. A connection that does
  not authenticate gets nothing but the challenge (random bytes) and is closed.
* **Bounded everything.** A request is at most ``MAX_REQUEST`` bytes and a connection lives at most
  ``SERVE_SECONDS`` on the server; a client reads at most ``MAX_REPLY`` bytes per peer and stops at its deadline.
* **Concurrent.** One thread serves every connection through a selector (non-blocking sockets), so a stranger that
  connects and sends nothing, or holds hundreds of connections open, delays nobody; at most ``MAX_CONNECTIONS``
  are kept (the oldest is dropped first). A failing ``accept`` (out of file descriptors, an aborted connection)
  is counted and retried, never ends the thread.
* **Parallel queries.** ``query`` talks to up to ``MAX_PARALLEL`` peers at once through one selector, under one
  overall deadline: asking 2 or 512 peers takes the same time (the slowest answer, at most the deadline).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import secrets
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

__all__ = ["MAGIC", "MAX_REQUEST", "MAX_REPLY", "SERVE_SECONDS", "MAX_CONNECTIONS", "MAX_PARALLEL", "Answer",
           "StatusServer", "query", "job_key", "new_secret"]

MAGIC = b"IAV1"
MAX_REQUEST = 4096
MAX_REPLY = 64 * 1024
SERVE_SECONDS = 2.0
MAX_CONNECTIONS = 256
MAX_PARALLEL = 512
_CHALLENGE_BYTES = 16


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def job_key(contributions: List[bytes]) -> bytes:
    """The job's key from every rank's secret (no single rank chooses it)."""
    h = hashlib.sha256(b"iteravg-watchdog-key-v1")
    for c in contributions:
        h.update(struct.pack("<Q", len(c)) + c)
    return h.digest()


def _mac(key: bytes, *parts: bytes) -> bytes:
    m = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        m.update(struct.pack("<Q", len(p)) + p)
    return m.hexdigest().encode()


def _line(key: bytes, direction: bytes, challenge: bytes, body: Dict[str, Any]) -> bytes:
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return MAGIC + b" " + _mac(key, direction, challenge, raw) + b" " + raw + b"\n"


def _parse(key: bytes, direction: bytes, challenge: bytes, line: bytes) -> Optional[Dict[str, Any]]:
    """The body of an authenticated line, or None (wrong magic, MAC or JSON)."""
    parts = line.rstrip(b"\n").split(b" ", 2)
    if len(parts) != 3 or parts[0] != MAGIC:
        return None
    if not hmac.compare_digest(parts[1], _mac(key, direction, challenge, parts[2])):
        return None
    try:
        body = json.loads(parts[2])
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


# -- the server ------------------------------------------------------------------------------------
@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    challenge: bytes
    inbox: bytes = b""
    outbox: bytes = b""
    closing: bool = False  # close once the outbox is sent


class StatusServer:
    """Answers authenticated "status" requests with ``status()`` and passes authenticated notices ("bye") to
    ``on_notice(rank, data)``. One daemon thread; see the module doc for the rules it enforces."""

    def __init__(self, key: bytes, rank: int, status: Callable[[], Dict[str, Any]],
                 on_notice: Callable[[int, Dict[str, Any]], None], bind_host: str = "") -> None:
        self._key, self.rank = key, rank
        self._status, self._on_notice = status, on_notice
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((bind_host, 0))
        self._sock.listen(128)
        self._sock.setblocking(False)
        self.bind_host = bind_host
        self.port: int = self._sock.getsockname()[1]
        self._conns: Dict[int, _Conn] = {}
        self._stop = threading.Event()
        #: Counters for tests and diagnostics: accepted connections, failed accepts, rejected requests, served.
        self.stats = {"accepted": 0, "accept_errors": 0, "rejected": 0, "served": 0, "loop_errors": 0}
        self._thread = threading.Thread(target=self._run, name="iteravg-watchdog-status", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the listening socket (peers then see the connection refused)."""
        self._stop.set()
        try:
            self._sock.close()
        except OSError:
            pass

    # -- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, None)
        while not self._stop.is_set():
            try:
                for skey, mask in sel.select(timeout=0.25):
                    if skey.data is None:
                        self._accept(sel)
                    else:
                        self._service(sel, skey.data, mask)
                self._expire(sel)
            except Exception:  # noqa: BLE001 -- the status thread must outlive anything a peer can cause
                self.stats["loop_errors"] += 1
                time.sleep(0.05)
        for conn in list(self._conns.values()):
            self._drop(sel, conn)
        sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(64):
            try:
                sock, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ECONNABORTED, ENOBUFS, ...: count it, keep serving
                self.stats["accept_errors"] += 1
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) and self._conns:
                    self._drop(sel, min(self._conns.values(), key=lambda c: c.deadline))
                time.sleep(0.01)
                return
            self.stats["accepted"] += 1
            if len(self._conns) >= MAX_CONNECTIONS:
                self._drop(sel, min(self._conns.values(), key=lambda c: c.deadline))
            sock.setblocking(False)
            challenge = secrets.token_bytes(_CHALLENGE_BYTES)
            conn = _Conn(sock, time.monotonic() + SERVE_SECONDS, challenge,
                         outbox=MAGIC + b" " + challenge.hex().encode() + b"\n")
            self._conns[sock.fileno()] = conn
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _service(self, sel: selectors.BaseSelector, conn: _Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE and conn.outbox:
                sent = conn.sock.send(conn.outbox)
                conn.outbox = conn.outbox[sent:]
            if not conn.outbox:
                if conn.closing:
                    self._drop(sel, conn)
                    return
                sel.modify(conn.sock, selectors.EVENT_READ, conn)
            if mask & selectors.EVENT_READ and not conn.closing:
                chunk = conn.sock.recv(MAX_REQUEST + 1 - len(conn.inbox))
                if not chunk:
                    self._drop(sel, conn)
                    return
                conn.inbox += chunk
                if b"\n" in conn.inbox:
                    self._answer(sel, conn, conn.inbox.split(b"\n", 1)[0])
                elif len(conn.inbox) > MAX_REQUEST:
                    self.stats["rejected"] += 1
                    self._drop(sel, conn)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(sel, conn)

    def _answer(self, sel: selectors.BaseSelector, conn: _Conn, line: bytes) -> None:
        body = _parse(self._key, b"request", conn.challenge, line)
        valid = (body is not None and body.get("to") == self.rank and body.get("port") == self.port
                 and isinstance(body.get("from"), int) and isinstance(body.get("nonce"), str)
                 and body.get("kind") in ("status", "bye"))
        if not valid:
            self.stats["rejected"] += 1
            self._drop(sel, conn)  # a stranger learns nothing: no reply, no error text
            return
        assert body is not None
        if body["kind"] == "bye":
            data = body.get("data")
            self._on_notice(int(body["from"]), data if isinstance(data, dict) else {})
            reply: Dict[str, Any] = {"nonce": body["nonce"], "ok": True}
        else:
            reply = {"nonce": body["nonce"], "status": self._status()}
        self.stats["served"] += 1
        conn.outbox = _line(self._key, b"reply", conn.challenge, reply)
        conn.closing = True
        sel.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline < now]:
            self._drop(sel, conn)

    def _drop(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        _release(sel, conn.sock)


# -- the client ------------------------------------------------------------------------------------
@dataclass
class Answer:
    """One peer's answer: ``status`` (authenticated), or why there is none: ``refused`` (nothing listens: the
    process is gone or closed its channel), ``timeout``, ``unreachable`` or ``bad reply``."""

    status: Optional[Dict[str, Any]] = None
    error: Optional[str] = None
    ok: bool = field(default=False)


@dataclass
class _Query:
    rank: int
    addr: Tuple[str, int]
    sock: Optional[socket.socket] = None
    phase: str = "connect"
    inbox: bytes = b""
    outbox: bytes = b""
    challenge: bytes = b""
    nonce: str = ""


def query(peers: Mapping[int, Tuple[str, int]], key: bytes, me: int, *, kind: str = "status",
          data: Optional[Dict[str, Any]] = None, timeout: float = 2.0) -> Dict[int, Answer]:
    """Ask every peer (rank -> (ip, port)) in parallel; returns rank -> ``Answer`` within ``timeout`` seconds.

    ``kind="bye"`` delivers ``data`` as an authenticated notice instead (the answer is only an acknowledgement).
    """
    deadline = time.monotonic() + timeout
    pending = [_Query(r, addr) for r, addr in sorted(peers.items())]
    answers: Dict[int, Answer] = {}
    sel = selectors.DefaultSelector()
    active: Dict[int, _Query] = {}
    try:
        while (pending or active) and time.monotonic() < deadline:
            while pending and len(active) < MAX_PARALLEL:
                q = pending.pop(0)
                err = _start(q)
                if err:
                    answers[q.rank] = Answer(error=err)
                    continue
                assert q.sock is not None
                active[q.sock.fileno()] = q
                sel.register(q.sock, selectors.EVENT_WRITE, q)
            if not active:
                continue
            for skey, mask in sel.select(timeout=max(0.0, min(0.25, deadline - time.monotonic()))):
                q = skey.data
                result = _step(q, mask, key, me, kind, data)
                if result is None:
                    if q.sock is not None:
                        sel.modify(q.sock, selectors.EVENT_WRITE if q.outbox or q.phase == "connect"
                                   else selectors.EVENT_READ, q)
                    continue
                answers[q.rank] = result
                _close(sel, active, q)
    finally:
        for q in list(active.values()):
            answers.setdefault(q.rank, Answer(error="timeout"))
            _close(sel, active, q)
        for q in pending:
            answers.setdefault(q.rank, Answer(error="timeout"))
        sel.close()
    return answers


def _start(q: _Query) -> Optional[str]:
    try:
        q.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        q.sock.setblocking(False)
        code = q.sock.connect_ex(q.addr)
    except OSError:
        if q.sock is not None:
            q.sock.close()
        return "unreachable"
    if code in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
        return None
    q.sock.close()
    return "refused" if code == errno.ECONNREFUSED else "unreachable"


def _step(q: _Query, mask: int, key: bytes, me: int, kind: str, data: Optional[Dict[str, Any]]) -> Optional[Answer]:
    assert q.sock is not None
    try:
        if q.phase == "connect":
            code = q.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                return Answer(error="refused" if code == errno.ECONNREFUSED else "unreachable")
            q.phase = "challenge"
            return None
        if mask & selectors.EVENT_WRITE and q.outbox:
            sent = q.sock.send(q.outbox)
            q.outbox = q.outbox[sent:]
            return None
        if not mask & selectors.EVENT_READ:
            return None
        chunk = q.sock.recv(MAX_REPLY + 1 - len(q.inbox))
        if not chunk:
            return Answer(error="bad reply")  # closed on us: not this job's rank, or a stranger
        q.inbox += chunk
        if len(q.inbox) > MAX_REPLY:
            return Answer(error="bad reply")
        if b"\n" not in q.inbox:
            return None
        line, q.inbox = q.inbox.split(b"\n", 1)
        if q.phase == "challenge":
            parts = line.split(b" ")
            if len(parts) != 2 or parts[0] != MAGIC or len(parts[1]) != 2 * _CHALLENGE_BYTES:
                return Answer(error="bad reply")
            try:
                q.challenge = bytes.fromhex(parts[1].decode())
            except ValueError:
                return Answer(error="bad reply")
            q.nonce = secrets.token_hex(16)
            body = {"kind": kind, "from": me, "to": q.rank, "port": q.addr[1], "nonce": q.nonce}
            if data is not None:
                body["data"] = data
            q.outbox = _line(key, b"request", q.challenge, body)
            q.phase = "reply"
            return None
        reply = _parse(key, b"reply", q.challenge, line)
        if reply is None or reply.get("nonce") != q.nonce:
            return Answer(error="bad reply")
        status = reply.get("status")
        if kind == "status" and not isinstance(status, dict):
            return Answer(error="bad reply")
        return Answer(status=status if isinstance(status, dict) else None, ok=True)
    except (BlockingIOError, InterruptedError):
        return None
    except ConnectionRefusedError:
        return Answer(error="refused")
    except OSError:
        return Answer(error="unreachable")


def _close(sel: selectors.BaseSelector, active: Dict[int, _Query], q: _Query) -> None:
    if q.sock is None:
        return
    active.pop(q.sock.fileno(), None)
    _release(sel, q.sock)


def _release(sel: selectors.BaseSelector, sock: socket.socket) -> None:
    """Unregister and close a socket, whatever state a peer or stranger left it in (never raises)."""
    try:
        sel.unregister(sock)
    except (KeyError, ValueError, OSError):
        pass
    try:
        sock.close()
    except OSError:
        pass
