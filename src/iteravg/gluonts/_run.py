"""One distributed GluonTS training run: the pieces ``iteravg.gluonts.Trainer`` plugs into GluonTS's loop.

GluonTS's ``Trainer.__call__`` is one function; it offers four places to plug in, and this module fills each:

============================  ==============================================================================
GluonTS's loop does            iteravg puts there
============================  ==============================================================================
``mx.gluon.Trainer(...)``      ``ReducingTrainer``: the same optimizer (Adam, clip_gradient, weight decay, learning
                               rate reduction), gradients averaged across ranks in ``step`` (``_grads``)
``self.callbacks.<hook>``      ``DistributedCallbacks``: wraps the user's callbacks; broadcasts the initial
                               parameters, reduces epoch losses before any callback sees them, agrees every stop
                               decision, runs ``ModelAveraging`` on rank 0 and broadcasts its result
``train_iter``                 ``Batches``: notices batches GluonTS skipped (NaN loss) and joins the pending
                               gradient allreduce for them, so no rank waits for another
``net.save_parameters``        nothing on ranks other than 0 (only rank 0 writes the per-epoch parameter files)
============================  ==============================================================================

Every collective here is issued by all ranks at the same point: the step allreduce once per delivered training
batch, a few small ones per epoch.
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import json
import logging
import math
import os
import random
from typing import Any, Dict, Iterator, List, Optional

import mxnet as mx
import numpy as np
from mxnet import gluon

from .. import collectives
from ..comm import Communicator
from ..core.seeding import rank_seeds
from ..mx.ndarray import numpy_view
from ._grads import DataExhaustedError, GradientReducer
from .guard import fingerprints_agree, parameter_fingerprint

logger = logging.getLogger("iteravg")

_CURRENT: contextvars.ContextVar[Optional["DistributedRun"]] = contextvars.ContextVar("iteravg_gluonts_run",
                                                                                       default=None)
_GluonTrainer = gluon.Trainer  # the class GluonTS would build, captured before any replacement


class ReducingTrainer(_GluonTrainer):  # type: ignore[misc,valid-type]
    """Stands in for ``mx.gluon.Trainer`` while ``iteravg.gluonts.Trainer`` trains on several ranks.

    The first one built for the run's network (GluonTS's) averages gradients across ranks in ``step``; any other
    is a plain ``gluon.Trainer``. ``kvstore`` is ignored for the run's trainer: each rank holds one CPU copy.
    """

    def __init__(self, params: Any, optimizer: Any, optimizer_params: Any = None, kvstore: Any = "device",
                 compression_params: Any = None, update_on_kvstore: Any = None) -> None:
        run = _CURRENT.get()
        mine = run is not None and run.claims(params)
        super().__init__(params, optimizer, optimizer_params, kvstore=None if mine else kvstore,
                         compression_params=compression_params, update_on_kvstore=update_on_kvstore)
        self.iteravg_run: Optional[DistributedRun] = run if mine else None
        self.iteravg_contributes = True
        self.iteravg_skip_update = False
        if mine:
            run.attach(self)

    def _allreduce_grads(self) -> None:  # MXNet's hook between backward and update (Horovod's override too)
        if self.iteravg_run is None:
            super()._allreduce_grads()
            return
        self.iteravg_skip_update = not self.iteravg_run.reduce_gradients(self.iteravg_contributes)

    def _update(self, ignore_stale_grad: bool = False) -> None:
        if self.iteravg_run is not None and self.iteravg_skip_update:
            return  # no rank contributed a gradient to this step
        super()._update(ignore_stale_grad)


@contextlib.contextmanager
def gluon_trainer_replaced(run: "DistributedRun") -> Iterator[None]:
    """``mxnet.gluon.Trainer`` is ``ReducingTrainer`` inside the block (GluonTS looks it up when it trains)."""
    token = _CURRENT.set(run)
    saved = gluon.Trainer
    gluon.Trainer = ReducingTrainer
    try:
        yield
    finally:
        gluon.Trainer = saved
        _CURRENT.reset(token)


@contextlib.contextmanager
def parameter_files_on_root_only(net: gluon.Block, rank: int) -> Iterator[None]:
    """On ranks other than 0, ``net.save_parameters`` writes nothing inside the block (instance attribute)."""
    if rank == 0:
        yield
        return

    def skip(filename: str, deduplicate: bool = False) -> None:
        """Rank 0 writes GluonTS's per-epoch parameter files; the other ranks hold identical networks."""

    object.__setattr__(net, "save_parameters", skip)
    try:
        yield
    finally:
        object.__delattr__(net, "save_parameters")


def seed_ranks(comm: Communicator) -> int:
    """Each rank draws its own training windows: ranks > 0 reseed numpy, random and mx.random.

    The seeds are ``iteravg.core.seeding.rank_seeds``: derived from rank 0's numpy RNG state (read, not consumed),
    so rank 0 draws what one process would and a seeded script stays reproducible. Returns the base seed (identical
    on every rank).
    """
    base, seeds = rank_seeds(comm, 3)
    if seeds is not None:
        a, b, c = seeds
        np.random.seed(a)
        random.seed(b)
        mx.random.seed(c % (2**31 - 1))
    return base


class DistributedRun:
    """State of one ``Trainer.__call__`` on several ranks (created and dropped by ``iteravg.gluonts.Trainer``)."""

    def __init__(self, comm: Communicator, net: gluon.Block, owner: Any) -> None:
        self.comm = comm
        self.net = net
        self.owner = owner  # the iteravg.gluonts.Trainer (its public ``halt`` ends GluonTS's epoch loop)
        self._param_ids = {id(p) for p in net.collect_params().values()}
        self.gluon_trainer: Optional[ReducingTrainer] = None
        self.reducer: Optional[GradientReducer] = None
        self.pending = False  # a training batch was delivered and not stepped yet
        self.batch_size = 1
        self.steps = 0  # gradient allreduces this epoch (real and null)
        self.contributed = 0  # steps this rank contributed a real gradient to
        self.stop_vote = False
        self.train_loss = math.nan
        self.val_loss: Optional[float] = None
        self.best: Dict[str, Any] = {"params_path": None, "epoch_no": -1, "score": math.inf}
        self._seen_info: set = set()

    # -- the gluon.Trainer -----------------------------------------------------------------------
    def claims(self, params: Any) -> bool:
        values = params.values() if hasattr(params, "values") else params
        return self.gluon_trainer is None and {id(p) for p in values} == self._param_ids

    def attach(self, trainer: ReducingTrainer) -> None:
        self.gluon_trainer = trainer

    def reduce_gradients(self, contributes: bool, ended: bool = False) -> bool:
        """The step's allreduce (collective). Returns whether the update should be applied."""
        if self.reducer is None:
            self.reducer = GradientReducer(self.comm, list(self.net.collect_params().values()))
        contributors, ended_ranks = self.reducer.reduce(contributes, ended)
        self.steps += 1
        self.contributed += int(contributes)
        if contributes:
            self.pending = False
        if 0 < ended_ranks < self.comm.size:
            raise DataExhaustedError(
                f"the training batch iterator ended on {ended_ranks} of {self.comm.size} ranks after {self.steps} "
                f"batches of this epoch; iteravg.gluonts.Trainer needs an endless training loader on every rank "
                "(GluonTS's TrainDataLoader is one) so that every rank takes num_batches_per_epoch steps")
        if contributors and not contributes:
            self.reducer.mark_fresh()
        return contributors > 0

    def null_step(self, ended: bool = False) -> bool:
        """Join the pending gradient allreduce without a gradient of our own (collective). Returns False if
        every rank's iterator ended at the same time (an orderly end: GluonTS then ends the epoch)."""
        trainer = self.gluon_trainer
        if trainer is None:
            raise RuntimeError("iteravg.gluonts: no gradient-reducing trainer attached to this run")
        self.pending = False
        if ended:
            # Every rank's reduce tells whether all ended together; then nobody raises and nobody updates.
            if self.reducer is None:
                self.reducer = GradientReducer(self.comm, list(self.net.collect_params().values()))
            contributors, ended_ranks = self.reducer.reduce(False, True)
            if ended_ranks == self.comm.size:
                return False
            raise DataExhaustedError(
                f"the training batch iterator of rank {self.comm.rank} ended after {self.steps} batches of this "
                f"epoch while {self.comm.size - ended_ranks} other rank(s) still had batches; iteravg.gluonts.Trainer "
                "needs an endless training loader on every rank (GluonTS's TrainDataLoader is one)")
        trainer.iteravg_contributes = False
        try:
            trainer.step(self.batch_size)
        finally:
            trainer.iteravg_contributes = True
        return True

    def catch_up(self) -> None:
        """If GluonTS skipped the last delivered batch (NaN loss), take part in its allreduce now."""
        if self.pending:
            logger.warning("iteravg: rank %d skipped a batch with a non-finite loss; it joins that step's gradient "
                           "average with no gradient of its own", self.comm.rank)
            self.null_step()

    def delivered(self, batch: Any) -> None:
        self.pending = True
        values = list(batch.values()) if isinstance(batch, dict) else list(batch)
        if values and hasattr(values[0], "shape") and len(values[0].shape):
            self.batch_size = int(values[0].shape[0])

    # -- parameters ------------------------------------------------------------------------------
    def broadcast_parameters(self) -> None:
        """Every parameter (and BatchNorm statistic) from rank 0 (collective)."""
        mx.nd.waitall()
        arrays = [p.data() for p in self.net.collect_params().values()]
        collectives.broadcast_arrays(self.comm, [numpy_view(a) for a in arrays], arrays, name="iteravg.bcast.params")
        mx.nd.waitall()

    def average_statistics(self) -> None:
        """Mean over ranks of the non-trainable float arrays (BatchNorm running statistics), in place.

        Each rank computed them from its own batches; averaging keeps the networks bitwise identical.
        """
        params = [p for p in self.net.collect_params().values()
                  if p.grad_req == "null" and np.issubdtype(np.dtype(p.dtype), np.floating)]
        if not params:
            return
        arrays = [p.data().asnumpy() for p in params]
        flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float64)
        collectives.allreduce_mean_arrays(self.comm, [flat], name="iteravg.gluonts.stats")
        off = 0
        for p, a in zip(params, arrays):
            p.set_data(mx.nd.array(flat[off : off + a.size].reshape(a.shape), dtype=a.dtype))
            off += a.size

    def make_identical(self, what: str) -> None:
        """Check every parameter bit is the same on every rank; if not, warn and take rank 0's (collective)."""
        if fingerprints_agree(self.comm, parameter_fingerprint(self.net, trainable_only=False)):
            return
        if self.comm.rank == 0:
            logger.warning("iteravg: the ranks' networks differed %s; rank 0's parameters were broadcast", what)
        self.broadcast_parameters()

    # -- epoch bookkeeping -----------------------------------------------------------------------
    def end_training_epoch(self, local_loss: float) -> float:
        """Sample-weighted mean of the epoch's training loss over ranks, and the agreed batch-level stop vote."""
        self.catch_up()
        self.average_statistics()
        weight = float(self.contributed)
        loss_w = local_loss * weight if weight else 0.0
        m = collectives.mean_of_ranks(self.comm, [loss_w, weight, 1.0 if self.stop_vote else 0.0,
                                                  float(self.steps), float(self.steps) ** 2])
        size = self.comm.size
        s1, s2 = int(round(m[3] * size)), int(round(m[4] * size))
        if size * s2 != s1 * s1:  # cannot happen: every rank joins every step's allreduce
            raise collectives.CollectiveError(f"ranks took different numbers of training steps this epoch "
                                              f"(rank {self.comm.rank}: {self.steps}, mean {m[3]:g})")
        self.stop_vote = m[2] > 0
        self.train_loss = m[0] / m[1] if m[1] > 0 else math.nan
        self.val_loss = None
        self.steps = self.contributed = 0
        return self.train_loss

    def end_validation_epoch(self, local_loss: float) -> float:
        m = collectives.mean_of_ranks(self.comm, [local_loss, 1.0 if self.stop_vote else 0.0])
        self.stop_vote = m[1] > 0
        self.val_loss = m[0]
        return m[0]

    def agree(self, go_on: Any) -> bool:
        """True on every rank iff every rank's hooks said go on."""
        return not collectives.any_rank(self.comm, not bool(go_on))

    def record_epoch(self, epoch_no: int, loss: float, gluonts_best: Dict[str, Any]) -> Dict[str, Any]:
        """Put the reduced loss into GluonTS's epoch-info file and track the best epoch by reduced losses.

        GluonTS scores each epoch with this rank's own loss when it writes ``*-epoch-info.json``; ``ModelAveraging``
        selects epochs from those files, so their scores must be the reduced ones. Returns the best-epoch info
        the callbacks see.
        """
        from gluonts.mx.trainer import model_averaging as gma  # noqa: WPS433 -- GluonTS's public module

        path = gluonts_best.get("params_path") if isinstance(gluonts_best, dict) else None
        current: Optional[Dict[str, Any]] = None
        if path:
            suffix = f"-{gma.EPOCH_INFO_STRING}.json"
            for fname in sorted(glob.glob(os.path.join(os.path.dirname(path), f"*{suffix}"))):
                if fname in self._seen_info:
                    continue
                with open(fname) as f:
                    info = json.load(f)
                if info.get("epoch_no") == epoch_no:
                    self._seen_info.add(fname)
                    info["score"] = loss
                    gma.save_epoch_info(fname[: -len(suffix)], info)
                    current = info
        if current is None:
            current = {"params_path": None, "epoch_no": epoch_no, "score": loss}
        if loss < self.best["score"]:
            self.best = dict(current)
        return dict(self.best)

    def end_epoch(self) -> None:
        """A stop voted by a batch-level hook takes effect now, on every rank (GluonTS checks ``halt``)."""
        if self.stop_vote:
            self.owner.halt = True
            self.stop_vote = False


class Batches:
    """The training batch iterable GluonTS's loop iterates; tells the run which batches were delivered."""

    def __init__(self, inner: Any, run: DistributedRun) -> None:
        self.inner = inner
        self.run = run

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.inner)
        while True:
            self.run.catch_up()
            try:
                batch = next(it)
            except StopIteration:
                self.run.null_step(ended=True)
                return
            self.run.delivered(batch)
            yield batch


def model_averaging_class() -> Optional[type]:
    try:
        from gluonts.mx.trainer.model_averaging import ModelAveraging  # noqa: WPS433
    except ImportError:
        return None
    return ModelAveraging


class DistributedCallbacks:
    """Replaces the GluonTS Trainer's ``callbacks`` (a ``CallbackList``) during a multi-rank run.

    Each hook calls the user's callbacks in order, as GluonTS's ``CallbackList`` does, with the changes that
    keep the ranks identical (see the module doc). Stop decisions of batch-level hooks take effect at the end
    of the epoch (the ranks must keep joining the same gradient allreduces until they have agreed).
    """

    def __init__(self, inner: Any, run: DistributedRun) -> None:
        self.inner = inner
        self.callbacks: List[Any] = list(inner.callbacks)
        self.run = run

    def _each(self, hook: str, **kwargs: Any) -> List[Any]:
        return [getattr(cb, hook)(**kwargs) for cb in self.callbacks]

    def on_train_start(self, max_epochs: int) -> None:
        self._each("on_train_start", max_epochs=max_epochs)

    def on_network_initializing_end(self, training_network: gluon.Block) -> None:
        if self.run.gluon_trainer is None:
            raise RuntimeError("iteravg.gluonts.Trainer: GluonTS did not build its optimizer through "
                               "mxnet.gluon.Trainer; this GluonTS version is not supported (use gluonts 0.17)")
        self._each("on_network_initializing_end", training_network=training_network)
        self.run.broadcast_parameters()  # after the callbacks: a warm start on some ranks only is unified too

    def on_train_epoch_start(self, training_network: gluon.Block) -> None:
        self._each("on_train_epoch_start", training_network=training_network)

    def on_validation_epoch_start(self, training_network: gluon.Block) -> None:
        self._each("on_validation_epoch_start", training_network=training_network)

    def on_train_batch_end(self, training_network: gluon.Block) -> bool:
        if not all(self._each("on_train_batch_end", training_network=training_network)):
            self.run.stop_vote = True
        return True

    def on_validation_batch_end(self, training_network: gluon.Block) -> bool:
        if not all(self._each("on_validation_batch_end", training_network=training_network)):
            self.run.stop_vote = True
        return True

    def on_train_epoch_end(self, epoch_no: int, epoch_loss: float, training_network: gluon.Block,
                           trainer: Any) -> bool:
        loss = self.run.end_training_epoch(epoch_loss)
        go_on = all(self._each("on_train_epoch_end", epoch_no=epoch_no, epoch_loss=loss,
                               training_network=training_network, trainer=trainer))
        return self.run.agree(go_on)

    def on_validation_epoch_end(self, epoch_no: int, epoch_loss: float, training_network: gluon.Block,
                                trainer: Any) -> bool:
        loss = self.run.end_validation_epoch(epoch_loss)
        go_on = all(self._each("on_validation_epoch_end", epoch_no=epoch_no, epoch_loss=loss,
                               training_network=training_network, trainer=trainer))
        return self.run.agree(go_on)

    def on_epoch_end(self, epoch_no: int, epoch_loss: float, training_network: gluon.Block, trainer: Any,
                     best_epoch_info: Dict[str, Any], ctx: Any) -> bool:
        run = self.run
        loss = run.val_loss if run.val_loss is not None else run.train_loss
        best = run.record_epoch(epoch_no, loss, best_epoch_info)
        go_on = all(self._each("on_epoch_end", epoch_no=epoch_no, epoch_loss=loss, training_network=training_network,
                               trainer=trainer, best_epoch_info=best, ctx=ctx))
        go_on = run.agree(go_on)
        run.end_epoch()
        return go_on

    def on_train_end(self, training_network: gluon.Block, temporary_dir: Optional[str] = None,
                     ctx: Any = None) -> None:
        averaging = model_averaging_class()
        for cb in self.callbacks:
            if averaging is not None and isinstance(cb, averaging):
                # Reads the per-epoch parameter files, which only rank 0 wrote: rank 0 computes, all receive.
                collectives.run_on_root(self.run.comm, lambda cb=cb: cb.on_train_end(
                    training_network=training_network, temporary_dir=temporary_dir, ctx=ctx),
                    "GluonTS's ModelAveraging at train end")
                self.run.broadcast_parameters()
            else:
                cb.on_train_end(training_network=training_network, temporary_dir=temporary_dir, ctx=ctx)
        self.run.make_identical("at train end")
