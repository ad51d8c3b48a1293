"""What a person wants at the end of ``iteravg train``: a table, ``report.json``, ``val_loss.png`` and
``val_loss.csv`` -- all showing what averaging bought, in one unit.

The unit everywhere is the **mean squared error on standardised targets** (the data's targets are scaled to
mean 0 and variance 1 with training-set statistics, so predicting the training mean scores about 1.0). The
training loop's loss is gluon's ``L2Loss``, which is *half* the squared error; the CLI converts before anything
reaches this module, so the plot, the CSV and the table agree number for number.

Per-epoch rows (``history`` in ``report.json``, written by the CLI's per-epoch callback):

* ``epoch`` (1-based), ``train_loss`` (L2Loss, i.e. MSE/2, mean over the epoch's batches);
* ``val_mse_last`` -- validation MSE of the training weights (the last iterate) at the end of the epoch;
* ``val_mse_avg`` -- validation MSE of the averaged model at the end of the epoch (absent/``None`` before
  averaging started), the model a checkpoint of that epoch holds;
* ``iterates_averaged`` -- ``average_counter`` at the end of the epoch;
* ``resumed`` -- on the first epoch after a ``--resume``: ``{"after_epoch", "world_size", "was_world_size",
  "val_mse_last", "val_mse_avg"}`` (the values of the resumed epoch, re-evaluated from the checkpoint).

Rows written by older versions (no ``val_mse_*``) fall back to ``2 * val_loss`` (validation ran on the
averaged weights once averaging had started). Written by rank 0 only, each file atomically.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..checkpoint import atomic_write

UNITS = "MSE on standardised targets"
CSV_COLUMNS = ("epoch", "train_mse", "val_mse_last_iterate", "val_mse_averaged", "iterates_averaged", "note")


@dataclass
class Resume:
    after_epoch: int
    world_size: Optional[int] = None
    was_world_size: Optional[int] = None

    def label(self) -> str:
        ranks = ""
        if self.world_size is not None and self.was_world_size not in (None, self.world_size):
            ranks = f" ({self.was_world_size} \u2192 {self.world_size} ranks)"
        elif self.world_size is not None:
            ranks = f" ({self.world_size} rank{'s' if self.world_size != 1 else ''})"
        return f"resumed after epoch {self.after_epoch}{ranks}"


@dataclass
class Curves:
    """The per-epoch data of the plot and of ``val_loss.csv`` (NaN where a value does not exist)."""

    epochs: List[int] = field(default_factory=list)
    train_mse: List[float] = field(default_factory=list)
    last: List[float] = field(default_factory=list)
    averaged: List[float] = field(default_factory=list)
    iterates: List[Optional[int]] = field(default_factory=list)
    trigger_epoch: Optional[int] = None
    resumes: List[Resume] = field(default_factory=list)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def curves(history: List[Dict[str, Any]], trigger_epoch: Optional[int]) -> Curves:
    """Turn the run's ``history`` rows into plot/CSV data (see the module docstring for the row keys)."""
    out = Curves(trigger_epoch=trigger_epoch)
    fill: Dict[int, Dict[str, Any]] = {}  # epoch -> values re-evaluated at a resume
    for row in history:
        if isinstance(row.get("resumed"), dict):
            r = row["resumed"]
            out.resumes.append(Resume(int(r["after_epoch"]), r.get("world_size"), r.get("was_world_size")))
            fill[int(r["after_epoch"])] = r
    for row in history:
        e = int(row["epoch"])
        extra = fill.get(e, {})
        if "val_mse_last" in row or "val_mse_last" in extra:
            last = _num(row.get("val_mse_last", extra.get("val_mse_last")))
            avg = _num(row.get("val_mse_avg", extra.get("val_mse_avg")))
        else:  # older history: validation ran on the averaged weights once averaging had started
            on_avg = bool(row.get("val_on_average"))
            v = 2.0 * _num(row.get("val_loss"))
            last, avg = (float("nan"), v) if on_avg else (v, float("nan"))
        out.epochs.append(e)
        out.train_mse.append(2.0 * _num(row.get("train_loss")))
        out.last.append(last)
        out.averaged.append(avg)
        out.iterates.append(row.get("iterates_averaged"))
    return out


def write_csv(run_dir: Path, c: Curves) -> Path:
    """``val_loss.csv``: the plot's data, one row per epoch, empty cells where a value does not exist."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    resumed = {r.after_epoch: r.label() for r in c.resumes}
    for i, e in enumerate(c.epochs):
        notes = []
        if c.trigger_epoch is not None and e == max(c.trigger_epoch, 1):
            notes.append(f"averaging starts (epoch {c.trigger_epoch})")
        if e in resumed:
            notes.append(resumed[e])
        w.writerow([e, _cell(c.train_mse[i]), _cell(c.last[i]), _cell(c.averaged[i]),
                    "" if c.iterates[i] is None else int(c.iterates[i]), "; ".join(notes)])
    path = run_dir / "val_loss.csv"
    atomic_write(path, buf.getvalue().encode())
    return path


def _cell(v: float) -> str:
    return "" if v != v else repr(float(v))


def figure(c: Curves, title: str) -> Any:
    """The matplotlib figure of ``val_loss.png`` (returned so tests can read its lines' data)."""
    import matplotlib  # noqa: WPS433 -- only rank 0 plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: WPS433
    from matplotlib.ticker import MaxNLocator  # noqa: WPS433

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100, layout="constrained")
    small = len(c.epochs) <= 25
    finals = [_final(c.last), _final(c.averaged)]
    ax.plot(c.epochs, c.last, color="C0", marker="o" if small else None, markersize=3, linewidth=1.5,
            label=f"last iterate{_fmt_final(finals[0])}", gid="last")
    if any(v == v for v in c.averaged):
        ax.plot(c.epochs, c.averaged, color="C1", marker="s" if small else None, markersize=6, linewidth=2,
                markerfacecolor="none", markeredgewidth=1.5,
                label=f"averaged model{_fmt_final(finals[1])}", gid="averaged")
    if c.trigger_epoch is not None:
        ax.axvline(c.trigger_epoch, color="C3", linestyle="--", linewidth=1,
                   label=f"averaging starts (epoch {c.trigger_epoch})"
                   if c.trigger_epoch > 0 else "averaging from the first batch")
    else:
        ax.plot([], [], " ", label="averaging never started")
    for r in c.resumes:
        ax.axvline(r.after_epoch, color="0.35", linestyle=":", linewidth=1.5, label=r.label())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    lo = 0 if c.trigger_epoch == 0 else min(c.epochs, default=1)
    ax.set_xlim(lo - 0.5, max(c.epochs, default=1) + 0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {UNITS}")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    return fig


def _final(values: List[float]) -> Optional[float]:
    return values[-1] if values and values[-1] == values[-1] else None


def _fmt_final(v: Optional[float]) -> str:
    return "" if v is None else f" (final {v:.4f})"


def plot_losses(run_dir: Path, c: Curves, title: str) -> Path:
    """Write ``val_loss.png`` (atomically)."""
    return save_png(figure(c, title), run_dir / "val_loss.png")


def save_png(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (a reader never sees half a plot), then free it."""
    import matplotlib.pyplot as plt  # noqa: WPS433

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def table(metrics: Dict[str, Dict[str, float]], *, trigger_epoch: Optional[int] = None, average_counter: int = 0,
          epochs_done: Optional[int] = None, more_averaging: str = "") -> str:
    """Held-out MSE of the last iterate vs the averaged model, the units, and what the average holds.

    ``metrics``: ``{"last iterate": {"test_mse": .., "val_mse": ..}, "averaged": {...}}``. A last line hints
    (suggesting ``more_averaging``) when the average holds too few iterates to differ from the last iterate.
    """
    names = [n for n in ("test_mse", "val_mse") if any(n in row for row in metrics.values())]
    names += sorted({k for row in metrics.values() for k in row} - set(names))
    heads = {"test_mse": "test MSE", "val_mse": "val MSE"}
    lines = [f"held-out {UNITS} (about 1.0 = predicting the mean; lower is better)",
             f"{'model':<14}" + "".join(f"{heads.get(n, n):>12}" for n in names)]
    for model, row in metrics.items():
        lines.append(f"{model:<14}" + "".join(f"{row.get(n, float('nan')):>12.5f}" for n in names))
    of = f" of {epochs_done}" if epochs_done is not None else ""
    if trigger_epoch is None:
        lines.append(f"averaging never started ({epochs_done} epochs): the averaged model does not exist")
        if more_averaging:
            lines.append(f"hint: to average, {more_averaging}")
        return "\n".join(lines)
    when = "from the first batch" if trigger_epoch == 0 else f"after epoch {trigger_epoch}{of}"
    lines.append(f"averaged model: {average_counter} iterate{'s' if average_counter != 1 else ''} averaged, "
                 f"averaging started {when}")
    last, avg = metrics.get("last iterate", {}), metrics.get("averaged")
    same = avg is not None and all(avg.get(n) == last.get(n) for n in names)
    if average_counter <= 1 or same:
        what = ("only the last iterate, so both rows are the same" if average_counter <= 1
                else f"only {average_counter} iterates, too few to differ from the last iterate")
        lines.append(f"hint: the average holds {what}" + (f"; to average more, {more_averaging}" if more_averaging else ""))
    return "\n".join(lines)


def write_report(run_dir: Path, report: Dict[str, Any]) -> Path:
    path = run_dir / "report.json"
    atomic_write(path, (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
    return path
