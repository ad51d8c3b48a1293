"""The link between a Gluon block's parameters and the framework-neutral averaged state.

A ``ModelBinding`` is built once (it calls ``collect_params()`` once, not per step as GluonTS does) and
holds the parameter arrays, their zero-copy numpy views and the bucket plan that gathers them. Parameters
include auxiliary states (BatchNorm running mean/var), exactly like GluonTS's ``collect_params()`` dicts.

Names: ``param_names`` are the ``collect_params()`` keys (``hybridsequential0_dense1_weight``), which GluonTS
uses to key ``averaged_model``; they carry Gluon's process-wide block counter. The ``layout`` -- what ranks
compare, what checkpoints store and resume checks -- uses *structural* names instead (``0.weight``,
``encoder.rnn.l0_i2h_weight``, the keys of ``save_parameters``), so the same architecture is the same model
whatever was built before it in the process. A shared parameter appears once, under its first structural name.

oneDNN: MXNet's default CPU build reorders Conv / FullyConnected weights in place into a blocked layout during
an inference-mode forward. Every access (``plan``, ``read``, ``write``) therefore first puts all parameters
back into the default layout in one C call (``ndarray.DefaultLayout``) and rebuilds the views if a buffer
moved, so a cached view never reads or writes permuted bytes.

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
from .ndarray import DefaultLayout, can_view, mxnet_scalar, numpy_view

__all__ = ["ModelBinding", "structural_names"]


def structural_names(net: gluon.Block) -> Dict[str, str]:
    """``collect_params()`` key -> structural name (``save_parameters``'s key), first one for shared parameters.

    A parameter that is not reachable through the block tree's attributes (created with ``self.params.get``
    but never assigned) keeps its ``collect_params()`` name with the network's own prefix removed.
    """
    first: Dict[int, str] = {}
    for key, param in net._collect_params_with_prefix().items():  # Gluon's API behind save_parameters
        first.setdefault(id(param), key)
    prefix = net.prefix
    out: Dict[str, str] = {}
    for name, param in net.collect_params().items():
        fallback = name[len(prefix):] if prefix and name.startswith(prefix) else name
        out[name] = first.get(id(param), fallback)
    return out


class ModelBinding:
    """One network's parameters as the averaged state sees them (see the module docstring).

    ``layout`` names are structural; ``param_names[i]`` is the ``collect_params()`` key of ``layout.specs[i]``.
    """

    def __init__(self, net: gluon.Block) -> None:
        params = net.collect_params()
        self.net = net
        self.param_names: List[str] = list(params.keys())
        self.params: List[gluon.Parameter] = list(params.values())
        self.arrays: List[mx.nd.NDArray] = []
        for name, p in zip(self.param_names, self.params):
            try:
                self.arrays.append(p.list_data()[0])
            except RuntimeError as exc:
                raise ValueError(
                    f"parameter {name!r} is not initialized; averaging starts after the network ran forward once"
                ) from exc
        by_param = structural_names(net)
        self.structural_names: List[str] = [by_param[n] for n in self.param_names]
        if len(set(self.structural_names)) != len(self.structural_names):
            # Two distinct parameters on one structural path cannot happen in a block tree; fall back to the
            # collect_params() names rather than refuse a model we cannot name structurally.
            self.structural_names = list(self.param_names)
        self.layout = Layout(
            tuple(TensorSpec(s, tuple(a.shape), np.dtype(a.dtype).name)
                  for s, a in zip(self.structural_names, self.arrays))
        )
        #: Per tensor: trained parameters are the same on every data-parallel rank (their averaged state may be
        #: sharded); auxiliary states (BatchNorm's running statistics, grad_req "null") may differ per rank.
        self.shardable = tuple(p.grad_req != "null" for p in self.params)
        #: Any name (``collect_params()`` key or structural) -> structural name; used by checkpoint files.
        self.structural: Dict[str, str] = dict(zip(self.param_names, self.structural_names))
        self.structural.update({s: s for s in self.structural_names})
        self._f32_weight = "float64" not in self.layout.groups
        self.fast = all(self._viewable(p, a) for p, a in zip(self.params, self.arrays))
        self._handles = self._current_handles()
        self._default: Optional[DefaultLayout] = None
        self._plan: Optional[FoldPlan] = None

    @property
    def names(self) -> List[str]:
        """The ``collect_params()`` keys in layout order (older name of ``param_names``)."""
        return self.param_names

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
            list(net.collect_params().keys()) == self.param_names

    def fold_weight(self, alpha: float) -> float:
        """The weight GluonTS's ``alpha * (x - avg)`` really uses in MXNet, so folds match it bit for bit.

        MXNet parses the scalar from a string (``ndarray.mxnet_scalar``: 1 ulp off in ~1 of 9 weights, which
        float64 tensors see), then each tensor uses ``DType(alpha)``; for float16 that is ``half(float(alpha))``,
        rounded twice (differs from a direct rounding in about 1 of 3 x 10^4 folds). Without float64 tensors the
        weight is therefore pre-rounded to float32, which leaves the float32 cast unchanged and makes the
        float16 one MXNet's; with float64 tensors it must stay a double (a float64 + float16 model may then
        differ from GluonTS in float16 folds that rare).
        """
        value = mxnet_scalar(alpha)
        if self._f32_weight:
            return float(np.float32(value))
        return value

    # -- reading the iterate ---------------------------------------------------------------------
    def plan(self) -> FoldPlan:
        """Bucket plan over the parameters' current values, valid to read and write until MXNet runs again.

        Fast path: zero-copy views, built once; each call waits for MXNet's engine and puts every parameter
        back into the default layout (one C call), rebuilding the views only if a buffer moved.
        """
        mx.nd.waitall()  # MXNet must be done writing (or reordering) the parameters before numpy touches them
        if not self.fast:
            return FoldPlan(self.layout, [a.asnumpy() for a in self.arrays])
        if self._default is None:
            # oneDNN has no blocked layout for 1-d arrays (biases, BatchNorm statistics): only the others can be
            # reordered, so only they are checked -- half the per-step check for Dense stacks.
            self._default = DefaultLayout([a for a in self.arrays if len(a.shape) >= 2])
            self._plan = None
        elif self._default.refresh():
            self._default.adopt()
            self._plan = None
        if self._plan is None:
            self._plan = FoldPlan(self.layout, [numpy_view(a) for a in self.arrays])
        return self._plan

    # -- writing into the model ------------------------------------------------------------------
    def write(self, groups: List[np.ndarray]) -> None:
        """Set the parameters from flat per-dtype buffers (the averaged or the cached model)."""
        if self.fast:
            # numpy writes bypass MXNet's engine, so the arrays' versions would not change -- and MXNet caches
            # keyed on them (oneDNN's RNN keeps reordered weights until the version moves) would go stale. One
            # multi-array op that writes every parameter bumps them all; its zeros are overwritten below.
            mx.nd.reset_arrays(*self.arrays, num_arrays=len(self.arrays))
            plan = self.plan()  # waits for that op and for any reader of the old values; default layout
            for g, src in enumerate(groups):
                plan.scatter(g, src)
            return
        # set_data cannot copy into a 3-d array oneDNN left blocked (MXNet 1.9.1: "Check failed:
        # to.IsDefaultData()"), so every context's copy is put back into the default layout first.
        mx.nd.waitall()
        DefaultLayout([a for p in self.params for a in p.list_data() if can_view(a) and len(a.shape) >= 2])
        for spec, p in zip(self.layout.specs, self.params):
            g, start = self.layout.offsets[spec.name]
            p.set_data(mx.nd.array(groups[g][start : start + spec.size].reshape(spec.shape), dtype=spec.dtype))

    def read(self, groups: List[np.ndarray]) -> None:
        """Copy the parameters into flat per-dtype buffers."""
        plan = self.plan()
        for g, out in enumerate(groups):
            plan.gather(g, out)
