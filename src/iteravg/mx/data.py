"""Data for ``iteravg train``: an embedded default data set, or the user's CSV.

Default: scikit-learn's bundled *diabetes* regression data (442 patients, 10 features, disease progression
after one year), read from the installed package -- no network at run time. Features and target are
standardised with training-set statistics; the split is fixed (seed 0): 60 % train, 20 % validation,
20 % test. Small batches and a high learning rate make SGD's last iterate noisy on it, which is exactly
where iterate averaging pays off.

``--data PATH``: a CSV file (UTF-8, comma-separated) with a header row and only numeric columns, e.g.::

    age,bmi,bp,target
    0.038,0.061,0.021,151
    -0.001,-0.051,-0.026,75

The column named ``target`` (or, if there is none, the last column) is the regression target; every other
column is a feature. Empty lines are skipped; every other row must have as many fields as the header, and
every field must parse as a finite number (no missing values). At least 10 rows. Rows are split 60/20/20 like
the default data (seed 0), features and target standardised with training-set statistics; reported MSEs are
in standardised target units. A missing/unreadable file or non-numeric data is an error (exit 2).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

Split = Tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split

    @property
    def num_features(self) -> int:
        return int(self.train[0].shape[1])


def load(path: Optional[str] = None) -> Dataset:
    if path is None:
        from sklearn.datasets import load_diabetes  # noqa: WPS433 -- bundled with scikit-learn

        d = load_diabetes()
        return _split("diabetes (scikit-learn)", np.asarray(d.data, np.float64), np.asarray(d.target, np.float64))
    return _split(Path(path).name, *_read_csv(Path(path)))


def _read_csv(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise ValueError(f"--data: cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise ValueError(f"--data: {path} is not a UTF-8 text (CSV) file") from None
    except csv.Error as exc:
        raise ValueError(f"--data: {path} is not a valid CSV file: {exc}") from None
    if len(rows) < 2:
        raise ValueError(f"--data: {path} needs a header row and at least one data row")
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if r]
    if not body:
        raise ValueError(f"--data: {path} needs a header row and at least one data row")
    if len(header) < 2:
        raise ValueError(f"--data: {path} needs at least one feature column and a target column")
    for lineno, r in enumerate(rows[1:], start=2):
        if r and len(r) != len(header):
            raise ValueError(f"--data: line {lineno} of {path} has {len(r)} columns, the header has {len(header)}")
    try:
        values = np.array([[float(v) for v in r] for r in body], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"--data: {path} must contain only numeric values ({exc})") from None
    if not np.isfinite(values).all():
        raise ValueError(f"--data: {path} contains NaN or infinite values")
    t = header.index("target") if "target" in header else len(header) - 1
    return np.delete(values, t, axis=1), values[:, t]


def _split(name: str, x: np.ndarray, y: np.ndarray) -> Dataset:
    n = len(y)
    if n < 10:
        raise ValueError(f"--data: need at least 10 rows, got {n}")
    order = np.random.RandomState(0).permutation(n)
    a, b = int(0.6 * n), int(0.8 * n)
    tr, va, te = order[:a], order[a:b], order[b:]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    sd[sd == 0] = 1.0
    ym, ys = y[tr].mean(), y[tr].std() or 1.0

    def part(idx: np.ndarray) -> Split:
        return ((x[idx] - mu) / sd).astype(np.float32), ((y[idx] - ym) / ys).astype(np.float32).reshape(-1, 1)

    return Dataset(name, part(tr), part(va), part(te))
