"""``RankSeeding``: every rank of a Lightning DDP / FSDP job draws its own random numbers (GluonTS's training windows).

Lightning's DDP starts every rank from the same script, so a seeded job (``lightning.seed_everything``, or GluonTS's
own seeding) gives every rank the same numpy, ``random`` and torch streams. GluonTS's PyTorch estimators build their
training loader as an endless stream whose windows are drawn from numpy's global RNG -- not a ``DataLoader`` that
Lightning could give a ``DistributedSampler`` -- so every rank then trains on the same windows: twice the compute, no
more data. With ``RankSeeding`` in the callbacks, ranks > 0 reseed at ``setup`` (after Lightning initialised the
process group, before the first window is drawn) from ``iteravg.core.seeding.rank_seeds``: rank 0 keeps its streams,
the others get their own, derived from rank 0's numpy state and the rank, so a seeded job stays reproducible::

    trainer_kwargs={"callbacks": [IterationAveraging(...), RankSeeding()], "strategy": "ddp", "devices": 2}
"""

from __future__ import annotations

import random
from typing import Optional

import lightning.pytorch as pl
import numpy as np
import torch

from ..comm import get_comm
from ..core.seeding import rank_seeds

__all__ = ["RankSeeding"]


class RankSeeding(pl.Callback):
    """Ranks > 0 reseed numpy, ``random`` and torch when ``fit`` is set up (a collective: one tiny broadcast).
    On one process it does nothing. ``base_seed`` is the seed every rank derived its own from (``None`` on one
    process or before ``fit``)."""

    def __init__(self) -> None:
        self.base_seed: Optional[int] = None

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        comm = get_comm()
        if comm.size == 1:
            return
        self.base_seed, seeds = rank_seeds(comm, 3)
        if seeds is not None:
            numpy_seed, python_seed, torch_seed = seeds
            np.random.seed(numpy_seed)
            random.seed(python_seed)
            torch.manual_seed(torch_seed)
