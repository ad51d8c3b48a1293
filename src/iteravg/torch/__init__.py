"""``iteravg.torch``: iteration averaging of a PyTorch model -- plain, DDP- or FSDP2-wrapped -- on its own device.

A thin face on the framework-neutral engine (``iteravg.Averager``): the model's averaged tensors live as torch tensors
on the parameters' device (``core.torch_state``), folded with ``torch._foreach_lerp_`` (no host copy, O(1) Python
calls per step); the schedule, the agreed trigger, the sync, swaps and snapshots are the engine's, so every guarantee
of the MXNet face holds here: the ranks agree on when averaging starts, every rank ends with a bitwise-identical
average (checked with a fingerprint computed where the tensors live), rank 0 writes atomic, immutable snapshots.

Usage (one process, or under ``torchrun`` -- the communicator is torch.distributed's default process group)::

    from iteravg.torch import Averager
    avg = Averager(model, iteravg.NTASchedule(epochs=10, n=5))   # model: nn.Module, DDP- or FSDP2-wrapped
    for epoch in range(1, 11):
        for batch in loader:
            ...; optimizer.step()
            avg.step()                                # fold on the parameters' device; no communication
        avg.epoch_end(metric=val_loss, epoch=epoch)   # agreed trigger, epoch-end fold, sync
        with avg.swapped():                           # averaged weights inside, training weights after
            evaluate(model)
    avg.finalize()                                    # the model holds the average on every rank
    avg.save("ckpt")                                  # rank 0: ckpt/latest/averaged.safetensors

``averaged.safetensors`` holds ``model.state_dict()``'s names (no ``module.`` prefix), so
``model.load_state_dict(safetensors.torch.load_file(path))`` restores the average into a plain model.

FSDP2 (``fully_shard``): each rank averages its own shard, with no communication per step (torchtitan's design);
snapshots gather the shards (one tensor group at a time) and are read by any world size, sharded or not.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..comm import Communicator
from ..core.engine import Averager as _Engine
from ..core.schedules import Schedule
from .source import TorchSource, unwrap

__all__ = ["Averager", "TorchSource", "unwrap"]


class Averager:
    """Iterate averaging of one torch model, on one or many ranks (see the module docstring).

    Parameters
    ----------
    model
        The model being trained: an ``nn.Module``, DDP / DataParallel / ``torch.compile`` wrapped, or FSDP2-sharded.
    schedule
        When to start and with which weight: ``iteravg.NTASchedule``, ``AlphaSuffixSchedule``, ``EMASchedule``,
        ``Schedule`` (with ``averaging_started``), optionally in ``EveryNSteps``.
    comm
        ``None`` (torch.distributed's default group when initialised or under torchrun; horovodrun / mpirun
        otherwise; else one process), ``"torch"``, ``"horovod"``, ``"mpi"``, ``"local"`` or a communicator.
    sharded
        Data-parallel (DDP) models: ``True`` keeps only this rank's equal slice of the average (1/N of the model per
        rank, 1/N of the fold's work), gathered for swaps and snapshots (collective); the ranks' parameters must be
        identical (checked at every epoch end). FSDP2 models are always averaged on their own shards. Default: not
        sharded (FSDP2: sharded).
    check_finite
        Refuse an iterate holding a NaN or inf (default). It costs one read of the parameters and one tiny
        device-to-host copy per fold; ``False`` folds every iterate.
    metric_reduce, sync, sync_every_batches
        As for ``iteravg.Averager``.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, comm: Union[None, str, Communicator] = None, *,
                 sharded: Optional[bool] = None, check_finite: bool = True, metric_reduce: str = "mean",
                 sync: str = "mean", sync_every_batches: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(check_finite, bool):
            raise ValueError(f"check_finite must be True or False, got {check_finite!r}")
        if sharded is not None and not isinstance(sharded, bool):
            raise ValueError(f"sharded must be None, True or False, got {sharded!r}")
        source = _Source(model, check_finite)
        if source.sharded and sharded is False:
            raise ValueError("sharded=False with an FSDP2 model: its parameters are sharded, so is their average "
                             "(each rank folds its own shard); leave sharded unset")
        self.engine = _Engine(schedule, comm, metric_reduce=metric_reduce, sync=sync,
                              sync_every_batches=sync_every_batches, sharded=bool(sharded) and not source.sharded)
        self.model = model
        self.check_finite = check_finite
        self._source = source
        self.engine.bind(self._source)  # collective on several ranks: they must hold the same model
        if self._source.device.type == "cuda" and self.engine.comm.size > 1 and self.engine.comm.name != "torch":
            raise ValueError(f"the model is on {self._source.device}, but the {self.engine.comm.name!r} communicator "
                             "moves host memory only: run under torchrun (torch.distributed with NCCL), or set "
                             "ITERAVG_COMM=torch")

    # -- what users read -------------------------------------------------------------------------
    schedule = property(lambda self: self.engine.schedule)
    comm = property(lambda self: self.engine.comm)
    has_average = property(lambda self: self.engine.has_average)
    sharded = property(lambda self: self.engine.state.partitioned)
    average_counter = property(lambda self: self.engine.average_counter)
    averaging_started = property(lambda self: self.engine.averaging_started)
    refused_nonfinite = property(lambda self: self.engine.refused_nonfinite)

    @property
    def device(self) -> torch.device:
        """Where the parameters, and so the averaged state, live."""
        return self._source.device

    # -- training ----------------------------------------------------------------------------------
    def step(self) -> bool:
        """After every ``optimizer.step()``: fold the iterate if the schedule says so (no communication)."""
        return self.engine.step(self._source)

    def fold(self) -> bool:
        """Fold the current iterate now, whatever the step cadence. Returns whether it was folded."""
        return self.engine.fold(self._source)

    def update_trigger(self, metric: Any = None, epoch: Optional[int] = None) -> bool:
        """The agreed trigger decision alone (collective when the schedule needs the metric)."""
        return self.engine.update_trigger(_scalar(metric), epoch)

    def epoch_end(self, metric: Any = None, epoch: Optional[int] = None, *, fold: bool = True) -> bool:
        """End of an epoch on every rank (collective): agreed trigger on ``metric`` (a float or 0-d tensor; reduced
        across ranks), the epoch-end fold, the sync. Returns whether averaging has started."""
        return self.engine.epoch_end(self._source, metric=_scalar(metric), epoch=epoch, fold=fold)

    def sync(self) -> None:
        """Make the average bitwise identical on every rank (collective)."""
        self.engine.sync()

    # -- using the average -------------------------------------------------------------------------
    def load_averaged(self, *, sync: bool = True) -> bool:
        """Put the averaged weights into the model, keeping the training weights (see ``swapped``)."""
        return self.engine.load_averaged(self._source, sync=sync)

    def restore_training(self) -> bool:
        """Put the training weights back after ``load_averaged``, and free the copy that held them (collective
        with ``sharded=True``, like the swap in)."""
        return self.engine.restore_training(self._source, release=True)

    @contextlib.contextmanager
    def swapped(self, *, sync: bool = True) -> Iterator[bool]:
        """``with avg.swapped(): evaluate(model)`` -- the averaged weights inside, the training weights restored on
        exit even if the body raises. ``sync=True`` is collective (every rank evaluates the same bits); use
        ``sync=False`` when only some ranks evaluate. Yields whether an average was loaded."""
        loaded = self.load_averaged(sync=sync)
        try:
            yield loaded
        finally:
            if loaded:
                self.restore_training()

    def finalize(self) -> bool:
        """Train end on every rank (collective): the model holds the synced average (or, without one, rank 0's
        weights on every rank). Returns whether the average was loaded."""
        loaded = self.engine.finalize(self._source)
        self.engine.drop_cache()
        return loaded

    def averaged_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The average as ``model.state_dict()`` names it (unwrapped): averaged tensors on the model's device
        (views, valid until the next fold) plus the carried non-floating entries; ``None`` before any fold.
        Sharded (FSDP2): the gathered whole on every rank, as host tensors (collective)."""
        if not self.has_average:
            return None
        state = self.engine.state
        if state.partitioned:  # gathered (collective)
            averaged = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.engine.averaged().items()}
        else:
            averaged = state.named_tensors()
        return self._source.named_output(averaged)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything a resume needs, ``torch.save``-able: the engine's progress and the averaged tensors (host,
        by layout name). Sharded: the gathered whole (collective), so it loads at any world size."""
        out: Dict[str, Any] = {"averager": self.engine.state_dict()}
        averaged = self.engine.averaged()
        if averaged is not None:
            out["averaged"] = {k: torch.from_numpy(np.array(v)) for k, v in averaged.items()}
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s progress and average (same model; any world size)."""
        if not isinstance(state_dict, Mapping) or "averager" not in state_dict:
            raise ValueError("state_dict must come from iteravg.torch.Averager.state_dict() (no 'averager' entry)")
        tensors = state_dict.get("averaged")
        arrays = None if tensors is None else {k: _host(v) for k, v in tensors.items()}
        self.engine.load_state_dict(dict(state_dict["averager"]), tensors=arrays, params=self._source)

    def save(self, checkpoint_dir: os.PathLike, *, epoch: Optional[int] = None, stage: str = "manual",
             keep: int = 2, extra_files: Optional[Dict[str, Callable[[Path], None]]] = None,
             extra_state: Optional[Dict[str, Any]] = None, on_save_error: str = "raise") -> Optional[Path]:
        """Sync, then rank 0 writes an atomic snapshot (collective). Returns its path on rank 0, None elsewhere.
        ``extra_files`` (name -> writer of that file's path, called on rank 0) and ``extra_state`` (JSON) go into the
        same snapshot, e.g. the training weights and the optimizer's state for a full resume. ``on_save_error``: as
        ``iteravg.Averager.save`` (``"warn"`` keeps training when the disk is full or read-only)."""
        return self.engine.save(checkpoint_dir, epoch=epoch, stage=stage, keep=keep, extra_files=extra_files,
                                extra_state=extra_state, on_save_error=on_save_error)

    def load(self, checkpoint_dir: os.PathLike) -> Dict[str, Any]:
        """Restore the average and progress from a snapshot written at any world size (collective)."""
        return self.engine.load(checkpoint_dir, self._source)


class _Source(TorchSource):
    """The torch source with the face's state options."""

    def __init__(self, model: nn.Module, check_finite: bool) -> None:
        super().__init__(model)
        self._check_finite = check_finite

    def make_state(self, **options: Any) -> Any:
        options.setdefault("check_finite", self._check_finite)
        return super().make_state(**options)


def _scalar(metric: Any) -> Any:
    """A metric as a Python float (a 0-d tensor is moved to the host once, at epoch end)."""
    if isinstance(metric, torch.Tensor):
        return float(metric.detach().float().cpu())
    return metric


def _host(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
