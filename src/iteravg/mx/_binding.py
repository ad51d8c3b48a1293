"""The link between a Gluon block's parameters and the framework-neutral averaged state.

A ``ModelBinding`` is built once (it calls ``collect_params()`` once, not per step as GluonTS does) and
holds the parameter arrays, their zero-copy numpy views and the bucket plan that gathers them. Parameters
include auxiliary states (BatchNorm running mean/var), exactly like GluonTS's ``collect_params()`` dicts.

Fast path: every parameter lives in one dense CPU array and is not updated on a kvstore -- the views are
the parameters' own memory. Otherwise (GPU, several contexts, update_on_kvstore) the binding falls back to
copies (``asnumpy`` / ``set_data``), slower but correct.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import mxnet as mx
import numpy as np
from mxnet import gluon

from ..core.averaged import FoldPlan, Layout, TensorSpec
from ._ndarray import can_view, numpy_view


class ModelBinding:
    def __init__(self, net: gluon.Block) -> None:
        params = net.collect_params()
        self.net = net
        self.names: List[str] = list(params.keys())
        self.params: List[gluon.Parameter] = list(params.values())
        self.arrays: List[mx.nd.NDArray] = []
        for name, p in zip(self.names, self.params):
            try:
                self.arrays.append(p.list_data()[0])
            except RuntimeError as exc:
                raise ValueError(
                    f"parameter {name!r} is not initialized; averaging starts after the network ran forward once"
                ) from exc
        self.layout = Layout(
            tuple(TensorSpec(n, tuple(a.shape), np.dtype(a.dtype).name) for n, a in zip(self.names, self.arrays))
        )
        self.fast = all(self._viewable(p, a) for p, a in zip(self.params, self.arrays))
        self._handles = self._current_handles()
        self._views: Optional[List[np.ndarray]] = None
        self._plan: Optional[FoldPlan] = None
        # Structural names ("0.weight") as used by save_parameters / load_parameters.
        by_id = {id(p): s for s, p in net._collect_params_with_prefix().items()}
        self.structural: Dict[str, str] = {n: by_id.get(id(p), n) for n, p in zip(self.names, self.params)}

    @staticmethod
    def _viewable(p: gluon.Parameter, arr: mx.nd.NDArray) -> bool:
        trainer = getattr(p, "_trainer", None)
        if trainer is not None and not hasattr(trainer, "_kv_initialized") and callable(trainer):
            trainer = trainer()  # a weakref in some MXNet versions
        on_kv = bool(trainer is not None and getattr(trainer, "_kv_initialized", False)
                     and getattr(trainer, "_update_on_kvstore", False))
        return len(p.list_data()) == 1 and can_view(arr) and not on_kv

    def _current_handles(self) -> List[int]:
        return [p.list_data()[0].handle.value for p in self.params]

    def matches(self, net: gluon.Block) -> bool:
        """O(tensors): the same block with the same parameter arrays (not re-initialized)."""
        return net is self.net and self._current_handles() == self._handles and \
            list(net.collect_params().keys()) == self.names

    # -- reading the iterate ---------------------------------------------------------------------
    def plan(self) -> FoldPlan:
        """Bucket plan over the parameters' current values. Fast path: cached, zero-copy."""
        mx.nd.waitall()  # MXNet must be done writing the parameters before numpy reads them
        if self.fast:
            if self._plan is None:
                self._views = [numpy_view(a) for a in self.arrays]
                self._plan = FoldPlan(self.layout, self._views)
            return self._plan
        return FoldPlan(self.layout, [a.asnumpy() for a in self.arrays])

    # -- writing into the model ------------------------------------------------------------------
    def write(self, groups: List[np.ndarray]) -> None:
        """Set the parameters from flat per-dtype buffers (the averaged or the cached model)."""
        if self.fast:
            plan = self.plan()  # also waits until MXNet no longer reads the old values
            for g, src in enumerate(groups):
                plan.scatter(g, src)
            return
        for spec, p in zip(self.layout.specs, self.params):
            g, start = self.layout.offsets[spec.name]
            p.set_data(mx.nd.array(groups[g][start : start + spec.size].reshape(spec.shape), dtype=spec.dtype))

    def read(self, groups: List[np.ndarray]) -> None:
        """Copy the parameters into flat per-dtype buffers."""
        plan = self.plan()
        for g, out in enumerate(groups):
            plan.gather(g, out)
