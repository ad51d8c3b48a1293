"""GluonTS's averaging strategies (``gluonts.mx.trainer.model_iteration_averaging``), distributed.

Same class names, constructor signatures, attributes and methods as GluonTS, so switching is one import::

    # from gluonts.mx.trainer.model_iteration_averaging import NTA, ModelIterationAveraging
    from iteravg.mx import NTA, ModelIterationAveraging

What is added, all keyword-only and defaulting to GluonTS's behaviour on one process:

* ``comm``: ``None`` (auto-detect ``horovodrun`` / ``mpirun``, else single-process), ``"horovod"``, ``"mpi"``,
  ``"local"`` or a communicator object.
* ``metric_reduce``: how per-rank metrics become the one metric every rank's trigger decision uses
  (``"mean"`` of the finite values by default; ``"min"``, ``"max"``, ``"rank0"``).
* ``sync``: how averaged models are made identical across ranks: ``"mean"`` (allreduce-mean, default) or
  ``"broadcast"`` (rank 0's wins).
* ``sync_every_batches``: also sync every k folded iterates (0 = only at epoch end and before use).

The numbers are GluonTS's: the same trigger decisions and ``a += alpha * (x - a)`` in the parameters' dtype.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, Iterator, List, Optional, Union

import mxnet as mx
import numpy as np
from mxnet import gluon

from .. import collectives
from ..comm import Communicator, resolve_comm
from ..core.averaged import AveragedState
from ..core.schedules import AlphaSuffixSchedule, NTASchedule, Schedule
from ._binding import ModelBinding
from ._ndarray import flat_allocator

logger = logging.getLogger("iteravg")

__all__ = ["IterationAveragingStrategy", "NTA", "Alpha_Suffix"]


class IterationAveragingStrategy:
    r"""Polynomial-decay iteration averaging (Shamir & Zhang, 2013), parameterized by ``eta``.

    Folds iterate k into the average with weight :math:`\alpha_k = (\eta + 1) / (\eta + k)`;
    ``eta = 0`` is the plain mean. This base class has no trigger of its own (``update_average_trigger``
    raises ``NotImplementedError``, as in GluonTS); set ``averaging_started = True`` to average every
    iterate, or use ``NTA`` / ``Alpha_Suffix``.
    """

    def __init__(
        self,
        eta: float = 0,
        *,
        comm: Union[None, str, Communicator] = None,
        metric_reduce: str = "mean",
        sync: str = "mean",
        sync_every_batches: int = 0,
    ) -> None:
        self._init(Schedule(eta=eta), comm, metric_reduce, sync, sync_every_batches)

    def _init(self, schedule: Schedule, comm: Any, metric_reduce: str, sync: str, sync_every_batches: int) -> None:
        if metric_reduce not in collectives.METRIC_REDUCTIONS:
            raise ValueError(
                f"metric_reduce must be one of {', '.join(collectives.METRIC_REDUCTIONS)}, got {metric_reduce!r}"
            )
        if sync not in ("mean", "broadcast"):
            raise ValueError(f"sync must be 'mean' or 'broadcast', got {sync!r}")
        if isinstance(sync_every_batches, bool) or not isinstance(sync_every_batches, int) or sync_every_batches < 0:
            raise ValueError(f"sync_every_batches must be an integer >= 0, got {sync_every_batches!r}")
        self.schedule = schedule
        self.comm: Communicator = resolve_comm(comm)
        self.metric_reduce = metric_reduce
        self.sync = sync
        self.sync_every_batches = sync_every_batches
        self._binding: Optional[ModelBinding] = None
        self._state: Optional[AveragedState] = None
        self._cache: Optional[List[np.ndarray]] = None  # flat per-dtype copy of the training weights
        self._cache_nd: List[Any] = []
        self._layout_checked = False
        self._dirty = False  # update_average was called since the last sync (same on every rank)
        self._since_sync = 0

    # -- GluonTS's attributes --------------------------------------------------------------------
    @property
    def eta(self) -> float:
        return self.schedule.eta

    @property
    def average_counter(self) -> int:
        return self.schedule.average_counter

    @average_counter.setter
    def average_counter(self, value: int) -> None:
        self.schedule.average_counter = int(value)

    @property
    def averaging_started(self) -> bool:
        return self.schedule.averaging_started

    @averaging_started.setter
    def averaging_started(self, value: bool) -> None:
        self.schedule.averaging_started = bool(value)

    @property
    def averaged_model(self) -> Optional[Dict[str, mx.nd.NDArray]]:
        """name -> NDArray (keyed like ``collect_params()``), or ``None`` before the first fold.

        The arrays are views of the averaged state (no copy); they stay valid until the next fold.
        """
        if self._state is None or self.schedule.average_counter == 0:
            return None
        return self._named_arrays(self._state_groups_nd())

    @property
    def cached_model(self) -> Optional[Dict[str, mx.nd.NDArray]]:
        """The training weights saved by the last ``load_averaged_model``, or ``None``."""
        if self._cache is None:
            return None
        return self._named_arrays(self._cache_nd)

    def _state_groups_nd(self) -> List[Any]:
        assert self._state is not None
        return [self._state.native(g) for g in range(len(self._state.layout.groups))]

    def _named_arrays(self, groups: List[Any]) -> Dict[str, mx.nd.NDArray]:
        assert self._binding is not None
        out = {}
        for name, spec in zip(self._binding.param_names, self._binding.layout.specs):  # GluonTS's keys
            g, start = self._binding.layout.offsets[spec.name]
            out[name] = groups[g][start : start + spec.size].reshape(spec.shape)
        return out

    # -- GluonTS's methods -----------------------------------------------------------------------
    def update_average_trigger(self, metric: Any = None, epoch: int = 0, **kwargs: Any) -> None:
        """Decide whether averaging starts. Distributed: the metric is first reduced across ranks."""
        if self.schedule.needs_metric(epoch):
            metric = collectives.consensus_metric(self.comm, metric, self.metric_reduce)
        self.schedule.update_trigger(metric, epoch)

    def apply(self, model: gluon.Block) -> Optional[Dict[str, mx.nd.NDArray]]:
        """Fold ``model``'s current iterate if averaging has started; returns the averaged model."""
        self._apply(model)
        return self.averaged_model

    def _apply(self, model: gluon.Block) -> None:
        """``apply`` without building the returned dict: O(1) Python calls per step (plus O(P/bucket))."""
        if self.schedule.averaging_started:
            self.update_average(model)

    def update_average(self, model: gluon.Block) -> None:
        """Fold the current iterate: the first is copied, later ones weighted by ``(eta+1)/(eta+k)``.

        An iterate with a NaN or inf anywhere is refused (the average and the counter stay unchanged) and a
        warning is logged: one diverged step must not poison the average.
        """
        binding = self._bind(model, full_check=False)
        assert self._state is not None
        result = self._state.fold(binding.plan(), binding.fold_weight(self.schedule.peek_weight()))
        # Sync bookkeeping counts attempts, not successful folds: it decides when collectives run, so it must
        # be the same on every rank even if one rank refused an iterate.
        self._dirty = True
        self._since_sync += 1
        if result.folded:
            self.schedule.next_weight()
        else:
            logger.warning(
                "iteravg: the model holds NaN or inf values; this iterate was not folded into the average "
                "(refused so far: %d)", self._state.refused_nonfinite,
            )
        if self.sync_every_batches and self._since_sync >= self.sync_every_batches:
            self.sync_average()

    def load_averaged_model(self, model: gluon.Block) -> None:
        """Save the training weights, then put the averaged weights into ``model`` (for validation / at the end).

        Distributed: the average is synced first, so every rank loads the same, bitwise-identical weights.
        """
        if self._state is None:  # replicated: the state exists once any rank attempted a fold
            return
        binding = self._bind(model, full_check=True)
        # Decided together, so that whether the sync runs never depends on per-rank batch counts; afterwards
        # the counter is the maximum over ranks, so the early return below is taken on all ranks or none.
        self.sync_average(decide_together=True)
        if self.schedule.average_counter == 0:  # every iterate so far was refused: nothing to load
            return
        if self._cache is None:
            pairs = [flat_allocator(n, np.dtype(dt)) for dt, n in zip(binding.layout.groups, binding.layout.group_sizes)]
            self._cache = [p[0] for p in pairs]
            self._cache_nd = [p[1] for p in pairs]
        binding.read(self._cache)
        binding.write([self._state.current(g) for g in range(len(binding.layout.groups))])

    def load_cached_model(self, model: gluon.Block) -> None:
        """Put the weights saved by ``load_averaged_model`` back (no-op if nothing was cached)."""
        if self._cache is None:
            return
        self._bind(model, full_check=True).write(self._cache)

    @contextlib.contextmanager
    def averaged_weights(self, model: gluon.Block) -> Iterator[gluon.Block]:
        """``with strategy.averaged_weights(net): evaluate(net)`` -- the averaged weights inside, the training
        weights restored on exit even if the body raises (collective on entry, like ``load_averaged_model``)."""
        self.load_averaged_model(model)
        try:
            yield model
        finally:
            self.load_cached_model(model)

    # -- distribution ----------------------------------------------------------------------------
    def sync_average(self, decide_together: bool = False) -> None:
        """Make the averaged model bitwise identical on all ranks (collective; no-op on one rank).

        Call it on every rank at the same point. Skipped when no fold was attempted since the last sync --
        a per-rank fact, so the hooks pass ``decide_together=True``: one tiny collective first tells every
        rank whether *any* rank folded, and all skip or all sync, whatever each rank's batch count was.
        (Syncing unchanged buffers is not harmless: a mean over 3 ranks can change the last bit.)
        """
        if self._state is None:
            return
        dirty = self._dirty
        if decide_together:
            dirty = collectives.any_rank(self.comm, dirty)
        if not dirty:
            return
        self.schedule.average_counter = collectives.sync_average(
            self.comm, self._state, self.schedule.average_counter, mode=self.sync
        )
        self._dirty = False
        self._since_sync = 0

    def _bind(self, model: gluon.Block, full_check: bool) -> ModelBinding:
        """Bind ``model`` once; re-bind (same layout required) if its parameter arrays were replaced.

        Per step only ``model is bound`` is checked (O(1)); ``full_check`` also compares the arrays (O(tensors)),
        which the epoch-level hooks do.
        """
        b = self._binding
        if b is not None and model is b.net and (not full_check or b.matches(model)):
            return b
        new = ModelBinding(model)
        if not self._layout_checked:
            collectives.check_same_layout(self.comm, new.layout)
            self._layout_checked = True
        if self._state is None:
            self._state = AveragedState(new.layout, alloc=flat_allocator)
        elif new.layout != self._state.layout:
            raise ValueError(
                "the model's parameters changed (names, shapes or dtypes) since averaging began; "
                "an averaging strategy follows one network -- create a new strategy for a new network"
            )
        self._binding = new
        return new

    # -- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The strategy's replicated state (counter, started flag, NTA logs) as JSON-able data."""
        state = self.schedule.state_dict()
        state["refused_nonfinite"] = 0 if self._state is None else self._state.refused_nonfinite
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)
        if self._state is not None:
            self._state.refused_nonfinite = int(state.get("refused_nonfinite", 0))

    @property
    def averaged_state(self) -> Optional[AveragedState]:
        """The framework-neutral averaged state (flat buffers), or ``None`` before the first fold."""
        return self._state

    @property
    def binding(self) -> Optional[ModelBinding]:
        return self._binding


class NTA(IterationAveragingStrategy):
    """Non-monotonically triggered averaging (AWD-LSTM's NT-ASGD), as GluonTS's ``NTA``.

    Starts averaging at the first epoch whose metric is worse than the best of ``val_logs[:-n]``
    (``last_n_trigger=False``) or ``val_logs[-n:]`` (``True``), or at epoch ``epochs * (1 - fallback_alpha)``.
    ``n <= 0`` disables the metric trigger. Distributed, the metric is reduced across ranks first
    (``metric_reduce``), so all ranks start averaging at the same epoch.
    """

    def __init__(
        self,
        epochs: int,
        n: int = 5,
        maximize: bool = False,
        last_n_trigger: bool = False,
        eta: float = 0,
        fallback_alpha: float = 0.05,
        *,
        comm: Union[None, str, Communicator] = None,
        metric_reduce: str = "mean",
        sync: str = "mean",
        sync_every_batches: int = 0,
    ) -> None:
        schedule = NTASchedule(epochs, n=n, maximize=maximize, last_n_trigger=last_n_trigger, eta=eta,
                               fallback_alpha=fallback_alpha)
        self._init(schedule, comm, metric_reduce, sync, sync_every_batches)

    n = property(lambda self: self.schedule.n)
    maximize = property(lambda self: self.schedule.maximize)
    last_n_trigger = property(lambda self: self.schedule.last_n_trigger)
    val_logs = property(lambda self: self.schedule.val_logs)
    fallback_alpha_suffix = property(lambda self: self.schedule.fallback_alpha_suffix)


class Alpha_Suffix(IterationAveragingStrategy):  # noqa: N801 -- GluonTS's name
    """Suffix averaging: average the iterates of the last ``alpha`` share of the epochs, as GluonTS's."""

    def __init__(
        self,
        epochs: int,
        alpha: float = 0.75,
        eta: float = 0,
        *,
        comm: Union[None, str, Communicator] = None,
        metric_reduce: str = "mean",
        sync: str = "mean",
        sync_every_batches: int = 0,
    ) -> None:
        self._init(AlphaSuffixSchedule(epochs, alpha=alpha, eta=eta), comm, metric_reduce, sync, sync_every_batches)

    alpha_suffix = property(lambda self: self.schedule.alpha_suffix)
