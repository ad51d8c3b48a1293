"""A rank that leaves a multi-rank job early ends the whole job in seconds, with its own exit code.

Why: under ``mpirun`` + mpi4py a rank that calls ``sys.exit(1)`` between collectives waits in ``MPI_Finalize`` for
ranks that wait in their next collective for it: the job hung until the collective deadline and then exited 124,
hiding the original code. An exception on a non-main thread was not noticed at all. ``python -m mpi4py`` solves
part of this for scripts it starts; iteravg cannot wrap the user's ``__main__``, so it hooks the process instead,
once, when the first multi-rank communicator creates its ``Watchdog``:

* ``sys.excepthook``: an uncaught exception on the main thread prints its traceback, then ends the whole job with
  exit code 1 (``MPI_Abort`` under mpi4py, ``os._exit`` under launchers that stop the rest themselves).
* ``threading.excepthook``: the same for an uncaught exception on any other thread (a data-loading thread dying
  would otherwise leave its rank waiting forever).
* ``sys.exit(n)`` is recorded (Python gives exit handlers no other way to learn the code); at exit, a rank whose
  code is not 0 ends the whole job with that code, so the launcher reports it -- unless the ranks had just agreed to
  end (``mark_orderly_exit``: ``collectives.finish``'s barrier, or an error every rank raises alike), or every peer
  is leaving too within ``watchdog.LEAVE_WAIT_S`` seconds (all ranks exiting on the same error).
* At exit without such an agreement, the rank also sends every peer an authenticated *bye* notice (its code and
  last collective) over the watchdog's side channel, then closes it: a peer blocked in a collective this rank will
  never join ends the job at once instead of at the deadline (``watchdog.py``).

``os._exit`` and SIGKILL run no Python code: the launchers notice those themselves (measured in
``docs/reliability.md``), and the watchdog sees the closed side channel.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import sys
import threading
from typing import Any, List, Optional, Protocol

__all__ = ["register", "mark_orderly_exit", "requested_exit_code", "exit_code_of"]


class _Leaver(Protocol):
    rank: int
    size: int

    def leaving(self, code: Optional[int], orderly: bool) -> bool: ...

    def end_job(self, code: int, message: str, diagnose: bool = False) -> None: ...

    def orderly(self) -> bool: ...

    def mark_orderly(self) -> None: ...


_registered: List[_Leaver] = []
_requested: List[Any] = []  # the argument of the last sys.exit() call
_installed: List[bool] = []
_original_exit = sys.exit


def register(watchdog: _Leaver) -> None:
    """Cover ``watchdog``'s job with the process hooks (installed once per process)."""
    _registered.append(watchdog)
    if _installed:
        return
    _installed.append(True)
    sys.exit = _recording_exit
    previous_main, previous_thread = sys.excepthook, threading.excepthook

    def main_hook(exc_type, exc, tb):  # type: ignore[no-untyped-def]
        try:
            previous_main(exc_type, exc, tb)
        finally:
            _end_all(1, f"uncaught {exc_type.__name__}")

    def thread_hook(args):  # type: ignore[no-untyped-def]
        try:
            previous_thread(args)
        finally:
            # After the ranks agreed to end, a thread dying at shutdown is no reason to fail the job.
            if args.exc_type is not SystemExit and not all(wd.orderly() for wd in _registered):
                name = getattr(args.thread, "name", "?")
                _end_all(1, f"uncaught {args.exc_type.__name__} on thread {name!r}")

    sys.excepthook = main_hook
    threading.excepthook = thread_hook
    atexit.register(_at_exit)


def mark_orderly_exit() -> None:
    """Every rank knows the job ends here (after ``collectives.finish``, or an agreed error): an exit with a non-zero
    code right after this is not a lone rank leaving, so it neither aborts the job nor notifies peers. The mark
    lapses with the next collective."""
    for wd in _registered:
        wd.mark_orderly()


def requested_exit_code() -> Optional[int]:
    """The exit code of the last ``sys.exit`` call, as the interpreter will compute it (None: not called)."""
    return exit_code_of(_requested[-1]) if _requested else None


def exit_code_of(status: Any) -> int:
    """The process exit code ``sys.exit(status)`` gives."""
    if status is None:
        return 0
    if not isinstance(status, int):  # (bool is an int: sys.exit(False) exits 0)
        return 1  # sys.exit("message") prints the message and exits 1
    return int(status) & 0xFF


def _recording_exit(status: Any = None) -> None:
    _requested.append(status)
    del _requested[:-1]
    _original_exit(status)


def _end_all(code: int, what: str) -> None:
    for wd in list(_registered):
        if wd.size > 1:
            wd.end_job(code, f"iteravg: {what} on rank {wd.rank} of {wd.size}", diagnose=True)
            return


def _at_exit() -> None:
    code = requested_exit_code()
    for wd in list(_registered):
        if wd.size <= 1:
            continue
        end = False
        with contextlib.suppress(Exception):
            end = wd.leaving(code, wd.orderly())
        if end and code:
            with contextlib.suppress(Exception):
                logging.shutdown()
            wd.end_job(code, f"iteravg: rank {wd.rank} of {wd.size} exits with code {code} while the other ranks "
                             "go on")
            return
