"""What the engine averages: a model's parameters as flat numpy views (``ParamSource``).

``ArraySource`` wraps a plain ``name -> numpy array`` mapping (any framework's CPU tensors seen through numpy);
``iteravg.mx``'s ``ModelBinding`` is the MXNet source (oneDNN-safe views, structural names).
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence, Union

import numpy as np

from .averaged import FoldPlan, Layout, TensorSpec

__all__ = ["ParamSource", "ArraySource", "Params"]


class ParamSource(Protocol):
    """A model's parameters as the engine sees them. ``iteravg.mx``'s ``ModelBinding`` is one; ``ArraySource``
    wraps a plain ``name -> numpy array`` mapping."""

    layout: Layout

    def plan(self) -> FoldPlan:
        """A fold plan over the parameters' current values, valid to read and write until the framework runs."""

    def read(self, groups: Sequence[np.ndarray]) -> None:
        """Copy the parameters into flat per-dtype buffers."""

    def write(self, groups: Sequence[np.ndarray]) -> None:
        """Set the parameters from flat per-dtype buffers."""

    def fold_weight(self, alpha: float) -> float:
        """The weight the fold really uses for ``alpha`` (a framework may round it as its own ops would)."""


class ArraySource:
    """``name -> numpy array`` parameters (any framework's views: ``tensor.numpy()``, ``np.asarray(...)``).

    Arrays must be C-contiguous, writable and floating-point, and stay the same objects while averaging runs
    (a new mapping of new arrays is checked against the layout and re-planned). ``per_rank`` names tensors that
    differ per rank even in data-parallel training (BatchNorm running statistics): with ``sharded=True`` their
    average stays whole on every rank and is averaged across ranks at each sync.
    """

    def __init__(self, params: Mapping[str, np.ndarray], *, per_rank: Sequence[str] = ()) -> None:
        if not isinstance(params, Mapping) or not params:
            raise ValueError(f"params must be a non-empty mapping of name -> numpy array, got {type(params).__name__}")
        specs, arrays = [], []
        for name, arr in params.items():
            if not isinstance(arr, np.ndarray):
                raise ValueError(f"params[{name!r}] must be a numpy array (a view of the framework's tensor), "
                                 f"got {type(arr).__name__}")
            if not arr.flags.c_contiguous or not arr.flags.writeable:
                raise ValueError(f"params[{name!r}] must be a C-contiguous, writable array, so that the averaged "
                                 "weights can be written back into it")
            specs.append(TensorSpec(str(name), tuple(arr.shape), arr.dtype.name))
            arrays.append(arr)
        self.layout = Layout(tuple(specs))
        unknown = sorted(set(per_rank) - set(self.layout.names))
        if unknown:
            raise ValueError(f"per_rank names tensors that params does not hold: {unknown}")
        #: Per tensor: may ``sharded=True`` split its state across ranks (``per_rank`` statistics stay whole).
        self.shardable = tuple(name not in set(per_rank) for name in self.layout.names)
        self._params = dict(params)
        self._plan = FoldPlan(self.layout, arrays)

    def same_arrays(self, params: Mapping[str, np.ndarray]) -> bool:
        """O(tensors) identity check: is ``params`` the mapping this source was built from?"""
        mine = self._params
        return len(params) == len(mine) and all(params.get(k) is v for k, v in mine.items())

    def plan(self) -> FoldPlan:
        return self._plan

    def read(self, groups: Sequence[np.ndarray]) -> None:
        for g, out in enumerate(groups):
            self._plan.gather(g, out)

    def fold_weight(self, alpha: float) -> float:
        return alpha

    def write(self, groups: Sequence[np.ndarray]) -> None:
        for g, src in enumerate(groups):
            self._plan.scatter(g, src)


Params = Union[Mapping[str, np.ndarray], ParamSource]
