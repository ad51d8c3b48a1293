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
in standardised target units.

Every problem is a ``ValueError`` whose message names the file, the line and the column, so the CLI can
print it as a one-line usage error (exit 2). Two mistakes are caught by name because they otherwise produce
confusing errors or, worse, silently wrong data: a file with **no header row** (its first row is all numbers;
reading it as a header would silently drop a data row) and a file separated by **semicolons or tabs**.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

Split = Tuple[np.ndarray, np.ndarray]
_OTHER_DELIMITERS = {";": "semicolons (;)", "\t": "tabs", "|": "vertical bars (|)"}


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
    """The default data set (``path=None``) or the CSV file at ``path``, split and standardised."""
    if path is None:
        from sklearn.datasets import load_diabetes  # noqa: WPS433 -- bundled with scikit-learn

        d = load_diabetes()
        return _split("diabetes (scikit-learn)", np.asarray(d.data, np.float64), np.asarray(d.target, np.float64))
    return _split(Path(path).name, *read_csv(Path(path)), where=str(path))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _delimiter_hint(path: Path, line: str) -> str:
    """A hint if ``line`` (no commas) looks separated by another character, else ``""``."""
    for delim, name in _OTHER_DELIMITERS.items():
        if delim in line:
            shown = "\\t" if delim == "\t" else delim
            return (f"it looks separated by {name}, but iteravg reads comma-separated files; convert it, e.g. "
                    f"tr '{shown}' ',' < {path.name} > {path.stem}-comma.csv (check for decimal commas first)")
    return ""


def read_csv(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(features, target) of a numeric CSV file with a header row; ``ValueError`` naming line and column."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except IsADirectoryError:
        raise ValueError(f"--data: {path} is a directory, not a CSV file") from None
    except OSError as exc:
        raise ValueError(f"--data: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ValueError(f"--data: {path} line {line} is not UTF-8 text; save the file as a UTF-8 CSV") from None
    rows: List[Tuple[int, List[str]]] = []  # (line number, fields) of the non-empty rows
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                rows.append((reader.line_num, fields))
    except csv.Error as exc:
        raise ValueError(f"--data: {path} line {reader.line_num}: not valid CSV ({exc})") from None
    if not rows:
        raise ValueError(f"--data: {path} is empty; it needs a header row and data rows")
    head_line, header = rows[0]
    if len(header) == 1:
        hint = _delimiter_hint(path, header[0])
        raise ValueError(f"--data: {path} line {head_line} has a single column"
                         + (f"; {hint}" if hint else "; it needs at least one feature column and a target column, "
                                                     "separated by commas"))
    header = [h.strip() for h in header]
    if all(_is_number(h) for h in header):
        raise ValueError(f"--data: {path} has no header row (line {head_line} is all numbers: "
                         f"{','.join(header[:4])}{',...' if len(header) > 4 else ''}); add a first line naming "
                         f"the columns, e.g. {','.join(f'x{i + 1}' for i in range(len(header) - 1))},target")
    for col, name in enumerate(header, start=1):
        if not name:
            raise ValueError(f"--data: {path} line {head_line}, column {col}: empty column name in the header")
    body = rows[1:]
    if not body:
        raise ValueError(f"--data: {path} has a header row (line {head_line}) but no data rows")
    values = np.empty((len(body), len(header)), dtype=np.float64)
    for i, (line, fields) in enumerate(body):
        if len(fields) != len(header):
            hint = _delimiter_hint(path, ",".join(fields)) if len(fields) == 1 else ""
            raise ValueError(f"--data: {path} line {line} has {len(fields)} field(s), the header (line {head_line}) "
                             f"has {len(header)}" + (f"; {hint}" if hint else ""))
        for col, field in enumerate(fields):
            where = f"--data: {path} line {line}, column {col + 1} ({header[col]!r})"
            if not field.strip():
                raise ValueError(f"{where} is empty: missing values are not supported")
            try:
                v = float(field)
            except ValueError:
                raise ValueError(f"{where}: {field.strip()!r} is not a number") from None
            if not np.isfinite(v):
                raise ValueError(f"{where}: {field.strip()!r} is not a finite number")
            values[i, col] = v
    t = header.index("target") if "target" in header else len(header) - 1
    return np.delete(values, t, axis=1), values[:, t]


def _split(name: str, x: np.ndarray, y: np.ndarray, where: Optional[str] = None) -> Dataset:
    n = len(y)
    if n < 10:
        raise ValueError(f"--data: {where or name} has {n} data rows; at least 10 are needed")
    order = np.random.RandomState(0).permutation(n)
    a, b = int(0.6 * n), int(0.8 * n)
    tr, va, te = order[:a], order[a:b], order[b:]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    sd[sd == 0] = 1.0
    ym, ys = y[tr].mean(), y[tr].std() or 1.0

    def part(idx: np.ndarray) -> Split:
        return ((x[idx] - mu) / sd).astype(np.float32), ((y[idx] - ym) / ys).astype(np.float32).reshape(-1, 1)

    return Dataset(name, part(tr), part(va), part(te))
