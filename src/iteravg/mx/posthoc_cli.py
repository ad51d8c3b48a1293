"""``iteravg posthoc RUN``: every averaging start of an ``iteravg train --posthoc`` run, evaluated after training.

The run's snapshot holds the post-hoc sums (``iteravg.core.posthoc``); for every start epoch it kept, the uniform
average from that epoch's end on is rebuilt, loaded into the run's network (rebuilt from ``report.json``'s
configuration) and evaluated on the run's validation split -- the MSE on standardised targets ``iteravg train``
reports. Rank 0 of a training job is not needed: this runs on one process, after training.

Output: a table (start epoch, iterates averaged, validation MSE; the schedule's own start and the best one marked),
``posthoc.csv`` and ``posthoc.png`` in the run directory; ``--json`` prints
``{"schedule_start", "best_start", "rows": [{"start_epoch", "iterates", "val_mse"}, ...]}`` instead of the table.
``--export START OUT`` writes the average from ``START`` on as a snapshot (``averaged.safetensors``,
``averaged.params``) into the checkpoint directory ``OUT`` instead of evaluating.

The validation split chose the best start, so its validation MSE is optimistic; judge the chosen model on held-out
data (the run's test split) before trusting the difference.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .cli import EXIT_VERIFY_FAILED, checkpoint_dir_of, usage_error

PROG = "iteravg posthoc"
CSV_COLUMNS = ("start_epoch", "iterates", "val_mse", "note")


def posthoc(args: argparse.Namespace) -> int:
    """Run ``iteravg posthoc``; exit 0, 1 (a checkpoint or the evaluation failed) or 2 (usage)."""
    from iteravg.checkpoint import CheckpointError
    from iteravg.core.posthoc import read_run

    path = Path(args.run_dir)
    if not path.exists():
        return usage_error(PROG, f"{path} does not exist (give the run directory of an `iteravg train --posthoc` run)")
    export_start: Optional[int] = None
    if args.export:
        try:
            export_start = int(args.export[0])
        except ValueError:
            return usage_error(PROG, f"--export START must be an epoch number, got {args.export[0]!r}")
    try:
        run = read_run(checkpoint_dir_of(path))
    except CheckpointError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    if export_start is not None:
        return _export(run, export_start, Path(args.export[1]))
    report_path = path / "report.json"
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        config = report["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return usage_error(PROG, f"{report_path} is missing or unreadable: evaluating needs the run directory of a "
                                 "finished `iteravg train --posthoc` run (its report.json names the data and the model)")
    try:
        rows = evaluate_starts(run, config)
    except (CheckpointError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    schedule_start = run.schedule_start
    best = min(rows, key=lambda r: r["val_mse"])["start_epoch"] if rows else None
    write_csv(path, rows, schedule_start, best)
    plot(path, rows, schedule_start, best, title=f"{path.name}: post-hoc averaging starts "
                                                 f"({config.get('strategy', '?')}, {run.epochs} epochs)")
    if args.json:
        print(json.dumps({"schedule_start": schedule_start, "best_start": best, "rows": rows}, indent=1))
    else:
        print(table(rows, schedule_start, best, schedule=run.schedule))
        print(f"wrote {path / 'posthoc.csv'} and {path / 'posthoc.png'}")
    return 0


def evaluate_starts(run: Any, config: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per start: the average loaded into the run's network, evaluated on its validation split."""
    import mxnet as mx

    from iteravg.core.records import first_layout_difference, flatten_tensors
    from iteravg.mx import data
    from iteravg.mx.binding import ModelBinding
    from iteravg.mx.cli import make_net
    from iteravg.mx.train import evaluate

    ds = data.load(config.get("data"))
    net = make_net(ds.num_features, int(config["hidden"]), int(config["seed"]))
    binding = ModelBinding(net)
    if binding.layout.describe() != run.layout.describe():
        raise ValueError(f"the run's checkpoint is for another model than its report.json describes: "
                         f"{first_layout_difference(run.layout.describe(), binding.layout.describe())}")
    loss_fn = mx.gluon.loss.L2Loss()  # 0.5 * squared error, as in iteravg train: doubled below
    rows = []
    for start, iterates in run.candidates():
        binding.write(flatten_tensors(binding.layout, run.average(start), f"the post-hoc average from epoch {start}"))
        s, c = evaluate(net, loss_fn, ds.val)
        rows.append({"start_epoch": int(start), "iterates": int(iterates), "val_mse": 2.0 * s / c})
    return rows


def _note(start: int, schedule_start: Optional[int], best: Optional[int]) -> str:
    notes = []
    if start == schedule_start:
        notes.append("schedule's start")
    if start == best:
        notes.append("best")
    return ", ".join(notes)


def table(rows: List[Dict[str, Any]], schedule_start: Optional[int], best: Optional[int],
          schedule: Optional[Dict[str, Any]] = None) -> str:
    """The rows, the schedule's start and the best one marked, and one line comparing them."""
    lines = ["post-hoc averages: validation MSE on standardised targets (lower is better)",
             f"{'start epoch':>11}  {'iterates':>9}  {'val MSE':>9}"]
    by_start = {r["start_epoch"]: r for r in rows}
    for r in rows:
        mark = _note(r["start_epoch"], schedule_start, best)
        lines.append(f"{r['start_epoch']:>11}  {r['iterates']:>9}  {r['val_mse']:>9.5f}" + (f"  <- {mark}" if mark else ""))
    if best is not None:
        b = by_start[best]
        what = "every iterate from the first batch" if best == 0 else f"from epoch {best}'s end on"
        line = f"best start: epoch {best} ({what}, {b['iterates']} iterates), val MSE {b['val_mse']:.5f}"
        if schedule_start in by_start and schedule_start != best:
            s = by_start[schedule_start]
            line += f"; the schedule's start (epoch {schedule_start}) scored {s['val_mse']:.5f}"
        elif schedule_start is None:
            line += "; the schedule never started averaging"
        elif schedule_start not in by_start:
            line += f"; the schedule's start (epoch {schedule_start}) is no longer kept (--posthoc-keep)"
        lines.append(line)
    eta = (schedule or {}).get("eta", 0)
    if eta:
        lines.append(f"note: the run averaged with eta={eta:g}; post-hoc averages are uniform (eta=0), so the "
                     "schedule's row is not its averaged model")
    lines.append("note: the best start is chosen on the validation data; check it on held-out data before trusting "
                 "the difference")
    return "\n".join(lines)


def write_csv(run_dir: Path, rows: List[Dict[str, Any]], schedule_start: Optional[int], best: Optional[int]) -> Path:
    from iteravg.checkpoint import atomic_write

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([r["start_epoch"], r["iterates"], repr(float(r["val_mse"])),
                    _note(r["start_epoch"], schedule_start, best)])
    path = run_dir / "posthoc.csv"
    atomic_write(path, buf.getvalue().encode())
    return path


def plot(run_dir: Path, rows: List[Dict[str, Any]], schedule_start: Optional[int], best: Optional[int],
         title: str) -> Path:
    """``posthoc.png``: validation MSE against the start epoch, the schedule's start and the best one marked."""
    import matplotlib  # noqa: WPS433

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: WPS433
    from matplotlib.ticker import MaxNLocator  # noqa: WPS433

    from iteravg.mx.report import UNITS, save_png

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100, layout="constrained")
    xs = [r["start_epoch"] for r in rows]
    ys = [r["val_mse"] for r in rows]
    ax.plot(xs, ys, color="C1", marker="o" if len(xs) <= 60 else None, markersize=4, linewidth=1.5,
            label="post-hoc average from that epoch on")
    by_start = {r["start_epoch"]: r for r in rows}
    if schedule_start in by_start:
        ax.axvline(schedule_start, color="C3", linestyle="--", linewidth=1,
                   label=f"the schedule's start (epoch {schedule_start}): {by_start[schedule_start]['val_mse']:.4f}")
    if best is not None:
        ax.plot([best], [by_start[best]["val_mse"]], marker="*", markersize=14, color="C2", linestyle="none",
                label=f"best start (epoch {best}): {by_start[best]['val_mse']:.4f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("averaging starts after epoch (0: from the first batch)")
    ax.set_ylabel(f"validation {UNITS}")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    return save_png(fig, run_dir / "posthoc.png")


def _export(run: Any, start: int, out: Path) -> int:
    from iteravg.core.posthoc import export_average
    from iteravg.mx.checkpoint import PARAMS_FILE, params_writer

    known = dict(run.candidates())
    if start not in known:
        return usage_error(PROG, f"--export {start}: no post-hoc average starts there; the starts kept are "
                                 f"{sorted(known)}")
    try:
        snap = export_average(run, start, out, extra_files=lambda avg: {PARAMS_FILE: params_writer(avg)})
    except OSError as exc:
        print(f"{PROG}: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    print(f"wrote {snap}: the average of {known[start]} iterates from epoch {start}'s end on; "
          f"net.load_parameters('{out / PARAMS_FILE}') loads it, `iteravg inspect {out}` verifies it")
    return 0
