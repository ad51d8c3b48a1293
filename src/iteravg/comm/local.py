"""Single-process communicator: every collective is the identity. The product's fallback without a launcher."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import ReduceOp, check_rank


class LocalComm:
    name = "local"
    rank = 0
    size = 1

    def allreduce_(self, array: np.ndarray, *, op: ReduceOp, name: str, native: Any = None) -> None:
        if op not in ("sum", "mean", "min", "max"):
            raise ValueError(f"op must be sum, mean, min or max, got {op!r}")

    def broadcast_(self, array: np.ndarray, *, root: int, name: str, native: Any = None) -> None:
        check_rank(root, 1)

    def allgather(self, row: np.ndarray, *, name: str) -> np.ndarray:
        return np.asarray(row).reshape(1, -1).copy()

    def barrier(self, *, name: str) -> None:
        pass

    def shutdown(self) -> None:
        pass
