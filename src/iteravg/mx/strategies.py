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
* ``sharded``: data-parallel training only -- each rank folds and keeps 1/N of the average, gathered for swaps and
  snapshots (``iteravg.Averager``'s ``sharded``); ``iteravg.gluonts.Trainer`` turns it on unless it is given.
* ``posthoc``, ``posthoc_keep``: also keep what rebuilds, after training, the average from any epoch on
  (``iteravg.Averager``'s ``posthoc``; ``iteravg posthoc RUN``; ``docs/posthoc.md``).

The numbers are GluonTS's: the same trigger decisions and ``a += alpha * (x - a)`` in the parameters' dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

import mxnet as mx
import numpy as np
from mxnet import gluon

from ..comm import Communicator
from ..core.averaged import AveragedState
from ..core.engine import Averager
from ..core.schedules import AlphaSuffixSchedule, EMASchedule, NTASchedule, Schedule, check_eta
from .binding import ModelBinding
from .ndarray import flat_allocator

__all__ = ["IterationAveragingStrategy", "NTA", "Alpha_Suffix", "EMA"]


class IterationAveragingStrategy:
    r"""Polynomial-decay iteration averaging (Shamir & Zhang, 2013), parameterized by ``eta``.

    Folds iterate k into the average with weight :math:`\alpha_k = (\eta + 1) / (\eta + k)`;
    ``eta = 0`` is the plain mean. This base class has no trigger of its own (``update_average_trigger``
    raises ``NotImplementedError``, as in GluonTS); set ``averaging_started = True`` to average every
    iterate, or use ``NTA`` / ``Alpha_Suffix``.

    The work is done by ``averager`` (``iteravg.Averager``, framework-neutral); this class translates GluonTS's
    names and Gluon blocks onto it.
    """

    def __init__(
        self,
        eta: float = 0,
        *,
        comm: Union[None, str, Communicator] = None,
        metric_reduce: str = "mean",
        sync: str = "mean",
        sync_every_batches: int = 0,
        sharded: Optional[bool] = None,
        posthoc: bool = False,
        posthoc_keep: Optional[int] = None,
    ) -> None:
        self._setup(Schedule(eta=eta), comm, metric_reduce, sync, sync_every_batches, sharded, posthoc, posthoc_keep)

    def _setup(self, schedule: Schedule, comm: Any, metric_reduce: str, sync: str, sync_every_batches: int,
               sharded: Optional[bool], posthoc: bool = False, posthoc_keep: Optional[int] = None) -> None:
        if sharded is not None and not isinstance(sharded, bool):
            raise ValueError(f"sharded must be None, True or False, got {sharded!r}")
        self._comm_arg = comm if comm is None or isinstance(comm, str) else None  # what serialises
        self._sharded_arg = sharded  # None: the default, which iteravg.gluonts.Trainer turns on
        self.averager = Averager(schedule, comm, metric_reduce=metric_reduce, sync=sync,
                                 sync_every_batches=sync_every_batches, sharded=bool(sharded), alloc=flat_allocator,
                                 posthoc=posthoc, posthoc_keep=posthoc_keep)
        self._binding: Optional[ModelBinding] = None
        self._named: Dict[tuple, Dict[str, mx.nd.NDArray]] = {}  # NDArray views per buffer set, built once
        self._averaged_view = _LiveArrays(self._averaged_arrays)
        self._cached_view = _LiveArrays(self._cached_arrays)

    # -- configuration ---------------------------------------------------------------------------
    schedule = property(lambda self: self.averager.schedule)
    comm = property(lambda self: self.averager.comm)
    metric_reduce = property(lambda self: self.averager.metric_reduce)
    sync = property(lambda self: self.averager.sync_mode)
    sync_every_batches = property(lambda self: self.averager.sync_every_batches)

    def __repr__(self) -> str:
        args, kwargs = self.__getnewargs_ex__()
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"

    #: Constructor argument -> schedule attribute, in the constructor's order (``gluonts.core.serde``, ``repr``).
    _ARGS: Dict[str, str] = {"eta": "eta"}

    def __getnewargs_ex__(self) -> tuple:
        """The constructor arguments, so ``gluonts.core.serde`` can serialise an estimator whose trainer holds this
        strategy (GluonTS's ``@validated`` classes serialise this way). A communicator object is not serialised."""
        kwargs: Dict[str, Any] = {arg: getattr(self.schedule, attr) for arg, attr in self._ARGS.items()}
        kwargs.update(comm=self._comm_arg, metric_reduce=self.metric_reduce, sync=self.sync,
                      sync_every_batches=self.sync_every_batches)
        if self._sharded_arg is not None:
            kwargs["sharded"] = self._sharded_arg
        if self.averager.posthoc:
            kwargs.update(posthoc=True, posthoc_keep=self.averager.posthoc_keep)
        return (), kwargs

    # -- GluonTS's attributes (assignable where GluonTS's are) -----------------------------------
    @property
    def eta(self) -> float:
        return self.schedule.eta

    @eta.setter
    def eta(self, value: float) -> None:
        self.schedule.eta = check_eta(value)

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
    def averaged_model(self) -> Optional[Mapping[str, mx.nd.NDArray]]:
        """name -> NDArray (keyed like ``collect_params()``), or ``None`` before the first fold. O(1).

        A held mapping stays current, as GluonTS's dict does: each lookup returns a view of the average as it is
        now. (An NDArray looked up earlier is a view valid until the next fold.)
        """
        return self._averaged_view if self.averager.has_average else None

    @averaged_model.setter
    def averaged_model(self, value: Optional[Mapping[str, Any]]) -> None:
        """``None`` forgets the average (the next fold copies the iterate, as in GluonTS); a dict replaces it."""
        if value is None:
            self.averager.reset()
            return
        binding = self._require_binding("averaged_model")
        arrays = {binding.structural[k]: _to_numpy(v) for k, v in value.items()}
        self.averager.load_state_dict(dict(self.averager.state_dict(), has_average=True), tensors=arrays)

    @property
    def cached_model(self) -> Optional[Mapping[str, mx.nd.NDArray]]:
        """The training weights saved by the last ``load_averaged_model``, or ``None``."""
        return self._cached_view if self.averager.cached() is not None else None

    @cached_model.setter
    def cached_model(self, value: Optional[Mapping[str, Any]]) -> None:
        if value is not None:
            raise ValueError("cached_model can only be reset to None (load_averaged_model fills it)")
        self.averager.drop_cache()

    # -- GluonTS's methods -----------------------------------------------------------------------
    def update_average_trigger(self, metric: Any = None, epoch: int = 0, **kwargs: Any) -> None:
        """Decide whether averaging starts. Distributed: the metric is first reduced across ranks."""
        self.averager.update_trigger(metric, epoch)

    def apply(self, model: gluon.Block) -> Optional[Mapping[str, mx.nd.NDArray]]:
        """Fold ``model``'s current iterate if averaging has started; returns the averaged model. O(1) calls."""
        self.averager.step(self._source(model))
        return self.averaged_model

    def update_average(self, model: gluon.Block, *, check_arrays: bool = False) -> None:
        """Fold the current iterate: the first is copied, later ones weighted by ``(eta+1)/(eta+k)``.

        An iterate with a NaN or inf anywhere is refused (average and counter unchanged, a warning logged).
        ``check_arrays`` also checks that the model's parameter arrays were not replaced (O(tensors)).
        """
        self.averager.fold(self._source(model, check_arrays))

    def load_averaged_model(self, model: gluon.Block, *, sync: bool = True) -> None:
        """Save the training weights, then put the averaged weights into ``model`` (validation, train end).

        ``sync=True``: the average is synced first (a collective: call it on every rank), so every rank loads the
        same bits. For validation on rank 0 only (``if hvd.rank() == 0: ...``) pass ``sync=False``: no collective,
        rank 0 loads its average as of the last sync (every epoch end syncs).
        """
        self.averager.load_averaged(self._source(model, True), sync=sync)

    def load_cached_model(self, model: gluon.Block) -> None:
        """Put the weights saved by ``load_averaged_model`` back (no-op if nothing was cached)."""
        if self.averager.cached() is not None:
            self.averager.restore_training(self._source(model, True))
        elif self._binding is not None and model is self._binding.net:
            # Nothing to swap back, but a validation forward may have left oneDNN-blocked weights, which MXNet
            # itself cannot always train on (several contexts): one C call puts them back in the default layout.
            self._binding.plan()

    @contextlib.contextmanager
    def averaged_weights(self, model: gluon.Block, *, sync: bool = True) -> Iterator[gluon.Block]:
        """``with strategy.averaged_weights(net): evaluate(net)`` -- the averaged weights inside, the training
        weights restored on exit even if the body raises. ``sync`` as in ``load_averaged_model``."""
        with self.averager.swapped(self._source(model, True), sync=sync):
            yield model

    # -- distribution ----------------------------------------------------------------------------
    def sync_average(self) -> None:
        """Make the averaged model bitwise identical on all ranks (collective: call it on every rank alike)."""
        self.averager.sync()

    def finalize(self, model: gluon.Block) -> bool:
        """Train end: the synced average into ``model``; without one, every rank gets rank 0's weights (warned)."""
        return self.averager.finalize(self._source(model, True))

    # -- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The averager's replicated progress (schedule, counters, layout) as JSON-able data."""
        return self.averager.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.averager.load_state_dict(state)

    @property
    def averaged_state(self) -> Optional[AveragedState]:
        """The framework-neutral averaged state (flat buffers), or ``None`` before the first fold."""
        return self.averager.state

    @property
    def binding(self) -> Optional[ModelBinding]:
        return self._binding

    def bind(self, model: gluon.Block) -> ModelBinding:
        """Bind ``model`` now (collective on first use: ranks check they hold the same model)."""
        return self._source(model, True)

    # -- internals -------------------------------------------------------------------------------
    def _source(self, model: gluon.Block, check_arrays: bool = False) -> ModelBinding:
        """The binding of ``model``: per step only ``model is bound`` is checked (O(1)); ``check_arrays`` also
        compares the parameter arrays (O(tensors)) and re-binds if they were replaced."""
        b = self._binding
        if b is None or model is not b.net or (check_arrays and not b.matches(model)):
            b = ModelBinding(model)
            self.averager.bind(b)
            self._binding = b
            self._named.clear()
        return b

    def _require_binding(self, what: str) -> ModelBinding:
        if self._binding is None:
            raise ValueError(f"{what} can be assigned once the strategy has seen the model (after a fold)")
        return self._binding

    def _named_views(self, natives: List[Any]) -> Dict[str, mx.nd.NDArray]:
        key = tuple(id(n) for n in natives)
        named = self._named.get(key)
        if named is None:
            binding = self._binding
            assert binding is not None
            named = {}
            for pname, spec in zip(binding.param_names, binding.layout.specs):
                g, start = binding.layout.offsets[spec.name]
                named[pname] = natives[g][start : start + spec.size].reshape(spec.shape)
            if len(self._named) > 4:
                self._named.clear()
            self._named[key] = named
        return named

    def default_sharded(self, sharded: bool) -> None:
        """Set ``sharded`` unless the user chose it (``iteravg.gluonts.Trainer`` shards by default); only before the
        strategy first saw the model."""
        if self._sharded_arg is None and self.averager.state is None and not self.averager.posthoc:
            self.averager.sharded = bool(sharded)  # posthoc=True keeps whole sums: it stays unsharded

    def _averaged_arrays(self) -> Dict[str, mx.nd.NDArray]:
        state = self.averager.state
        assert state is not None
        if state.partitioned:
            raise ValueError("averaged_model is split across ranks with sharded=True (each holds a slice): use "
                             "averaged_weights(net) / load_averaged_model(net) on every rank, or sharded=False")
        return self._named_views([state.native(g) for g in range(len(state.layout.groups))])

    def _cached_arrays(self) -> Dict[str, mx.nd.NDArray]:
        cache = self.averager.cached()
        assert cache is not None
        return self._named_views([c[1] for c in cache])


class _LiveArrays(Mapping):
    """A read-only mapping that resolves every lookup against the current buffers (so a held one stays current)."""

    def __init__(self, resolve: Callable[[], Dict[str, mx.nd.NDArray]]) -> None:
        self._resolve = resolve

    def __getitem__(self, key: str) -> mx.nd.NDArray:
        return self._resolve()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._resolve())

    def __len__(self) -> int:
        return len(self._resolve())

    def __repr__(self) -> str:
        return f"<averaged model: {len(self)} tensors>"


def _to_numpy(value: Any) -> np.ndarray:
    return value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)


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
        sharded: Optional[bool] = None,
        posthoc: bool = False,
        posthoc_keep: Optional[int] = None,
    ) -> None:
        schedule = NTASchedule(epochs, n=n, maximize=maximize, last_n_trigger=last_n_trigger, eta=eta,
                               fallback_alpha=fallback_alpha)
        self._setup(schedule, comm, metric_reduce, sync, sync_every_batches, sharded, posthoc, posthoc_keep)

    _ARGS = {"epochs": "epochs", "n": "n", "maximize": "maximize", "last_n_trigger": "last_n_trigger", "eta": "eta",
             "fallback_alpha": "fallback_alpha"}
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
        sharded: Optional[bool] = None,
        posthoc: bool = False,
        posthoc_keep: Optional[int] = None,
    ) -> None:
        self._setup(AlphaSuffixSchedule(epochs, alpha=alpha, eta=eta), comm, metric_reduce, sync, sync_every_batches,
                    sharded, posthoc, posthoc_keep)

    _ARGS = {"epochs": "epochs", "alpha": "alpha", "eta": "eta"}
    alpha_suffix = property(lambda self: self.schedule.alpha_suffix)


class EMA(IterationAveragingStrategy):
    """Exponential moving average of the iterates (``iteravg.EMASchedule``: timm's ``ModelEmaV3`` form).

    Not in GluonTS: an addition on the same interface, so GluonTS's Trainer and iteravg's callback drive it like
    ``NTA``. Every training step is folded from the first (or after ``update_after_step`` steps) with weight
    ``1 - decay_k``, ``decay_k = clamp(1 - (1 + k / warmup_gamma) ** -warmup_power, min_decay, decay)`` after
    ``k`` folds (``warmup=False``: ``decay`` throughout); the first fold copies the iterate. There is no trigger.

    ``ModelIterationAveraging(EMA(...))`` does not re-fold the epoch's last iterate at epoch end (GluonTS's recount
    would count it twice, which an EMA does not do).
    """

    #: Read by ``ModelIterationAveraging``: every step is folded, so the epoch-end recount is off by default.
    folds_every_step = True

    def __init__(
        self,
        decay: float = 0.9999,
        *,
        min_decay: float = 0.0,
        warmup: bool = True,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2.0 / 3.0,
        update_after_step: int = 0,
        comm: Union[None, str, Communicator] = None,
        metric_reduce: str = "mean",
        sync: str = "mean",
        sync_every_batches: int = 0,
        sharded: Optional[bool] = None,
    ) -> None:
        schedule = EMASchedule(decay, min_decay=min_decay, warmup=warmup, warmup_gamma=warmup_gamma,
                               warmup_power=warmup_power, update_after_step=update_after_step)
        self._setup(schedule, comm, metric_reduce, sync, sync_every_batches, sharded)

    _ARGS = {"decay": "decay", "min_decay": "min_decay", "warmup": "warmup", "warmup_gamma": "warmup_gamma",
             "warmup_power": "warmup_power", "update_after_step": "update_after_step"}
    decay = property(lambda self: self.schedule.decay)
