"""What iteration averaging buys, on real series across seeds: ``make study`` runs this.

    python studies/averaging_study.py                      # the full study; writes docs/results.md + docs/study/
    python studies/averaging_study.py --report-only        # rewrite the page from the cached runs
    python studies/averaging_study.py --dry-run            # which runs are cached, which would run
    python studies/averaging_study.py --profile smoke --out /tmp/s --report /tmp/s/results.md --assets /tmp/s/img

Every training run (data set, estimator, method, ranks, seed) is cached as one JSON file under ``--out``/cells;
a rerun computes only the runs that are missing or whose settings changed, then regenerates the page, the plots
and the CSV from all of them. See ``studies/averaging/__init__.py`` for the modules.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.simplefilter("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from studies.averaging import grid, report, runner  # noqa: E402


def timing_note(records, jobs: int) -> str:
    """The training time the runs measured, per estimator family, and the wall-clock time it implies."""
    parts = []
    for family in dict.fromkeys(r["cell"]["family"] for r in records):
        one = sum(r["train_seconds"] for r in records if r["cell"]["family"] == family and r["cell"]["ranks"] == 1)
        many = sum(r["train_seconds"] for r in records if r["cell"]["family"] == family and r["cell"]["ranks"] > 1)
        parts.append(f"gluonts.{family}: {one / 60:.0f} min for the single-process runs and {many / 60:.0f} min for "
                     f"the 2-rank runs, about {(one / jobs + many) / 60:.0f} min of wall-clock time")
    return (f" Training time, measured per run while the study ran, and the wall-clock time it takes with {jobs} "
            f"single-process runs at a time and the 2-rank runs alone on the machine's cores: {'; '.join(parts)} "
            "(plus start-up and forecasting).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(grid.PROFILES), default="full")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "study", help="cache of the runs (default runs/study)")
    ap.add_argument("--report", type=Path, default=REPO / "docs" / "results.md")
    ap.add_argument("--assets", type=Path, default=REPO / "docs" / "study", help="plots and the CSV of every run")
    ap.add_argument("--jobs", type=int, default=2, help="single-process runs at a time (default 2: two cores)")
    ap.add_argument("--comm", choices=["mpi", "horovod"], default="mpi", help="communicator of the 2-rank runs")
    ap.add_argument("--datasets", nargs="*", default=[], help="only these data sets")
    ap.add_argument("--estimators", nargs="*", default=[], help="only these estimators (sff, mx.deepar, ...)")
    ap.add_argument("--seeds", type=int, default=0, help="only the first N seeds of each estimator")
    ap.add_argument("--seconds-per-cell", type=float, default=600.0, help="worker timeout per run")
    ap.add_argument("--report-only", action="store_true", help="no training: the page from the cached runs")
    ap.add_argument("--dry-run", action="store_true", help="say which runs are cached and which would run; no "
                    "training, no page")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")

    profile = grid.PROFILES[args.profile]
    cells = grid.select(profile, args.datasets, args.estimators, args.seeds)
    if not cells:
        ap.error("no runs selected")
    if args.dry_run:
        todo = runner.missing(profile, cells, args.out)
        print(f"[study] {len(cells) - len(todo)} of {len(cells)} cells cached in {args.out}/cells; {len(todo)} to run")
        for batch in runner.plan(todo, args.jobs):
            print(f"[study] would run {len(batch)} cells of {batch[0].group}: "
                  f"{', '.join(c.key for c in batch[:3])}{' ...' if len(batch) > 3 else ''}")
        return 0
    t0 = time.perf_counter()
    if not args.report_only:
        runner.run(profile, cells, args.out, jobs=args.jobs, comm=args.comm, seconds_per_cell=args.seconds_per_cell)
    records, lacking = [], []
    for cell in cells:
        record = runner.cached(profile, cell, args.out)
        (records.append(record) if record is not None else lacking.append(cell.key))
    if lacking:
        print(f"[study] {len(lacking)} runs have no result in {args.out}/cells: {', '.join(lacking[:10])} ...",
              file=sys.stderr)
        return 1
    full_default = args.profile == "full" and argv is None and len(sys.argv) == 1
    command = "make study" if full_default else "python " + " ".join(
        shlex.quote(a) for a in ["studies/averaging_study.py", *(sys.argv[1:] if argv is None else argv)])
    note = timing_note(records, args.jobs)
    try:
        cache = str(args.out.resolve().relative_to(REPO))
    except ValueError:
        cache = str(args.out)
    report.render(profile, records, args.report, args.assets, command, note, cache=cache)
    print(f"[study] {len(records)} runs; wrote {args.report} and {args.assets}/ in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
