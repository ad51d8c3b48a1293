"""How long the watchdog takes to ask N peers where they are, as N grows (one process, real sockets).

    python benchmarks/bench_watchdog.py          (also part of: make bench)

Each peer is a real ``StatusServer`` (authenticated challenge-response over TCP on 127.0.0.1), as every rank of a job
runs one. Prints, for N = 2 ... 512 peers: the time of one round of questions when every peer answers, and when every
peer is frozen (accepts the connection, never answers: the round then ends at its deadline, here 1.0 s) -- side by
side with the old sequential-in-batches-of-32 bound, (N / 32) x 3 s. The figure the docs quote: a round costs the
slowest answer, at most the deadline, whatever N.
"""

from __future__ import annotations

import socket
import statistics
import time

from iteravg.comm import sidechannel as sc

KEY = b"bench-key-0123456789abcdef012345"


def main() -> None:
    servers = [sc.StatusServer(KEY, r, lambda r=r: {"rank": r, "seq": 1, "current": None},
                               lambda r, d: None, "127.0.0.1") for r in range(512)]
    frozen = []
    for _ in range(512):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        frozen.append(s)
    print(f"{'peers':>6} {'all answer (ms)':>16} {'all frozen, 1.0 s deadline (s)':>32} {'old bound (s)':>14}")
    try:
        for n in (2, 8, 32, 128, 512):
            live = {r: ("127.0.0.1", servers[r].port) for r in range(n)}
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                answers = sc.query(live, KEY, 10_000, timeout=5.0)
                times.append(time.perf_counter() - t0)
                assert all(a.ok for a in answers.values()), "a live peer did not answer"
            dead = {r: ("127.0.0.1", frozen[r].getsockname()[1]) for r in range(n)}
            t0 = time.perf_counter()
            answers = sc.query(dead, KEY, 10_000, timeout=1.0)
            frozen_s = time.perf_counter() - t0
            assert all(a.error == "timeout" for a in answers.values())
            print(f"{n:>6} {1000 * statistics.median(times):>16.1f} {frozen_s:>32.2f} {max(1, n / 32) * 6:>14.0f}")
    finally:
        for srv in servers:
            srv.close()
        for s in frozen:
            s.close()


if __name__ == "__main__":
    main()
