"""What a person wants at the end of ``iteravg train``: a table, ``report.json`` and ``val_loss.png``.

Written by rank 0 only, each file atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..checkpoint import atomic_write


def table(metrics: Dict[str, Dict[str, float]]) -> str:
    """Held-out metrics of the last iterate vs the averaged model, as a fixed-width table."""
    names = sorted({k for row in metrics.values() for k in row})
    lines = [f"{'model':<14}" + "".join(f"{n:>14}" for n in names)]
    for model, row in metrics.items():
        lines.append(f"{model:<14}" + "".join(f"{row.get(n, float('nan')):>14.5f}" for n in names))
    return "\n".join(lines)


def write_report(run_dir: Path, report: Dict[str, Any]) -> Path:
    path = run_dir / "report.json"
    atomic_write(path, (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
    return path


def plot_losses(run_dir: Path, history: List[Dict[str, float]], trigger_epoch: Optional[int], title: str) -> Path:
    """Per-epoch validation (and training) loss with the start of averaging marked."""
    import matplotlib  # noqa: WPS433 -- only rank 0 plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: WPS433

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(epochs, [h["train_loss"] for h in history], label="training loss (last iterate)", color="0.6")
    if any("val_loss" in h for h in history):
        ax.plot(epochs, [h.get("val_loss", float("nan")) for h in history], label="validation loss (of the averaged model once averaging started)",
                color="C0",
                marker="o", markersize=3)
    if trigger_epoch is not None:
        ax.axvline(trigger_epoch, color="C3", linestyle="--", label=f"averaging starts (epoch {trigger_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = run_dir / "val_loss.png"
    atomic_write(path, buf.getvalue())
    return path
