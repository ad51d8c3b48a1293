"""The collective watchdog: a collective that some rank never joins ends the whole job with a clear message.

Anchors: PyTorch's NCCL watchdog (a thread that times out stuck collectives and tears the job down) and Horovod's
stall inspector (names the ranks that did not submit a tensor).

How it works, per rank:

* Every collective of a multi-rank communicator is bracketed by ``begin(name)`` / ``end()``. ``begin`` records the
  collective's sequence number, its name, the *hook* it came from (``phase("on_epoch_end")``, a context variable
  the engine sets; default ``"unknown"``) and the deadline. This costs a few attribute writes, nothing on the wire,
  so the collectives themselves stay the blocking, full-speed MPI / Horovod calls.
* A daemon *monitor* thread wakes every second (more often with short deadlines) and checks whether the current
  collective is older than its deadline (``ITERAVG_COLLECTIVE_TIMEOUT`` seconds, default 300; ``0`` disables).
* A daemon *status* thread answers, on a TCP socket, "where are you?" with this rank's sequence number, current
  collective and hook. The sockets' addresses are exchanged once, by a small allgather when the communicator is
  created (hosts as the launcher names them; peers on the same host are reached on 127.0.0.1).
* When the deadline passes, the stuck rank asks every peer where it is (a few seconds at most), prints one message
  on stderr naming the collective, the hook, the deadline, its own sequence number and, for each peer, whether it
  arrived, is inside another collective, is exiting, or did not answer -- then ends the WHOLE job: ``MPI_Abort``
  under mpi4py, ``os._exit`` under Horovod (``horovodrun`` / ``mpirun`` then stop every other rank).
  The exit code is ``EXIT_CODE`` (124, as coreutils ``timeout``).

The status socket carries nothing but that JSON status line; it listens on all interfaces of the rank's host.
If a peer's host cannot be reached (firewall), the message says "did not answer" and the job still ends.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterator, List, Optional, Tuple

__all__ = ["ENV_TIMEOUT", "DEFAULT_TIMEOUT", "EXIT_CODE", "Watchdog", "phase", "current_phase", "set_timeout",
           "get_timeout", "install_abort_on_exception"]

ENV_TIMEOUT = "ITERAVG_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
EXIT_CODE = 124
ADDRESS_BYTES = 256
_QUERY_SECONDS = 3.0

_hook: contextvars.ContextVar[str] = contextvars.ContextVar("iteravg_hook", default="unknown")
_override: List[Optional[float]] = []  # set_timeout() from Python wins over the environment


def set_timeout(seconds: Optional[float]) -> None:
    """Set the collective deadline from Python (seconds; ``0`` disables; ``None`` returns to the environment)."""
    _override.clear()
    if seconds is not None:
        if not isinstance(seconds, (int, float)) or seconds != seconds or seconds < 0:
            raise ValueError(f"collective timeout must be a number of seconds >= 0, got {seconds!r}")
        _override.append(float(seconds))


def get_timeout() -> Optional[float]:
    """The deadline in seconds for one collective, or ``None`` if disabled (``0``)."""
    if _override:
        value = _override[0]
    else:
        text = os.environ.get(ENV_TIMEOUT, "").strip()
        try:
            value = float(text) if text else DEFAULT_TIMEOUT
        except ValueError:
            raise ValueError(f"{ENV_TIMEOUT} must be a number of seconds (0 disables), got {text!r}") from None
        if value != value or value < 0:
            raise ValueError(f"{ENV_TIMEOUT} must be a number of seconds >= 0, got {text!r}")
    return value if value > 0 else None


@contextlib.contextmanager
def phase(hook: str) -> Iterator[None]:
    """Name the hook (``"on_epoch_end"``, ``"save"``, ...) that the collectives inside come from."""
    token = _hook.set(str(hook))
    try:
        yield
    finally:
        _hook.reset(token)


def current_phase() -> str:
    return _hook.get()


class _Current:
    __slots__ = ("seq", "name", "hook", "t0", "timeout")

    def __init__(self, seq: int, name: str, hook: str, t0: float, timeout: Optional[float]) -> None:
        self.seq, self.name, self.hook, self.t0, self.timeout = seq, name, hook, t0, timeout


class Watchdog:
    """Deadline for every collective of one communicator, and the status side channel (see the module doc).

    ``abort(code)`` must end the whole job (``MPI_Abort`` or ``os._exit``); ``abort_how`` names it in the message.
    Call ``connect(allgather_bytes)`` once on every rank, with a raw allgather of fixed-size byte rows.
    """

    def __init__(self, rank: int, size: int, backend: str, abort: Callable[[int], None], abort_how: str) -> None:
        self.rank, self.size, self.backend = rank, size, backend
        self._abort, self._abort_how = abort, abort_how
        self.seq = 0
        self._current: Optional[_Current] = None
        self._last: Optional[Tuple[int, str, str]] = None
        self._exiting = False
        self._peers: Dict[int, Tuple[str, int]] = {}
        self._host = socket.gethostname()
        self._stop = threading.Event()
        self._expired = False
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("", 0))
        self._server.listen(16)
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._serve, name="iteravg-watchdog-status", daemon=True).start()
        threading.Thread(target=self._monitor, name="iteravg-watchdog", daemon=True).start()
        import atexit

        atexit.register(self._mark_exiting)

    # -- bracketing collectives (hot path: keep it to a few attribute writes) --------------------
    def begin(self, name: str) -> None:
        self.seq += 1
        self._current = _Current(self.seq, name, _hook.get(), time.monotonic(), get_timeout())

    def end(self) -> None:
        cur = self._current
        if cur is not None:
            self._last = (cur.seq, cur.name, cur.hook)
        self._current = None

    def connect(self, allgather: Callable[[bytes], List[bytes]]) -> None:
        """Exchange the status sockets' addresses (one small allgather, itself under the deadline)."""
        row = f"{self._host} {self.port}".encode()[:ADDRESS_BYTES].ljust(ADDRESS_BYTES, b"\0")
        self.begin("iteravg.watchdog.hello")
        try:
            rows = allgather(row)
        finally:
            self.end()
        for r, raw in enumerate(rows):
            host, port = raw.rstrip(b"\0").decode().rsplit(" ", 1)
            self._peers[r] = ("127.0.0.1" if host == self._host else host, int(port))

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._server.close()

    # -- status side channel ---------------------------------------------------------------------
    def status(self) -> Dict[str, object]:
        cur = self._current
        return dict(
            rank=self.rank, seq=self.seq, exiting=self._exiting,
            current=None if cur is None else [cur.seq, cur.name, cur.hook, round(time.monotonic() - cur.t0, 1)],
            last=None if self._last is None else list(self._last),
        )

    def _mark_exiting(self) -> None:
        self._exiting = True

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                conn.settimeout(2.0)
                if conn.recv(16).startswith(b"status"):
                    conn.sendall(json.dumps(self.status()).encode() + b"\n")

    def _ask(self, r: int) -> Optional[dict]:
        host, port = self._peers[r]
        try:
            with socket.create_connection((host, port), timeout=_QUERY_SECONDS) as s:
                s.settimeout(_QUERY_SECONDS)
                s.sendall(b"status\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            return json.loads(data.decode())
        except (OSError, ValueError):
            return None

    # -- the deadline ----------------------------------------------------------------------------
    def _monitor(self) -> None:
        while not self._stop.is_set():
            cur = self._current
            timeout = cur.timeout if cur is not None else None
            self._stop.wait(1.0 if timeout is None else min(1.0, max(0.05, timeout / 20)))
            cur = self._current
            if cur is not None and cur.timeout is not None and time.monotonic() - cur.t0 > cur.timeout:
                self._expire(cur)
                return

    def report(self, cur: _Current) -> str:
        """The message a stuck rank prints: what it waits for, since when, and where every peer is."""
        waited = time.monotonic() - cur.t0
        lines = [
            f"iteravg watchdog: rank {self.rank} of {self.size} ({self.backend}) waited {waited:.1f} s in collective "
            f"{cur.name!r} (#{cur.seq} on this rank) from hook {cur.hook!r}, past the deadline of {cur.timeout:g} s "
            f"({ENV_TIMEOUT})."
        ]
        peers = [r for r in sorted(self._peers) if r != self.rank]
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(peers)))) as pool:
            answers = dict(zip(peers, pool.map(self._ask, peers)))
        missing: List[int] = []
        details: List[str] = []
        for r in peers:
            st = answers.get(r)
            if st is None:
                missing.append(r)
                details.append(f"  rank {r}: did not answer (dead, unreachable, or its process is frozen)")
                continue
            pc = st.get("current")
            if pc and pc[0] == cur.seq and pc[1] == cur.name:
                details.append(f"  rank {r}: arrived (waiting in the same collective for {pc[3]} s)")
                continue
            missing.append(r)
            if pc:
                details.append(f"  rank {r}: inside another collective #{pc[0]} {pc[1]!r} from hook {pc[2]!r} "
                               f"(for {pc[3]} s) -- the ranks issued different collectives")
            else:
                last = st.get("last")
                where = "exiting (its program ended)" if st.get("exiting") else "not inside any collective"
                done = (f"; completed {st.get('seq')} collectives, the last #{last[0]} {last[1]!r} from hook "
                        f"{last[2]!r}" if last else "; completed none")
                details.append(f"  rank {r}: {where}{done}")
        if not self._peers:
            lines.append("  (peers unknown: the watchdog's address exchange itself did not complete)")
        else:
            lines.append(f"  ranks that did not arrive: {missing if missing else 'none found (it may have just ended)'}")
        lines += details
        lines.append(
            "  Every rank must issue the same collectives in the same order: a rank that skips one (a save() or "
            "validation on rank 0 only, a different number of batches), is stuck, or died leaves the others waiting. "
            f"Raise {ENV_TIMEOUT} if a rank legitimately needs longer. Ending the whole job ({self._abort_how})."
        )
        return "\n".join(lines)

    def _expire(self, cur: _Current) -> None:
        self._expired = True
        try:
            message = self.report(cur)
        except Exception as exc:  # noqa: BLE001 -- the job must end even if the report fails
            message = (f"iteravg watchdog: rank {self.rank} waited past the deadline in collective {cur.name!r} "
                       f"(#{cur.seq}) from hook {cur.hook!r} ({cur.timeout:g} s); peer report failed: {exc}")
        with contextlib.suppress(Exception):
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        # If the abort itself hangs, leave anyway.
        threading.Timer(15.0, os._exit, args=(EXIT_CODE,)).start()
        self._abort(EXIT_CODE)
        os._exit(EXIT_CODE)


_installed: List[bool] = []


def install_abort_on_exception(abort: Callable[[int], None], rank: int, size: int, how: str) -> None:
    """Wrap ``sys.excepthook``: after the traceback, end the whole job (as ``python -m mpi4py`` does).

    Without it, an uncaught exception on one mpi4py rank leaves the others waiting in their next collective
    (and the dying rank waiting in ``MPI_Finalize``).
    """
    if _installed:
        return
    _installed.append(True)
    previous = sys.excepthook

    def hook(exc_type, exc, tb):  # type: ignore[no-untyped-def]
        try:
            previous(exc_type, exc, tb)
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.write(f"iteravg: uncaught {exc_type.__name__} on rank {rank} of {size}; ending the whole "
                                 f"job ({how}) so the other ranks do not wait for it\n")
                sys.stderr.flush()
            abort(1)

    sys.excepthook = hook
