"""Estimator families: how one cell is trained, and how its ranks are launched.

A family is a small object with ``estimators`` (names it can build), ``launch(ranks, argv)`` (the command line that
starts a worker on that many ranks), ``seed(seed)`` (every generator its training and forecasting draw from),
``versions()`` and ``train(cell, budget, data, workdir) -> Trained``. The worker and the
report are family-neutral: ``gluonts.torch`` (``torch_family.py``: Lightning with ``iteravg.lightning``) is one more
class, registered in ``FAMILIES``, with its entries in ``grid.PROFILES``.

The MXNet family trains GluonTS's ``gluonts.mx`` estimators with ``iteravg.gluonts.Trainer`` (GluonTS's Trainer on
one process; data-parallel on several ranks) and iteravg's ``ModelIterationAveraging``:

=============  ==================================================================================================
method         callbacks
=============  ==================================================================================================
none           GluonTS's defaults: ``LearningRateReduction`` and ``ModelAveraging(SelectNBestMean(1))`` (the
               best epoch by training loss replaces the network at train end). The last iterate is also kept.
nta            ``ModelIterationAveraging(NTA(epochs))``: GluonTS's defaults ``n=5``, ``eta=0``
alpha_suffix   ``ModelIterationAveraging(Alpha_Suffix(epochs))``: GluonTS's default ``alpha=0.75``
ema            ``ModelIterationAveraging(EMA(decay=0.999), recount_epoch_end=False)``: timm's warmup
=============  ==================================================================================================

With an averaging callback iteravg's Trainer leaves out the default ``ModelAveraging`` (it would replace the
average) and keeps ``LearningRateReduction``. No validation data is passed, so averaging never changes the
training trajectory: within a seed every method trains the same iterates (the report checks this by hash).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .grid import Budget, Cell

EMA_DECAY = 0.999


@dataclass
class Trained:
    """A trained cell: the predictor to evaluate, and optionally a second model (the last iterate) to load into it
    after the first evaluation."""

    predictor: Any
    info: Dict[str, Any]
    load_last_iterate: Optional[Callable[[], None]] = None


def params_sha256(net: Any) -> str:
    digest = hashlib.sha256()
    for p in net.collect_params().values():
        digest.update(np.ascontiguousarray(p.data().asnumpy()).tobytes())
    return digest.hexdigest()


class MXFamily:
    """``gluonts.mx`` estimators, trained by ``iteravg.gluonts.Trainer`` with ``iteravg.mx`` averaging."""

    name = "mx"
    estimators = ("sff", "deepar")

    def __init__(self, comm: str = "mpi") -> None:
        if comm not in ("mpi", "horovod"):
            raise ValueError(f"comm must be 'mpi' (mpi4py) or 'horovod', got {comm!r}")
        self.comm = comm

    def launch(self, ranks: int, argv: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
        """One process: the worker itself. Several: ``mpirun`` (mpi4py by default; ``horovod`` to use Horovod)."""
        if ranks == 1:
            return [sys.executable, *argv], {}
        mpirun = shutil.which("mpirun") or "mpirun"
        return ([mpirun, "-np", str(ranks), "--oversubscribe", "--bind-to", "none", sys.executable, *argv],
                {"ITERAVG_COMM": self.comm})

    def seed(self, seed: int) -> None:
        """Seed every generator this family's training or forecasting draws from."""
        import mxnet as mx

        mx.random.seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def versions(self) -> Dict[str, str]:
        import gluonts
        import mxnet as mx

        return {"gluonts": gluonts.__version__, "mxnet": mx.__version__}

    def build(self, cell: Cell, budget: Budget, data: Any, trainer: Any) -> Any:
        spec = data.spec
        model = dict(budget.model)
        context = int(model.pop("context_multiple", 1) * spec.prediction_length)
        batch = budget.per_rank_batch(cell.ranks)
        if cell.estimator == "sff":
            from gluonts.mx import SimpleFeedForwardEstimator

            return SimpleFeedForwardEstimator(prediction_length=spec.prediction_length, context_length=context,
                                              batch_size=batch, trainer=trainer, **model)
        if cell.estimator == "deepar":
            from gluonts.mx import DeepAREstimator

            return DeepAREstimator(freq=spec.freq, prediction_length=spec.prediction_length, context_length=context,
                                   batch_size=batch, trainer=trainer, **model)
        raise ValueError(f"the mx family has no estimator {cell.estimator!r}; it has {', '.join(self.estimators)}")

    def callbacks(self, cell: Cell, budget: Budget) -> Tuple[List[Any], Any]:
        """(averaging callbacks, strategy or None) for the cell's method."""
        from iteravg.mx import EMA, NTA, Alpha_Suffix, ModelIterationAveraging

        if cell.method == "none":
            return [], None
        if cell.method == "nta":
            strategy = NTA(epochs=budget.epochs)
            return [ModelIterationAveraging(strategy)], strategy
        if cell.method == "alpha_suffix":
            strategy = Alpha_Suffix(epochs=budget.epochs)
            return [ModelIterationAveraging(strategy)], strategy
        if cell.method == "ema":
            strategy = EMA(decay=EMA_DECAY)
            return [ModelIterationAveraging(strategy, recount_epoch_end=False)], strategy
        raise ValueError(f"unknown method {cell.method!r}")

    def train(self, cell: Cell, budget: Budget, data: Any, workdir: Path) -> Trained:
        import mxnet as mx
        from gluonts.core.settings import let
        from gluonts.env import env

        from iteravg.gluonts import Trainer

        self.seed(cell.seed)
        recorder = _recorder(workdir / "last-iterate.params")
        averaging, strategy = self.callbacks(cell, budget)
        trainer = Trainer(ctx="cpu", epochs=budget.epochs, num_batches_per_epoch=budget.batches_per_epoch,
                          learning_rate=budget.learning_rate, callbacks=[recorder, *averaging])
        estimator = self.build(cell, budget, data, trainer)
        with let(env, use_tqdm=False):
            predictor = estimator.train(data.train)
        info: Dict[str, Any] = {
            "epoch_losses": recorder.losses,
            "last_iterate_sha256": recorder.last_sha256,
            "final_sha256": params_sha256(predictor.prediction_net),
            "averaging_started": None if strategy is None else bool(strategy.averaging_started),
            "trigger_epoch": None if strategy is None else strategy.schedule.trigger_epoch,
            "average_counter": None if strategy is None else int(strategy.average_counter),
        }
        load_last = None
        if cell.method == "none" and recorder.path.exists():
            def load_last() -> None:
                # GluonTS's own copy_parameters does this: save from one network, load into the other.
                predictor.prediction_net.load_parameters(str(recorder.path), ctx=mx.cpu(), ignore_extra=True)
        return Trained(predictor=predictor, info=info, load_last_iterate=load_last)


def _recorder(path: Path) -> Any:
    from gluonts.mx.trainer.callback import Callback

    class LastIterate(Callback):
        """Epoch losses (as the callbacks see them: reduced across ranks) and the last training iterate, captured
        at train end before any averaging callback or ``ModelAveraging`` replaces the network (it comes first)."""

        def __init__(self) -> None:
            self.path = path
            self.losses: List[float] = []
            self.last_sha256 = ""

        def on_epoch_end(self, epoch_no, epoch_loss, training_network, trainer, best_epoch_info, ctx) -> bool:
            self.losses.append(float(epoch_loss))
            return True

        def on_train_end(self, training_network, temporary_dir=None, ctx=None) -> None:
            self.last_sha256 = params_sha256(training_network)
            if path.exists():
                os.unlink(path)
            training_network.save_parameters(str(path))  # rank 0 only under iteravg's Trainer

    return LastIterate()


def _torch_family(**kwargs: Any) -> Any:
    from .torch_family import TorchFamily  # imports torch and Lightning only in the workers that train with them

    return TorchFamily(**kwargs)


FAMILIES: Dict[str, Callable[..., Any]] = {"mx": MXFamily, "torch": _torch_family}


def family(name: str, **kwargs: Any) -> Any:
    if name not in FAMILIES:
        raise ValueError(f"unknown estimator family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name](**kwargs)
