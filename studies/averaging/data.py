"""Real time series that registry packages ship inside their wheels (no download at run time).

Each data set is one long series. The last ``windows * prediction_length`` points are the test period; the
model trains on everything before it and is evaluated on ``windows`` consecutive, non-overlapping forecasts
(rolling origin: window i forecasts from the end of the training part plus i * prediction_length, with all
earlier points as context), as GluonTS's backtest does with one ``make_evaluation_predictions`` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SeriesSpec:
    """A data set of the study: where it comes from and how it is forecast."""

    name: str
    source: str  # for the report: package, loader, what the series is
    freq: str
    prediction_length: int
    windows: int
    load: Callable[[], Tuple[np.ndarray, pd.Period]]


@dataclass
class StudyData:
    spec: SeriesSpec
    train: Any  # gluonts ListDataset
    test: Any
    n_train: int
    n_total: int


def _taylor() -> Tuple[np.ndarray, pd.Period]:
    from pmdarima.datasets import load_taylor

    # Half-hourly electricity demand in England and Wales, Monday 5 June to Sunday 27 August 2000 (Taylor, 2003).
    return np.asarray(load_taylor(as_series=False), dtype=np.float32), pd.Period("2000-06-05 00:00", freq="30min")


def _sunspots() -> Tuple[np.ndarray, pd.Period]:
    from pmdarima.datasets import load_sunspots

    # Monthly mean relative sunspot numbers, January 1749 to December 1983 (R's datasets::sunspots).
    values = np.asarray(load_sunspots(as_series=False), dtype=np.float32)
    return values, pd.Period("1749-01", freq="M")


def _co2() -> Tuple[np.ndarray, pd.Period]:
    import statsmodels.api as sm

    # Weekly atmospheric CO2 at Mauna Loa, March 1958 to December 2001; 59 missing weeks filled linearly.
    frame = sm.datasets.co2.load_pandas().data
    values = frame["co2"].interpolate(limit_direction="both").to_numpy(dtype=np.float32)
    return values, pd.Period(frame.index[0], freq="W-SAT")


SPECS: Dict[str, SeriesSpec] = {
    spec.name: spec
    for spec in (
        SeriesSpec("taylor", "pmdarima `load_taylor`: half-hourly electricity demand, England and Wales, summer 2000",
                   "30min", prediction_length=48, windows=7, load=_taylor),
        SeriesSpec("sunspots", "pmdarima `load_sunspots`: monthly sunspot numbers, 1749-1983",
                   "M", prediction_length=24, windows=6, load=_sunspots),
        SeriesSpec("co2", "statsmodels `datasets.co2`: weekly CO2 at Mauna Loa, 1958-2001",
                   "W-SAT", prediction_length=52, windows=4, load=_co2),
    )
}


def load(name: str) -> StudyData:
    """The data set ``name`` as GluonTS datasets: training part and rolling test windows."""
    from gluonts.dataset.common import ListDataset

    if name not in SPECS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(SPECS)}")
    spec = SPECS[name]
    values, start = spec.load()
    if not np.all(np.isfinite(values)):
        raise ValueError(f"data set {name!r} holds non-finite values")
    test_length = spec.windows * spec.prediction_length
    n_train = len(values) - test_length
    if n_train < 4 * spec.prediction_length:
        raise ValueError(f"data set {name!r} is too short for {spec.windows} test windows")
    train = ListDataset([{"target": values[:n_train], "start": start}], freq=spec.freq)
    test = ListDataset([{"target": values[: n_train + (i + 1) * spec.prediction_length], "start": start}
                        for i in range(spec.windows)], freq=spec.freq)
    return StudyData(spec=spec, train=train, test=test, n_train=n_train, n_total=len(values))
