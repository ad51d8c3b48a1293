"""A torch module's averaged tensors as the engine sees them: names, global shapes, and the local tensors to fold.

What is averaged: every floating-point entry of the *unwrapped* module's ``state_dict`` -- parameters and persistent
buffers (BatchNorm running statistics), as ``iteravg.mx`` averages MXNet's auxiliary states -- named as
``model.state_dict()`` names them without wrappers (no ``module.`` from DDP / DataParallel, no ``_orig_mod.`` from
``torch.compile``), so a snapshot loads into a plain model. Non-floating entries (``num_batches_tracked``) are
*carried*: written beside the average with the model's current value, never averaged. A tensor tied under two names
(shared embeddings) is averaged once, under its first name, and reported under both.

FSDP2 (``fully_shard``): parameters are ``DTensor`` s sharded on dim 0. The layout keeps their *global* shapes (the
same on every rank), and each rank folds its local shard (``to_local()``, no communication): the source reports which
rows of each tensor the rank holds, so the averaged state lives on the shard (torchtitan's design) and is gathered only
to be saved.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..core.averaged import Layout, TensorSpec
from ..core.partition import Piece
from ..core.torch_state import TORCH_DTYPES

__all__ = ["TorchSource", "unwrap", "Piece"]

_NUMPY_NAMES = {v: k for k, v in TORCH_DTYPES.items()}



def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel and ``torch.compile`` wrappers (FSDP2 modifies in place)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule: its documented way back to the module
        else:
            return model


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor  # noqa: WPS433 -- absent in builds without distributed
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _local_rows(t: Any, name: str) -> Tuple[torch.Tensor, int]:
    """(local shard, its first row in the global tensor) of an FSDP2 parameter sharded on dim 0.

    FSDP2 shards with ``torch.chunk`` semantics: rank r holds rows ``[r*c, min(n, (r+1)*c))``, ``c = ceil(n / W)``.
    Anything else (another placement, a 2-D mesh) is refused by name rather than averaged wrongly."""
    from torch.distributed.tensor import Shard  # noqa: WPS433

    placements = tuple(t.placements)
    local = t.to_local()
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"parameter {name!r} is a DTensor with placements {placements}; iteravg averages FSDP2's "
                         "dim-0 sharding on a 1-D mesh (fully_shard) and replicated tensors")
    mesh = t.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = t.shape[0] if t.dim() else 1
    chunk = math.ceil(rows / world) if rows else 0
    first = min(rank * chunk, rows)
    expected = min(rows, first + chunk) - first
    if t.dim() == 0 or local.shape[0] != expected or tuple(local.shape[1:]) != tuple(t.shape[1:]):
        raise ValueError(f"parameter {name!r}: local shard {tuple(local.shape)} is not rows [{first}, "
                         f"{first + expected}) of {tuple(t.shape)}; iteravg expects FSDP2's torch.chunk sharding")
    return local, first


def _storage_ptr(t: torch.Tensor) -> int:
    """Where a (possibly DTensor) parameter's local data lives now: changes when ``.data`` is replaced."""
    return (t.to_local() if _is_dtensor(t) else t).data_ptr()


class TorchSource:
    """``model``'s floating state as flat, per-dtype layout + the local tensors the state folds (see module doc)."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.module = unwrap(model)
        entries = self.module.state_dict(keep_vars=True)
        specs: List[TensorSpec] = []
        locals_: List[torch.Tensor] = []
        originals: List[torch.Tensor] = []
        shardable: List[bool] = []
        pieces: List[Piece] = []
        seen: Dict[int, str] = {}
        self.aliases: Dict[str, str] = {}   # a tied tensor's other names -> its layout name
        self.carried: Dict[str, torch.Tensor] = {}  # non-floating entries, reported but not averaged
        self.sharded = False
        devices = set()
        for name, t in entries.items():
            if not isinstance(t, torch.Tensor):
                continue
            key = id(t)
            if key in seen:
                self.aliases[name] = seen[key]
                continue
            seen[key] = name
            if not t.is_floating_point():
                self.carried[name] = t
                continue
            if t.dtype not in _NUMPY_NAMES:
                raise ValueError(f"tensor {name!r} is {t.dtype}; iteravg averages float16, float32 and float64 "
                                 "tensors (bfloat16 is not supported yet)")
            sharded = _is_dtensor(t)
            if sharded:
                local, first = _local_rows(t, name)
                start = first * (int(np.prod(t.shape[1:], dtype=np.int64)) if t.dim() > 1 else 1)
                self.sharded = True
            else:
                local, start = t, 0
            specs.append(TensorSpec(name, tuple(int(d) for d in t.shape), _NUMPY_NAMES[t.dtype]))
            shardable.append(isinstance(t, nn.Parameter))  # buffers (BatchNorm statistics) may differ per rank
            originals.append(t)
            locals_.append(local.detach())
            pieces.append((len(specs) - 1, start, start + local.numel(), sharded))
            devices.add(local.device)
        if not specs:
            raise ValueError("the model has no floating-point parameters or buffers to average")
        if len(devices) > 1:
            raise ValueError(f"the model's tensors live on several devices ({sorted(map(str, devices))}); iteravg "
                             "averages a model whose tensors share one device per process")
        self.layout = Layout(tuple(specs))
        self.device = next(iter(devices))
        self.pieces: Tuple[Piece, ...] = tuple(pieces)
        #: Per layout tensor: may its state be sharded across data-parallel ranks (parameters: yes; buffers: no).
        self.shardable: Tuple[bool, ...] = tuple(shardable)
        self._whole = locals_
        self._tensors = locals_
        self._ends = (originals[0], originals[-1])
        self._ptrs = tuple(_storage_ptr(t) for t in self._ends)

    # -- the engine's ParamSource protocol --------------------------------------------------------
    def tensors(self) -> List[torch.Tensor]:
        """The local tensors (detached, pieces order). A module moved or re-created since (``model.to(...)``,
        ``param.data = ...``) no longer shares memory with them: that is refused (O(1) check of the first and last
        tensor) rather than averaged stale."""
        if tuple(_storage_ptr(t) for t in self._ends) != self._ptrs:
            raise ValueError("the model's parameters were replaced since the averager bound them (model.to(...), "
                             "param.data = ..., re-initialisation); create the averager after moving the model")
        return self._tensors

    def writable_tensors(self) -> List[torch.Tensor]:
        """``tensors()``, to be written (swaps, ``finalize``). FSDP2 keeps the root module's parameters unsharded
        after a forward without backward (validation) and the next forward reuses them instead of gathering the
        shards: every FSDP module is put back on its shards first, so what is written here is what runs next."""
        if self.sharded:
            from torch.distributed.fsdp import FSDPModule  # noqa: WPS433

            for module in self.model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        return self.tensors()

    def fold_weight(self, alpha: float) -> float:
        return alpha

    def make_state(self, pieces: Optional[Sequence[Piece]] = None, **options: Any) -> Any:
        """The torch averaged state for this model: on its device, on its FSDP2 shards, or -- ``pieces`` from
        ``sharded=True`` on a replicated model -- on this rank's equal slices of the parameters."""
        from ..core.partition import Partition  # noqa: WPS433
        from ..core.torch_state import TorchAveragedState  # noqa: WPS433

        if pieces is None:
            return TorchAveragedState(self.layout, self.device, pieces=self.pieces,
                                      shapes=[tuple(t.shape) for t in self._tensors], **options)
        if self.sharded:
            raise ValueError("this model is FSDP2-sharded: its average lives on its own shards already")
        tensors = []
        for i, a, b, sharded in pieces:
            whole = self._whole[i]
            if sharded and not whole.is_contiguous():
                raise ValueError(f"sharded=True needs contiguous parameters; {self.layout.specs[i].name!r} is not "
                                 "(channels_last?): use sharded=False")
            tensors.append(whole.view(-1)[a:b] if sharded else whole)
        self._tensors = tensors
        partition = Partition(self.layout, pieces, model_sharded=False)
        return TorchAveragedState(self.layout, self.device, partition=partition,
                                  shapes=[tuple(t.shape) for t in tensors], **options)

    def whole_tensors(self) -> List[torch.Tensor]:
        """The model's local tensors in layout order, whole (what a gathered average is written into)."""
        self.tensors()  # the same check that the model was not moved
        return self._whole

    def read(self, groups: Sequence[Any]) -> None:  # the numpy protocol; the torch state never calls it
        raise NotImplementedError("TorchSource works with iteravg's torch state only")

    write = read

    # -- names -------------------------------------------------------------------------------------
    def named_output(self, averaged: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``model.state_dict()``-named tensors: the averaged ones, their tied aliases, and the carried entries."""
        out: Dict[str, torch.Tensor] = {}
        for name in self.module.state_dict(keep_vars=True):
            if name in averaged:
                out[name] = averaged[name]
            elif name in self.aliases and self.aliases[name] in averaged:
                out[name] = averaged[self.aliases[name]]
            elif name in self.carried:
                out[name] = self.carried[name].detach().clone()
        return out

    def carried_host(self) -> Dict[str, np.ndarray]:
        """The carried (non-floating) entries as host arrays, for snapshots (``strict`` loads need them)."""
        out = {}
        for name, t in self.carried.items():
            local = t.to_local() if _is_dtensor(t) else t
            out[name] = local.detach().cpu().numpy().copy()
        return out

