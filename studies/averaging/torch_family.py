"""The ``gluonts.torch`` family: GluonTS's PyTorch estimators trained by Lightning, with ``iteravg.lightning``.

Each cell calls GluonTS's own ``estimator.train_model``; the only additions are callbacks in ``trainer_kwargs``:

=============  ==================================================================================================
method         callbacks (besides the two recorders below)
=============  ==================================================================================================
none           none: GluonTS's default. ``train_model`` adds ``ModelCheckpoint(monitor="train_loss")`` and
               reloads the epoch with the lowest training loss after ``fit`` (the mx family's ``SelectNBestMean(1)``
               baseline). The last iterate is also kept.
nta            ``IterationAveraging(NTASchedule(epochs), monitor=None)``: GluonTS's defaults ``n=5``, ``eta=0``,
               fallback at 95% of the epochs; the trigger reads the epoch's training loss (no validation data)
alpha_suffix   ``IterationAveraging(AlphaSuffixSchedule(epochs), monitor=None)``: ``alpha=0.75``
ema            ``IterationAveraging(EMASchedule(decay=0.999), monitor=None)``: timm's warmup, as the mx family
=============  ==================================================================================================

With averaging, the evaluated model is the final average: what ``IterationAveraging`` leaves in the model when
``fit`` ends (on every rank), captured by a recorder that runs after it -- as the mx family evaluates the average and
not a best epoch. GluonTS's ``train_model`` itself would return its best-training-loss checkpoint, which holds the
average of that epoch only if averaging had started by then (``docs/lightning.md``); each cell records that epoch and
whether its checkpoint held an average (``gluonts_best_epoch``, ``gluonts_checkpoint_averaged``).

Two ranks: ``torchrun --standalone --nproc_per_node=2`` starts the worker on both (so one job runs many cells), and
every cell trains with Lightning's ``strategy="ddp", devices=2, accelerator="cpu"`` (Lightning picks up torchrun's
environment and reuses the process group) plus ``RankSeeding()``, so each rank draws its own training windows.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .families import EMA_DECAY, Trained
from .grid import Budget, Cell


def state_sha256(state: Dict[str, Any]) -> str:
    """SHA-256 of a state dict's floating-point tensors, in key order (the network's weights, bitwise)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key]
        if tensor.is_floating_point():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class TorchFamily:
    """``gluonts.torch`` estimators, trained by Lightning with ``iteravg.lightning.IterationAveraging``."""

    name = "torch"
    estimators = ("sff",)

    def __init__(self, comm: str = "mpi") -> None:
        """``comm`` chooses the mx family's communicator; this family always uses torch.distributed (Lightning's
        DDP process group), so it is accepted and ignored."""
        del comm

    def launch(self, ranks: int, argv: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
        """One process: the worker itself. Several: torchrun on this host (a free port by c10d's rendezvous)."""
        if ranks == 1:
            return [sys.executable, *argv], {}
        return ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *argv],
                {"ITERAVG_COMM": "torch"})

    def seed(self, seed: int) -> None:
        import torch

        np.random.seed(seed)
        random.seed(seed)
        torch.manual_seed(seed)

    def versions(self) -> Dict[str, str]:
        import gluonts
        import lightning
        import torch

        return {"gluonts": gluonts.__version__, "torch": torch.__version__, "lightning": lightning.__version__}

    def build(self, cell: Cell, budget: Budget, data: Any, trainer_kwargs: Dict[str, Any]) -> Any:
        if cell.estimator != "sff":
            raise ValueError(f"the torch family has no estimator {cell.estimator!r}; it has "
                             f"{', '.join(self.estimators)}")
        from gluonts.torch import SimpleFeedForwardEstimator

        model = dict(budget.model)
        context = int(model.pop("context_multiple", 1) * data.spec.prediction_length)
        return SimpleFeedForwardEstimator(prediction_length=data.spec.prediction_length, context_length=context,
                                          lr=budget.learning_rate, batch_size=budget.per_rank_batch(cell.ranks),
                                          num_batches_per_epoch=budget.batches_per_epoch,
                                          trainer_kwargs=trainer_kwargs, **model)

    def averaging(self, cell: Cell, budget: Budget) -> Any:
        """The cell's ``IterationAveraging`` callback, or ``None`` for no averaging."""
        import iteravg
        from iteravg.lightning import IterationAveraging

        if cell.method == "none":
            return None
        if cell.method == "nta":
            schedule = iteravg.NTASchedule(epochs=budget.epochs)
        elif cell.method == "alpha_suffix":
            schedule = iteravg.AlphaSuffixSchedule(epochs=budget.epochs)
        elif cell.method == "ema":
            schedule = iteravg.EMASchedule(decay=EMA_DECAY)
        else:
            raise ValueError(f"unknown method {cell.method!r}")
        return IterationAveraging(schedule, monitor=None)

    def train(self, cell: Cell, budget: Budget, data: Any, workdir: Path) -> Trained:
        import torch

        from iteravg.lightning import RankSeeding

        torch.set_num_threads(1)
        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.seed(cell.seed)
        averaging = self.averaging(cell, budget)
        last, final = _recorders(averaging)
        callbacks = [last, *([averaging] if averaging is not None else []), final]
        if cell.ranks > 1:
            callbacks.append(RankSeeding())
        trainer_kwargs: Dict[str, Any] = dict(
            max_epochs=budget.epochs, accelerator="cpu", devices=cell.ranks, callbacks=callbacks, logger=False,
            default_root_dir=str(workdir / "lightning"), enable_progress_bar=False, enable_model_summary=False)
        if cell.ranks > 1:
            trainer_kwargs["strategy"] = "ddp"
        estimator = self.build(cell, budget, data, trainer_kwargs)
        output = estimator.train_model(data.train)
        predictor = output.predictor
        net = predictor.prediction_net
        best = output.trainer.checkpoint_callback.best_model_path
        best_epoch = int(Path(best).name.split("epoch=")[1].split("-")[0]) + 1 if best else None
        info: Dict[str, Any] = {
            "epoch_losses": last.losses,
            "last_iterate_sha256": state_sha256(last.state),
            "averaging_started": None if averaging is None else bool(averaging.averager.averaging_started),
            "trigger_epoch": None if averaging is None else averaging.schedule.trigger_epoch,
            "average_counter": None if averaging is None else int(averaging.averager.average_counter),
            "gluonts_best_epoch": best_epoch,
            "forecast_generator": type(predictor.forecast_generator).__name__,
        }
        if averaging is not None:  # evaluate the final average, not GluonTS's best-epoch checkpoint
            info["gluonts_checkpoint_averaged"] = final.started.get(best_epoch) if best_epoch else None
            net.load_state_dict(final.state)
        info["final_sha256"] = state_sha256(net.state_dict())

        def load_last() -> None:
            net.load_state_dict(last.state)

        return Trained(predictor=predictor, info=info, load_last_iterate=load_last if cell.method == "none" else None)


def _recorders(averaging: Any) -> Tuple[Any, Any]:
    """Two Lightning callbacks around ``averaging`` (one before it, one after it in the callback list).

    The first keeps the training weights at the end of each epoch (before ``IterationAveraging`` swaps the average
    in), so after ``fit`` it holds the last iterate, and the epoch's training loss. The second keeps what the model
    holds when ``fit`` ends (after ``IterationAveraging`` loaded the final average) and, per epoch, whether averaging
    had started (what an epoch-end checkpoint holds)."""
    import lightning.pytorch as pl

    def copy(module: Any) -> Dict[str, Any]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    class LastIterate(pl.Callback):
        def __init__(self) -> None:
            self.state: Dict[str, Any] = {}
            self.losses: List[float] = []

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.state = copy(pl_module)
            loss = trainer.callback_metrics.get("train_loss")  # this rank's mean over the epoch
            self.losses.append(float(loss) if loss is not None else float("nan"))

    class FinalModel(pl.Callback):
        def __init__(self) -> None:
            self.state: Dict[str, Any] = {}
            self.started: Dict[int, bool] = {}

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if averaging is not None:
                self.started[trainer.current_epoch + 1] = bool(averaging.averager.averaging_started)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.state = copy(pl_module)

    return LastIterate(), FinalModel()
