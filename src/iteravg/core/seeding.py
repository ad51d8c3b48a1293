"""Per-rank seeds for data-parallel training: every rank draws its own random windows, reproducibly.

Data-parallel training only sees more data if the ranks draw different samples. A launcher starts every rank from the
same script, so a seeded script (``np.random.seed(0)``, ``lightning.seed_everything(0)``) gives every rank the same
random stream -- and GluonTS's samplers, which draw training windows from numpy's global RNG, the same windows on
every rank: twice the compute, no more data. ``rank_seeds`` gives each rank > 0 its own seeds, derived from rank 0's
numpy RNG state (read, not consumed) and the rank, so rank 0 draws what one process would and a seeded job stays
reproducible. The frameworks' faces apply the seeds (``iteravg.gluonts`` to numpy, random and mx.random,
``iteravg.lightning.RankSeeding`` to numpy, random and torch).
"""

from __future__ import annotations

import hashlib
from typing import List, Optional, Tuple

import numpy as np

from .. import collectives
from ..comm import Communicator

__all__ = ["rank_seeds"]


def rank_seeds(comm: Communicator, count: int) -> Tuple[int, Optional[List[int]]]:
    """(base, seeds): ``base`` is identical on every rank; ``seeds`` is ``None`` on rank 0 (it keeps its RNGs) and
    ``count`` 32-bit seeds from ``SeedSequence([base, rank])`` on every other rank. Collective (one broadcast)."""
    base = None
    if comm.rank == 0:
        state = np.random.get_state()[1]
        base = int.from_bytes(hashlib.sha256(np.ascontiguousarray(state).tobytes()).digest()[:4], "little")
    base = int(collectives.broadcast_json(comm, base))
    if comm.rank == 0:
        return base, None
    return base, [int(s) for s in np.random.SeedSequence([base, comm.rank]).generate_state(count)]
