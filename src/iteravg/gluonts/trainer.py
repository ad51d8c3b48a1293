"""``iteravg.gluonts.Trainer``: GluonTS's MXNet ``Trainer``, data-parallel under ``horovodrun`` and ``mpirun``.

On one process it *is* GluonTS's ``gluonts.mx.trainer.Trainer`` (same constructor, same loop, same numbers), with
one deliberate difference: when the callbacks hold a ``ModelIterationAveraging`` (iteravg's or GluonTS's), the
default ``ModelAveraging`` callback is not added, because at train end it would replace the iteration-averaged
network by the best epoch's parameters (a warning says so; pass ``ModelAveraging(...)`` yourself to keep it).

On several ranks (``get_comm()`` finds the launcher) it runs GluonTS's own loop with the pieces of
``iteravg.gluonts._run`` plugged in: initial parameters broadcast from rank 0, gradients averaged every step,
per-rank data windows, epoch losses reduced before any callback sees them, every stop decision agreed, per-epoch
parameter files and progress bars on rank 0 only, ``ModelAveraging`` computed on rank 0 and broadcast, and a final
check that every rank holds the same bits.
"""


import inspect
import logging
import warnings
from typing import Any, List, Optional, Union

import mxnet as mx

from ..comm import get_comm, launcher_rank
from . import _run

logger = logging.getLogger("iteravg")

SUPPORTED = "0.17"

__all__ = ["Trainer", "GluonTSVersionError", "SUPPORTED", "check_gluonts"]


class GluonTSVersionError(ImportError):
    """The installed GluonTS does not have what ``iteravg.gluonts.Trainer`` plugs into."""


def check_gluonts() -> None:
    """Fail at construction, naming the version, if GluonTS's MXNet trainer changed what we plug into."""
    try:
        import gluonts
        from gluonts.core import settings
        from gluonts.env import env
        from gluonts.mx.trainer import _base, model_averaging
    except ImportError as exc:
        raise GluonTSVersionError(f"iteravg.gluonts needs GluonTS {SUPPORTED} with MXNet (pip install "
                                  f"'gluonts[mxnet]=={SUPPORTED}.*'): {exc}") from exc
    version = getattr(gluonts, "__version__", "unknown")
    missing: List[str] = []
    if getattr(_base, "mx", None) is not mx:
        missing.append("gluonts.mx.trainer._base imports mxnet as `mx`")
    try:
        source = inspect.getsource(_base.Trainer.__call__)
    except (OSError, TypeError):
        source = None
    if source is not None:
        for needle, what in (("mx.gluon.Trainer(", "builds its optimizer with mx.gluon.Trainer(...)"),
                             ("self.callbacks.on_network_initializing_end", "calls on_network_initializing_end"),
                             ("self.halt", "stops on self.halt"),
                             ("net.save_parameters(", "writes per-epoch files with net.save_parameters"),
                             ("train_iter", "iterates train_iter")):
            if needle not in source:
                missing.append(what)
    elif not version.startswith(SUPPORTED + "."):
        missing.append("readable trainer source to check")
    for obj, name in ((model_averaging, "save_epoch_info"), (model_averaging, "EPOCH_INFO_STRING"),
                      (settings, "let"), (env, "use_tqdm")):
        if not hasattr(obj, name):
            missing.append(f"{getattr(obj, '__name__', type(obj).__name__)}.{name}")
    if missing:
        raise GluonTSVersionError(
            f"iteravg.gluonts.Trainer plugs into GluonTS {SUPPORTED}'s MXNet Trainer; the installed GluonTS {version} "
            f"differs: {'; '.join(missing)}. Install gluonts=={SUPPORTED}.* or use GluonTS's own Trainer on one "
            "process."
        )


check_gluonts()

from gluonts.core import settings as _settings  # noqa: E402 -- after the check, which explains failures
from gluonts.core.component import validated  # noqa: E402
from gluonts.env import env as _env  # noqa: E402
from gluonts.mx.trainer import Trainer as _GluonTSTrainer  # noqa: E402
from gluonts.mx.trainer.callback import Callback  # noqa: E402
from gluonts.mx.trainer.learning_rate_scheduler import LearningRateReduction  # noqa: E402
from gluonts.mx.trainer.model_averaging import ModelAveraging  # noqa: E402


def _is_iteration_averaging(cb: Any) -> bool:
    from gluonts.mx.trainer.model_iteration_averaging import ModelIterationAveraging as GluonTSMIA

    from ..mx import ModelIterationAveraging

    return isinstance(cb, (GluonTSMIA, ModelIterationAveraging))


def _warn_once(msg: str) -> None:
    """A construction-time warning, said by rank 0 only (every rank constructs the same Trainer)."""
    if launcher_rank() == 0:
        warnings.warn(msg, stacklevel=4)
        logger.warning(msg)


def _default_callbacks(callbacks: List[Any], learning_rate: float, add_default_callbacks: bool) -> List[Any]:
    """GluonTS's default callbacks, minus ``ModelAveraging`` when an iteration-averaging callback is present."""
    callbacks = list(callbacks)
    averaging_at = [i for i, cb in enumerate(callbacks) if _is_iteration_averaging(cb)]
    selecting_at = [i for i, cb in enumerate(callbacks) if isinstance(cb, ModelAveraging)]
    if averaging_at and selecting_at and max(selecting_at) > min(averaging_at):
        msg = ("iteravg.gluonts.Trainer: the ModelAveraging callback comes after a ModelIterationAveraging callback; "
               "at train end it replaces the iteration-averaged network with its own average of the best epochs")
        _warn_once(msg)
    if not add_default_callbacks:
        return callbacks
    if averaging_at and not selecting_at:
        msg = ("iteravg.gluonts.Trainer: GluonTS's default ModelAveraging callback is left out because the callbacks "
               "hold a ModelIterationAveraging: at train end it would replace the iteration-averaged network with "
               "the best epoch's parameters. Pass ModelAveraging(...) in callbacks to have it anyway.")
        _warn_once(msg)
    elif not selecting_at:
        callbacks.append(ModelAveraging(avg_strategy=_select_best()))
    if not any(isinstance(cb, LearningRateReduction) for cb in callbacks):
        callbacks.append(LearningRateReduction(base_lr=learning_rate, patience=10, objective="min"))
    return callbacks


def _select_best() -> Any:
    from gluonts.mx.trainer.model_averaging import SelectNBestMean

    return SelectNBestMean(num_models=1)


class Trainer(_GluonTSTrainer):
    r"""GluonTS's MXNet ``Trainer``, data-parallel under ``horovodrun`` / ``mpirun`` (Horovod or mpi4py).

    Same parameters as ``gluonts.mx.trainer.Trainer`` (see its docstring). The communicator is chosen like every
    iteravg communicator (``ITERAVG_COMM``, else the launcher's environment). With several ranks:

    * ``num_batches_per_epoch`` and the loader's ``batch_size`` are **per rank**: an epoch sees
      ``ranks * num_batches_per_epoch * batch_size`` windows, and each step averages the ranks' gradients, as one
      process with a batch ``ranks`` times larger would;
    * training must run on CPU contexts (``ctx="cpu"``);
    * a batch-level stop (``on_train_batch_end`` returning False) takes effect at the end of the epoch.
    """

    #: Read by ``iteravg.gluonts.guard``: this trainer keeps the ranks' networks identical.
    iteravg_data_parallel = True

    @validated()
    def __init__(
        self,
        ctx: Optional[mx.Context] = None,
        epochs: int = 100,
        num_batches_per_epoch: int = 50,
        learning_rate: float = 1e-3,
        clip_gradient: float = 10.0,
        weight_decay: float = 1e-8,
        init: Union[str, mx.initializer.Initializer] = "xavier",
        hybridize: bool = True,
        callbacks: Optional[List[Callback]] = None,
        add_default_callbacks: bool = True,
    ) -> None:
        super().__init__(
            ctx=ctx, epochs=epochs, num_batches_per_epoch=num_batches_per_epoch, learning_rate=learning_rate,
            clip_gradient=clip_gradient, weight_decay=weight_decay, init=init, hybridize=hybridize,
            callbacks=_default_callbacks(callbacks or [], learning_rate, add_default_callbacks),
            add_default_callbacks=False,
        )

    def __call__(self, net: Any, train_iter: Any, validation_iter: Optional[Any] = None) -> None:
        comm = get_comm()
        if comm.size == 1:
            return super().__call__(net, train_iter, validation_iter)
        ctx = self.ctx if isinstance(self.ctx, mx.Context) else mx.Context(self.ctx)
        if ctx.device_type != "cpu":
            raise ValueError(f"iteravg.gluonts.Trainer: ctx={ctx} is not supported on several ranks; pass ctx='cpu'")
        for cb in getattr(self.callbacks, "callbacks", self.callbacks):  # data-parallel by construction: 1/N of
            # the average per rank, unless the strategy says otherwise
            strategy = getattr(cb, "avg_strategy", None)
            if hasattr(strategy, "default_sharded"):
                strategy.default_sharded(True)
        run = _run.DistributedRun(comm, net, self)
        _run.seed_ranks(comm)
        user_callbacks = self.callbacks
        self.callbacks = _run.DistributedCallbacks(user_callbacks, run)
        try:
            with _run.gluon_trainer_replaced(run), _run.parameter_files_on_root_only(net, comm.rank), \
                    _settings.let(_env, use_tqdm=_env.use_tqdm and comm.rank == 0):
                super().__call__(net, _run.Batches(train_iter, run), validation_iter)
        finally:
            self.callbacks = user_callbacks
        if run.gluon_trainer is None:  # unreachable unless GluonTS changed (the first hook raises first)
            raise RuntimeError("iteravg.gluonts.Trainer: no gradient reduction took place")
        return None
