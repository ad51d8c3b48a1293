"""The study's grid: cells, their budgets, and the cache key of each cell's result.

A cell is one training run: (data set, estimator, averaging method, number of ranks, seed). Its result is one
JSON file named by the cell; it is reused by a later run only if it was computed with the same settings
(``settings_id``), so changing a budget recomputes exactly the cells it affects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

#: Averaging methods, in table order. "none" is GluonTS's default (best epoch by training loss, as
#: ``SelectNBestMean(num_models=1)``), the baseline of GluonTS PR #901; its runs also report the last iterate.
METHODS: Tuple[str, ...] = ("none", "nta", "alpha_suffix", "ema")
METHOD_LABELS: Dict[str, str] = {
    "none": "no averaging (best epoch)",
    "last": "no averaging (last iterate)",
    "nta": "NTA",
    "alpha_suffix": "Alpha_Suffix",
    "ema": "EMA",
}


@dataclass(frozen=True)
class Budget:
    """How long and how big one cell trains. ``batch_size`` is the total per step: each of N ranks takes
    ``batch_size / N`` windows, so 1 process and N ranks see the same windows per step and take the same steps."""

    epochs: int
    batches_per_epoch: int
    batch_size: int
    learning_rate: float = 1e-3
    num_samples: int = 100  # sample paths per forecast, for the quantiles and the mean
    model: Dict[str, Any] = field(default_factory=dict)  # estimator hyper-parameters

    def per_rank_batch(self, ranks: int) -> int:
        if self.batch_size % ranks:
            raise ValueError(f"batch_size {self.batch_size} does not split over {ranks} ranks")
        return self.batch_size // ranks


@dataclass(frozen=True)
class Cell:
    dataset: str
    family: str  # "mx" (gluonts.mx, iteravg.gluonts.Trainer) or "torch" (gluonts.torch, iteravg.lightning)
    estimator: str
    method: str
    ranks: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.dataset}-{self.family}.{self.estimator}-{self.method}-np{self.ranks}-s{self.seed}"

    @property
    def group(self) -> Tuple[str, str, str, int]:
        """Cells of one group run in one process (or one ``mpirun`` job), one after the other."""
        return (self.dataset, self.family, self.estimator, self.ranks)


@dataclass(frozen=True)
class Profile:
    """A named grid: which data sets, estimators, methods, ranks and seeds, and each estimator's budget."""

    name: str
    pairs: Tuple[Tuple[str, str, str], ...]  # (data set, family, estimator)
    methods: Tuple[str, ...]
    ranks: Tuple[int, ...]
    seeds: Dict[Tuple[str, str, str], Tuple[int, ...]]
    budgets: Dict[Tuple[str, str], Budget]  # (family, estimator) -> budget
    #: (data set, family, estimator, method, ranks) combinations left out, optionally with a 6th element: only that
    #: seed (the smoke profile's small 2-rank arms)
    skip: Tuple[Tuple[Any, ...], ...] = ()

    def cells(self) -> List[Cell]:
        out = []
        for dataset, family, estimator in self.pairs:
            for ranks in self.ranks:
                for seed in self.seeds[(dataset, family, estimator)]:
                    for method in self.methods:
                        cell = Cell(dataset, family, estimator, method, ranks, seed)
                        if not self.skipped(cell):
                            out.append(cell)
        return out

    def skipped(self, cell: Cell) -> bool:
        what = (cell.dataset, cell.family, cell.estimator, cell.method, cell.ranks)
        return any(tuple(entry[:5]) == what and (len(entry) == 5 or entry[5] == cell.seed) for entry in self.skip)

    def budget(self, cell: Cell) -> Budget:
        return self.budgets[(cell.family, cell.estimator)]


def settings_of(profile: Profile, cell: Cell) -> Dict[str, Any]:
    """What determines a cell's result besides the cell itself (the cache is keyed on its hash)."""
    from .data import SPECS

    spec = SPECS[cell.dataset]
    return {"budget": asdict(profile.budget(cell)), "prediction_length": spec.prediction_length,
            "windows": spec.windows, "freq": spec.freq, "version": 1}


def settings_id(settings: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


SFF = Budget(epochs=20, batches_per_epoch=40, batch_size=64, model={"num_hidden_dimensions": [40, 40],
                                                                     "context_multiple": 2})
DEEPAR = Budget(epochs=15, batches_per_epoch=20, batch_size=32, model={"num_layers": 1, "num_cells": 20,
                                                                        "context_multiple": 1})
#: gluonts.torch's SimpleFeedForward: the same network, steps and batch as the mx one.
TORCH_SFF = Budget(epochs=20, batches_per_epoch=40, batch_size=64, model={"hidden_dimensions": [40, 40],
                                                                          "context_multiple": 2})

FULL_SEEDS = tuple(range(8))
TORCH_SEEDS = tuple(range(5))
PROFILES: Dict[str, Profile] = {
    "full": Profile(
        name="full",
        pairs=(("taylor", "mx", "sff"), ("taylor", "mx", "deepar"), ("sunspots", "mx", "sff"), ("co2", "mx", "sff"),
               ("taylor", "torch", "sff"), ("sunspots", "torch", "sff"), ("co2", "torch", "sff")),
        methods=METHODS,
        ranks=(1, 2),
        seeds={("taylor", "mx", "sff"): FULL_SEEDS, ("sunspots", "mx", "sff"): FULL_SEEDS,
               ("co2", "mx", "sff"): FULL_SEEDS, ("taylor", "mx", "deepar"): tuple(range(5)),
               ("taylor", "torch", "sff"): TORCH_SEEDS, ("sunspots", "torch", "sff"): TORCH_SEEDS,
               ("co2", "torch", "sff"): TORCH_SEEDS},
        budgets={("mx", "sff"): SFF, ("mx", "deepar"): DEEPAR, ("torch", "sff"): TORCH_SFF},
    ),
    # `make test`'s subset: one data set, SimpleFeedForward of each family, 2 seeds, a few steps; on 2 ranks two
    # methods of the mx one and one run (EMA, seed 0) of the torch one.
    "smoke": Profile(
        name="smoke",
        pairs=(("taylor", "mx", "sff"), ("taylor", "torch", "sff")),
        methods=METHODS,
        ranks=(1, 2),
        seeds={("taylor", "mx", "sff"): (0, 1), ("taylor", "torch", "sff"): (0, 1)},
        budgets={("mx", "sff"): Budget(epochs=3, batches_per_epoch=4, batch_size=16, num_samples=20,
                                       model={"num_hidden_dimensions": [8], "context_multiple": 1}),
                 ("torch", "sff"): Budget(epochs=3, batches_per_epoch=4, batch_size=16, num_samples=20,
                                          model={"hidden_dimensions": [8], "context_multiple": 1})},
        skip=(("taylor", "mx", "sff", "alpha_suffix", 2), ("taylor", "mx", "sff", "ema", 2),
              ("taylor", "torch", "sff", "none", 2), ("taylor", "torch", "sff", "nta", 2),
              ("taylor", "torch", "sff", "alpha_suffix", 2), ("taylor", "torch", "sff", "ema", 2, 1)),
    ),
}


def select(profile: Profile, datasets: Sequence[str] = (), estimators: Sequence[str] = (),
           seeds: int = 0) -> List[Cell]:
    """The profile's cells, optionally restricted to some data sets / ``family.estimator`` names / first seeds."""
    cells = profile.cells()
    if datasets:
        cells = [c for c in cells if c.dataset in datasets]
    if estimators:
        cells = [c for c in cells if f"{c.family}.{c.estimator}" in estimators or c.estimator in estimators]
    if seeds:
        keep = {pair: s[:seeds] for pair, s in profile.seeds.items()}
        cells = [c for c in cells if c.seed in keep[(c.dataset, c.family, c.estimator)]]
    return cells
