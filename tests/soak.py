"""Soak: back-to-back ``horovodrun --gloo -np 3`` training runs must all exit 0.

Guards against the shutdown race (a rank leaving while another is still inside a collective kills the job
with "Horovod has been shut down"). Run by ``make soak`` and by tests/test_soak.py.

    python tests/soak.py [--runs 3] [--epochs 30] [--np 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import horovodrun, run  # noqa: E402


def soak(runs: int = 3, epochs: int = 30, np_: int = 3) -> list:
    results = []
    with tempfile.TemporaryDirectory(prefix="iteravg-soak-") as tmp:
        for i in range(runs):
            t = time.time()
            cmd = horovodrun(np_, ["-m", "iteravg", "train", "--epochs", str(epochs), "--no-progress",
                                   "--out", str(Path(tmp) / f"run{i}")], gloo=True)
            proc = run(cmd, timeout=600, check=False)
            results.append((proc.returncode, time.time() - t))
            print(f"soak run {i + 1}/{runs}: exit {proc.returncode} in {time.time() - t:.1f} s", flush=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n")
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--np", dest="np_", type=int, default=3)
    args = ap.parse_args()
    results = soak(args.runs, args.epochs, args.np_)
    ok = all(rc == 0 for rc, _ in results)
    print(f"{sum(rc == 0 for rc, _ in results)} passed, {sum(rc != 0 for rc, _ in results)} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
