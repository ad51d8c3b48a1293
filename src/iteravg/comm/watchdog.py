"""The collective watchdog: a collective some rank will never join ends the whole job, with a clear message.

Anchors: PyTorch's NCCL watchdog (a thread that times out stuck collectives and tears the job down), its
``TORCH_DISTRIBUTED_DEBUG=DETAIL`` mode (mismatched collectives reported at once), and Horovod's stall inspector
(names the ranks that did not submit a tensor).

How it works, per rank:

* Every collective of a multi-rank communicator is bracketed by ``begin(name)`` / ``end()``. ``begin`` records the
  collective's sequence number, its name, the *hook* it came from (``phase("on_epoch_end")``, a context variable
  the engine sets; default ``"unknown"``) and the deadline. This costs a few attribute writes, nothing on the wire,
  so the collectives themselves stay the blocking, full-speed MPI / Horovod / torch.distributed calls.
* A daemon *monitor* thread watches the current collective. Once it has waited ``FIRST_CHECK_S`` seconds, the
  rank **compares notes** with its peers every ``check_interval`` seconds (one parallel round of questions on the
  side channel, ``sidechannel.py``): if the wait is certain to last forever -- a peer has left the job, or every
  peer is blocked in a collective and some in a *different* one (another name, or another number held for at least
  ``STABLE_S`` seconds by both sides) -- the job ends at once. A peer that is merely slow (not inside any
  collective, or unreachable) never triggers this: it gets the full deadline.
* The **deadline** (``ITERAVG_COLLECTIVE_TIMEOUT`` seconds, default 300; ``0`` disables) ends the job in every
  other case.
* Either way the rank prints one message on stderr naming its collective and hook and, for every peer, whether it
  arrived, is inside another collective (which, from which hook), is not inside any, has exited (with which code,
  after which collective), or did not answer -- then ends the WHOLE job: ``MPI_Abort`` under mpi4py, ``os._exit``
  under launchers that stop the other ranks themselves (horovodrun, mpirun, torchrun). The exit code is
  ``EXIT_CODE`` (124, as coreutils ``timeout``), or the exit code of a peer that left with one.

Ranks that leave early, crash or raise are covered by ``liveness.py`` (installed by the first ``Watchdog``).

For a new communicator: create ``Watchdog(rank, size, name, abort, how)`` when ``size > 1`` (``abort(code)`` must
end the whole job), call ``connect(allgather_bytes)`` once on every rank with a raw allgather of equal-length byte
rows over the launcher's own collective, bracket every collective with ``begin(name)`` / ``end()``, and call
``stop()`` at shutdown. Deadlines, deadlock and exit detection, and the hooks then come with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from . import liveness
from .base import CommError
from .sidechannel import Answer, StatusServer, job_key, new_secret, query

__all__ = ["ENV_TIMEOUT", "ENV_DEADLOCK_CHECK", "DEFAULT_TIMEOUT", "EXIT_CODE", "Watchdog", "PeerView",
           "certain_deadlock", "phase", "current_phase", "set_timeout", "get_timeout", "install_abort_on_exception"]

ENV_TIMEOUT = "ITERAVG_COLLECTIVE_TIMEOUT"
#: ``0`` turns the early deadlock check off (the deadline still applies).
ENV_DEADLOCK_CHECK = "ITERAVG_DEADLOCK_CHECK"
DEFAULT_TIMEOUT = 300.0
EXIT_CODE = 124
ADDRESS_BYTES = 256
#: A collective waits this long before its rank first compares notes with its peers.
FIRST_CHECK_S = 2.0
#: Two ranks blocked in collectives of different numbers count only after both waited this long (a broadcast's
#: root may legitimately be one collective ahead for a moment).
STABLE_S = 2.0
#: One round of questions (all peers in parallel) while checking; the deadline report allows longer.
CHECK_QUERY_S = 1.5
REPORT_QUERY_S = 3.0
#: Seconds a leaving rank spends telling its peers (in parallel).
BYE_S = 0.5
#: Seconds a rank leaving with a non-zero code waits for its peers to be leaving too before it ends the job.
LEAVE_WAIT_S = 2.0
#: Seconds a rank whose failure follows a peer's exit waits for the launcher to report that exit first.
LAUNCHER_GRACE_S = 3.0
_ROW_TAG = "iteravg-watchdog-1"

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


def _deadlock_check_enabled() -> bool:
    return os.environ.get(ENV_DEADLOCK_CHECK, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def phase(hook: str) -> Iterator[None]:
    """Name the hook (``"on_epoch_end"``, ``"save"``, ...) that the collectives inside come from. Nested phases
    read outermost first (``"on_validation_epoch_start > sync"``): the user's hook and iteravg's step in it."""
    outer = _hook.get()
    hook = str(hook)
    token = _hook.set(hook if outer in ("unknown", hook) else f"{outer} > {hook}")
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


@dataclass
class PeerView:
    """What one peer was doing when asked. ``kind``: ``same`` (in this rank's collective), ``other`` (in another
    collective), ``idle`` (in none), ``gone`` (left the job), ``unknown`` (no authenticated answer)."""

    rank: int
    kind: str
    text: str
    seq: int = 0
    age: float = 0.0
    code: Optional[int] = None
    left_at: float = 0.0
    refused: bool = False  # its status channel refused the connection: its process is most likely gone


def certain_deadlock(views: Dict[int, PeerView], seq: int, age: float) -> bool:
    """Whether this rank's collective ``#seq`` (waited ``age`` s) can never complete, from its peers' views.

    Certain when a peer has left the job before joining it, or when every peer is blocked in a collective and at
    least one in another one: of the same number (different name: the ranks issued different collectives), or of
    another number with both sides waiting at least ``STABLE_S`` (so it is not a broadcast root one step ahead).
    A peer not inside any collective, or one that did not answer, is at worst slow: never certain.
    """
    if any(v.kind == "gone" for v in views.values()):
        return True
    if not views or any(v.kind in ("idle", "unknown") for v in views.values()):
        return False
    others = [v for v in views.values() if v.kind == "other"]
    return bool(others) and all(v.seq == seq or min(v.age, age) >= STABLE_S for v in others)


class Watchdog:
    """Deadline, deadlock and exit detection for every collective of one communicator (see the module doc).

    ``abort(code)`` must end the whole job (``MPI_Abort`` or ``os._exit``); ``abort_how`` names it in messages.
    Call ``connect(allgather)`` once on every rank, with a raw allgather of fixed-size byte rows.
    """

    def __init__(self, rank: int, size: int, backend: str, abort: Callable[[int], None], abort_how: str) -> None:
        self.rank, self.size, self.backend = rank, size, backend
        self._abort, self._abort_how = abort, abort_how
        self.seq = 0
        self._current: Optional[_Current] = None
        self._last: Optional[Tuple[int, str, str]] = None
        self._exiting = False
        self._orderly_at = -1  # self.seq when the ranks last agreed to end (liveness.mark_orderly_exit)
        self._peers: Dict[int, Tuple[str, int]] = {}
        self._key = b""
        self._server: Optional[StatusServer] = None
        self._gone: Dict[int, Dict[str, object]] = {}  # authenticated bye notices, by rank
        self._answered: set = set()  # peers that answered at least once: a refusal from them means gone
        self._host = socket.gethostname()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ending = threading.Lock()
        self._expired = False
        self.check_interval = 2.0 if size <= 64 else min(4.0, 2.0 + size / 256)
        threading.Thread(target=self._monitor, name="iteravg-watchdog", daemon=True).start()
        liveness.register(self)

    @property
    def port(self) -> Optional[int]:
        return None if self._server is None else self._server.port

    @property
    def server(self) -> Optional[StatusServer]:
        return self._server

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
        """Exchange the job's key and the status sockets' addresses (two small allgathers over the launcher's own
        collective, each under the deadline). The socket listens on 127.0.0.1 when every rank is on this host,
        else on every interface (peers on other hosts reach it by the host name the launcher uses)."""
        secret = new_secret()
        rows = self._exchange(allgather, f"{_ROW_TAG}\t{self._host}\t{secret.hex()}")
        hosts, secrets_ = [], []
        for r, text in enumerate(rows):
            parts = text.split("\t")
            if len(parts) != 3 or parts[0] != _ROW_TAG or len(parts[2]) != 64:
                raise CommError(f"rank {r} sent a watchdog address row of another format ({text[:40]!r}): every "
                                "rank must run the same iteravg version")
            hosts.append(parts[1])
            secrets_.append(bytes.fromhex(parts[2]))
        self._key = job_key(secrets_)
        one_host = all(h == self._host for h in hosts)
        self._server = StatusServer(self._key, self.rank, self.status, self._notice, "127.0.0.1" if one_host else "")
        ports = self._exchange(allgather, str(self._server.port))
        for r, (host, port) in enumerate(zip(hosts, ports)):
            self._peers[r] = (self._resolve("127.0.0.1" if host == self._host else host), int(port))

    def _exchange(self, allgather: Callable[[bytes], List[bytes]], text: str) -> List[str]:
        row = text.encode()[:ADDRESS_BYTES].ljust(ADDRESS_BYTES, b"\0")
        self.begin("iteravg.watchdog.hello")
        try:
            rows = allgather(row)
        finally:
            self.end()
        return [raw.rstrip(b"\0").decode("utf-8", "replace") for raw in rows]

    @staticmethod
    def _resolve(host: str) -> str:
        """Resolve once, now: the monitor must never block in a name lookup while the job is stuck."""
        try:
            return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        except (OSError, IndexError):
            return host

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._server is not None:
            self._server.close()

    # -- what this rank tells its peers ----------------------------------------------------------
    def status(self) -> Dict[str, object]:
        cur = self._current
        return dict(
            rank=self.rank, seq=self.seq, exiting=self._exiting,
            current=None if cur is None else [cur.seq, cur.name, cur.hook, round(time.monotonic() - cur.t0, 1)],
            last=None if self._last is None else list(self._last),
        )

    def _notice(self, rank: int, data: Dict[str, object]) -> None:
        if 0 <= rank < self.size and rank != self.rank:
            self._gone[rank] = dict(data, received=time.time())
            self._wake.set()

    # -- liveness (called by liveness.py) --------------------------------------------------------
    def mark_orderly(self) -> None:
        self._orderly_at = self.seq

    def orderly(self) -> bool:
        return self._orderly_at == self.seq

    def leaving(self, code: Optional[int], orderly: bool) -> bool:
        """This process is exiting: tell the peers (unless the ranks agreed to end here), close the channel, and say
        whether the whole job must end now (with ``code``).

        It must when the code is not 0 and the peers are not leaving too: some peer waits in a collective, or has
        not begun to exit within ``LEAVE_WAIT_S`` (every rank raising the same agreed error exits within
        milliseconds; a rank that still computes after that would otherwise run on until it next blocks)."""
        self._exiting = True
        if orderly or self._server is None or not self._peers:
            self.stop()
            return False
        bye = {"code": code, "last": None if self._last is None else list(self._last), "seq": self.seq,
               "at": time.time()}
        with contextlib.suppress(Exception):
            query(self._others(), self._key, self.rank, kind="bye", data=bye, timeout=BYE_S)
        end = bool(code) and not self._peers_leaving()
        self.stop()
        return end

    def _peers_leaving(self) -> bool:
        """Whether every peer is exiting or gone (asked until ``LEAVE_WAIT_S``); False as soon as one waits in a
        collective this rank never joined. A closed channel counts as gone here: at exit, nothing better is known."""
        ref = _Current(self.seq + 1, "", "", time.monotonic(), None)  # a collective nobody has begun
        give_up = time.monotonic() + LEAVE_WAIT_S
        while True:
            answers = query(self._others(), self._key, self.rank, timeout=CHECK_QUERY_S)
            views = [PeerView(r, "gone", "") if ans.error == "refused" else self._view(r, ans, ref)
                     for r, ans in answers.items()]
            if all(v.kind == "gone" for v in views):
                return True
            # A peer inside a collective this rank completed is only finishing it; one inside a later one waits.
            if any(v.kind in ("same", "other") and v.seq > self.seq for v in views) or time.monotonic() > give_up:
                return False
            time.sleep(0.1)

    def end_job(self, code: int, message: str, diagnose: bool = False) -> None:
        """Print ``message`` and end the whole job with ``code`` (once, whoever asks first). ``diagnose``: also say
        where this rank and every peer are (one parallel round of questions, ``CHECK_QUERY_S`` at most)."""
        if not self._ending.acquire(blocking=False):
            return
        lines = [f"{message}; ending the whole job ({self._abort_how}) so the other ranks do not wait for it"]
        views: Dict[int, PeerView] = {}
        if diagnose:
            with contextlib.suppress(Exception):
                more, views = self._where_everyone_is()
                lines += more
        dead = [v.rank for v in views.values() if v.kind == "gone" or v.refused]
        if dead:  # this failure most likely follows theirs: let the launcher report their exit (and code) first
            lines.append(f"  rank(s) {dead} left first: waiting {LAUNCHER_GRACE_S:g} s for the launcher to report "
                         "that before ending the job")
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()
        if dead:
            time.sleep(LAUNCHER_GRACE_S)
        threading.Timer(15.0, os._exit, args=(code,)).start()  # if the abort itself hangs, leave anyway
        self._abort(code)
        os._exit(code)

    def _where_everyone_is(self) -> Tuple[List[str], Dict[int, PeerView]]:
        cur, last = self._current, self._last
        if cur is not None:
            mine = f"inside #{cur.seq} {cur.name!r} from hook {cur.hook!r}"
        elif last is not None:
            mine = f"not inside any collective; the last #{last[0]} {last[1]!r} from hook {last[2]!r}"
            cur = _Current(last[0], last[1], last[2], time.monotonic(), None)
        else:
            mine = "no collective yet"
        lines = [f"  rank {self.rank} (this rank): {mine}"]
        views: Dict[int, PeerView] = {}
        if self._peers:
            ref = cur if cur is not None else _Current(0, "", "", time.monotonic(), None)
            views = self.observe(ref, CHECK_QUERY_S)
            lines += [f"  {v.text}" for v in views.values()]
        return lines, views

    # -- comparing notes -------------------------------------------------------------------------
    def _others(self) -> Dict[int, Tuple[str, int]]:
        return {r: a for r, a in self._peers.items() if r != self.rank}

    def observe(self, cur: _Current, timeout: float) -> Dict[int, PeerView]:
        """Ask every peer (in parallel) where it is, relative to this rank's collective ``cur``."""
        answers = query(self._others(), self._key, self.rank, timeout=timeout) if self._key else {}
        return {r: self._view(r, answers.get(r, Answer(error="timeout")), cur) for r in sorted(self._others())}

    def _view(self, r: int, ans: Answer, cur: _Current) -> PeerView:
        bye = self._gone.get(r)
        if bye is not None:
            return self._gone_view(r, bye, cur)
        if not ans.ok or ans.status is None:
            if ans.error == "refused" and r in self._answered:
                return PeerView(r, "gone", f"rank {r}: gone (its process exited or was killed: its status channel "
                                           "refuses connections)")
            why = {"refused": "refused the connection", "bad reply": "answered without the job's key"}.get(
                ans.error or "", "did not answer")
            return PeerView(r, "unknown", f"rank {r}: {why} (dead, unreachable, or its process is frozen)",
                            refused=ans.error == "refused")
        self._answered.add(r)
        st = ans.status
        try:
            pc = st.get("current")
            last = st.get("last")
            if st.get("exiting"):
                return self._gone_view(r, {"code": None, "last": last, "seq": st.get("seq")}, cur)
            if pc:
                seq, name, hook, age = int(pc[0]), str(pc[1]), str(pc[2]), float(pc[3])
                if seq == cur.seq and name == cur.name:
                    return PeerView(r, "same", f"rank {r}: arrived (waiting in the same collective for {age} s)",
                                    seq, age)
                return PeerView(r, "other", f"rank {r}: inside another collective #{seq} {name!r} from hook {hook!r} "
                                            f"(for {age} s) -- the ranks issued different collectives", seq, age)
            done = (f"; completed {st.get('seq')} collectives, the last #{last[0]} {last[1]!r} from hook {last[2]!r}"
                    if last else "; completed none")
            return PeerView(r, "idle", f"rank {r}: not inside any collective{done}", int(st.get("seq") or 0))
        except (TypeError, ValueError, IndexError, AttributeError):
            return PeerView(r, "unknown", f"rank {r}: answered with a status this iteravg cannot read")

    @staticmethod
    def _gone_view(r: int, bye: Dict[str, object], cur: _Current) -> PeerView:
        last = bye.get("last")
        code = bye.get("code")
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        try:
            last_seq = int(last[0]) if last else 0  # type: ignore[index]
            after = (f"after #{last[0]} {last[1]!r} from hook {last[2]!r}"  # type: ignore[index]
                     if last else "before any collective")
        except (TypeError, ValueError, IndexError, KeyError):
            last_seq, after = 0, "after an unknown collective"
        how = "exited" if code is None else f"exited with code {code}"
        if last_seq >= cur.seq:  # it took part in this collective before leaving: its part is done
            return PeerView(r, "same", f"rank {r}: {how} {after}, having joined this collective", last_seq)
        when = bye.get("at")
        return PeerView(r, "gone", f"rank {r}: {how} {after} -- it will never join this collective", last_seq,
                        code=code, left_at=float(when) if isinstance(when, (int, float)) else 0.0)

    # -- the monitor -------------------------------------------------------------------------------
    def _monitor(self) -> None:
        next_check, checked = 0.0, -1
        while not self._stop.is_set():
            cur = self._current
            tick = 1.0 if cur is None else 0.25
            if cur is not None and cur.timeout is not None:
                tick = min(tick, max(0.05, cur.timeout / 20))
            self._wake.wait(tick)
            self._wake.clear()
            cur = self._current
            if cur is None or self._stop.is_set():
                continue
            try:
                now = time.monotonic()
                age = now - cur.t0
                if cur.timeout is not None and age > cur.timeout:
                    self._expire(cur, None)
                    return
                gone_known = any(self._gone_view(r, b, cur).kind == "gone" for r, b in list(self._gone.items()))
                due = age >= FIRST_CHECK_S and (now >= next_check or checked != cur.seq)
                if self._peers and _deadlock_check_enabled() and (gone_known or due):
                    views = self.observe(cur, CHECK_QUERY_S)
                    if self._current is not cur:
                        continue  # it completed while we asked
                    if certain_deadlock(views, cur.seq, time.monotonic() - cur.t0):
                        self._expire(cur, views)
                        return
                    next_check, checked = time.monotonic() + self.check_interval, cur.seq
            except Exception:  # noqa: BLE001 -- never let the monitor die; the deadline still holds
                next_check = time.monotonic() + self.check_interval

    def report(self, cur: _Current, views: Optional[Dict[int, PeerView]] = None) -> str:
        """The message a stuck rank prints: what it waits for, since when, and where every peer is. ``views``
        given: the early (certain deadlock) report; else the deadline report (it asks the peers now)."""
        waited = time.monotonic() - cur.t0
        where = f"collective {cur.name!r} (#{cur.seq} on this rank) from hook {cur.hook!r}"
        if views is None:
            lines = [f"iteravg watchdog: rank {self.rank} of {self.size} ({self.backend}) waited {waited:.1f} s in "
                     f"{where}, past the deadline of {cur.timeout:g} s ({ENV_TIMEOUT})."]
            views = self.observe(cur, REPORT_QUERY_S) if self._peers else {}
        else:
            gone = [v.rank for v in views.values() if v.kind == "gone"]
            why = (f"rank(s) {gone} left the job before joining it" if gone else
                   "every rank is blocked and not all in the same collective")
            deadline = "no deadline" if cur.timeout is None else f"the {cur.timeout:g} s deadline ({ENV_TIMEOUT})"
            lines = [f"iteravg watchdog: rank {self.rank} of {self.size} ({self.backend}): certain deadlock in {where} "
                     f"after {waited:.1f} s: {why}. Ending the job now instead of waiting for {deadline}."]
        missing = [v.rank for v in views.values() if v.kind != "same"]
        if not self._peers:
            lines.append("  (peers unknown: the watchdog's address exchange itself did not complete)")
        else:
            found = missing if missing else "none found (it may have just ended)"
            lines.append(f"  ranks that did not arrive: {found}")
            lines.append(f"  rank {self.rank} (this rank): inside #{cur.seq} {cur.name!r} from hook {cur.hook!r} "
                         f"for {waited:.1f} s")
        lines += [f"  {v.text}" for v in views.values()]
        lines.append(
            "  Every rank must issue the same collectives in the same order: a rank that skips one (a save() or "
            "validation on rank 0 only, a different number of batches), is stuck, or died leaves the others waiting. "
            f"Raise {ENV_TIMEOUT} if a rank legitimately needs longer. Ending the whole job ({self._abort_how})."
        )
        return "\n".join(lines)

    def exit_code_for(self, views: Optional[Dict[int, PeerView]]) -> int:
        """The first failing peer's exit code (by the time it left), else ``EXIT_CODE``."""
        failed = sorted((v.left_at, v.rank, v.code) for v in (views or {}).values() if v.kind == "gone" and v.code)
        return int(failed[0][2]) if failed else EXIT_CODE

    def _expire(self, cur: _Current, views: Optional[Dict[int, PeerView]]) -> None:
        if not self._ending.acquire(blocking=False):
            return
        self._expired = True
        try:
            message = self.report(cur, views)
        except Exception as exc:  # noqa: BLE001 -- the job must end even if the report fails
            message = (f"iteravg watchdog: rank {self.rank} waited in collective {cur.name!r} (#{cur.seq}) from hook "
                       f"{cur.hook!r}; peer report failed: {exc}")
        with contextlib.suppress(Exception):
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        code = self.exit_code_for(views)
        threading.Timer(15.0, os._exit, args=(code,)).start()  # if the abort itself hangs, leave anyway
        self._abort(code)
        os._exit(code)


def install_abort_on_exception(abort: Callable[[int], None], rank: int, size: int, how: str) -> None:
    """Kept for communicators written against iteravg 0.2: a ``Watchdog`` now installs the exception hooks itself
    (``liveness.py``), for the main thread and every other thread."""
