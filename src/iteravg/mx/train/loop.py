"""A reusable data-parallel training loop for MXNet Gluon that calls GluonTS ``Callback`` hooks in GluonTS's
order, so iteravg's ``ModelIterationAveraging`` and GluonTS's own callbacks both work in it.

Distributed behaviour (all collectives go through ``iteravg.collectives``, except the gradient allreduce of
Horovod's ``DistributedTrainer``):

* initial parameters are broadcast from rank 0;
* gradients are averaged across ranks: ``horovod.mxnet.DistributedTrainer`` under Horovod, an allreduce-mean
  of the gradient buffers under the mpi4py communicator, nothing on one process;
* every rank gets a shard of each epoch's permutation with the **same number of batches** (the remainder is
  dropped), so every rank issues the same collectives;
* epoch training loss and validation loss are averaged across ranks (sample-weighted).

Stopping, as in GluonTS: training stops after an epoch whose ``on_train_epoch_end``,
``on_validation_epoch_end`` or ``on_epoch_end`` returned ``False`` (``on_epoch_end`` is skipped when an earlier
hook of the epoch said stop), or after an ``on_train_batch_end`` returned ``False``. With several ranks every
such decision is first agreed (one small allgather; any rank saying stop stops all), because hooks may decide
per rank (e.g. GluonTS's ``TrainingTimeLimit``). A batch-level stop then takes effect at the end of the epoch
(the ranks must keep issuing the same gradient allreduces until they agree); on one process it stops at once.
Deviation from GluonTS: ``on_validation_epoch_end`` is always called after ``on_validation_epoch_start``, so the
averaged-weight swap is always undone; the training weights are also put back if validation raises.

Determinism (what ``--resume`` relies on): batches come from a permutation seeded by ``(seed, epoch)``;
``mx.random``, ``numpy.random`` and ``random`` are seeded from ``(seed, epoch)`` at every epoch start; the
caller initialises the model from ``seed`` (the CLI does); plain SGD with momentum is used; and on CPU MXNet is
deterministic for a fixed thread count -- set ``OMP_NUM_THREADS`` (the CLI and the launch scripts default it to
1), e.g. ``OMP_NUM_THREADS=1 iteravg train ...``. A run resumed from the snapshot of epoch k then repeats
exactly what the uninterrupted run did, **on the same number of ranks**; on another number of ranks the shards
(and the gradient reduction) differ, so the continuation is a valid but different run.

Checkpoints (Lightning's division of labour: the loop owns the files, callbacks own their state): with
``checkpoint_dir``, rank 0 writes one snapshot per epoch (and one at train end if the last epoch has none)
holding ``training.params`` (the last iterate, by structural parameter name), ``optimizer.params`` (SGD momentum
buffers), JSON training state (epochs done, optimizer update counts, learning rate and batch settings, per-epoch
loss history) and the averaging callback's ``snapshot_contents`` (``averaged.safetensors``, ``averaged.params``,
its state). ``fit(..., resume_from=dir)`` makes rank 0 read them and broadcasts them to every rank; the
averaging callback restores itself with ``restore``. Nothing is pickled.

Testing switch: ``ITERAVG_STOP_AFTER_EPOCH=k`` raises ``StoppedEarly`` on every rank right after epoch k's hooks
(so after its checkpoint was written), to simulate a kill for resume tests.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from ... import checkpoint, collectives
from ..._faults import STOP_ENV, stop_after_epoch
from ...checkpoint import CheckpointError, read_snapshot, read_verified
from ...saving import SaveErrors
from ...comm import Communicator
from ..ndarray import numpy_view

logger = logging.getLogger("iteravg")

TRAINING_FILE = "training.params"
OPTIMIZER_FILE = "optimizer.params"


class StoppedEarly(Exception):
    """Raised after the epoch named by ``ITERAVG_STOP_AFTER_EPOCH`` was checkpointed (testing switch)."""


@dataclass
class FitResult:
    history: List[Dict[str, Any]] = field(default_factory=list)
    epochs_done: int = 0
    resumed_from: Optional[int] = None
    #: True if a callback hook returned False (training stopped before ``epochs``).
    stopped_by_callback: bool = False
    #: The loop's checkpoint writer (``fit(checkpoint_dir=...)``), used again by ``finish_training``.
    snapshots: Optional["TrainingSnapshots"] = field(default=None, repr=False, compare=False)


def _seed_epoch(seed: int, epoch: int) -> None:
    """Every RNG a model or a callback might use, seeded from (seed, epoch): a resumed epoch repeats exactly."""
    s = (seed * 100003 + epoch) % (2**31 - 1)
    mx.random.seed(s)
    np.random.seed(s)
    random.seed(s)


def _all_ranks_agree(comm: Communicator, go_on: bool) -> bool:
    """True iff every rank says go on (collective with several ranks, identical result on all)."""
    return not collectives.any_rank(comm, not go_on)


def _shard(n: int, rank: int, size: int, batch_size: int, seed: int, epoch: int) -> List[np.ndarray]:
    """This rank's batches of an epoch: same count on every rank, from a permutation seeded by (seed, epoch)."""
    order = np.random.RandomState([seed, epoch]).permutation(n)
    per_rank = n // size
    num_batches = per_rank // batch_size
    if num_batches == 0:
        raise ValueError(f"batch_size {batch_size} is larger than a rank's share ({per_rank}) of {n} samples")
    mine = order[rank::size][: num_batches * batch_size]
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]


def evaluate(net: gluon.Block, loss_fn: gluon.loss.Loss, data: Sequence[np.ndarray], batch_size: int = 256) -> tuple:
    """(sum of per-sample losses, count) of ``data`` on this rank."""
    x, y = data
    total, count = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = mx.nd.array(x[i : i + batch_size]), mx.nd.array(y[i : i + batch_size])
        total += float(loss_fn(net(xb), yb).sum().asscalar())
        count += len(yb)
    return total, count


class Fitter:
    """Holds the network, the trainer and the communicator for one training run (see ``fit``)."""

    def __init__(self, net: gluon.Block, loss_fn: gluon.loss.Loss, comm: Communicator, *, learning_rate: float,
                 momentum: float, seed: int) -> None:
        self.net, self.loss_fn, self.comm, self.seed = net, loss_fn, comm, seed
        self.params = [p for p in net.collect_params().values() if p.grad_req != "null"]
        all_params = list(net.collect_params().values())
        self._arrays = [p.data() for p in all_params]
        self._structural = {id(p): s for s, p in net._collect_params_with_prefix().items()}
        self._all_params = all_params
        opt = {"learning_rate": learning_rate, "momentum": momentum}
        if comm.name == "horovod" and comm.size > 1:
            import horovod.mxnet as hvd  # noqa: WPS433 -- Horovod's gradient allreduce

            self.trainer: gluon.Trainer = hvd.DistributedTrainer(net.collect_params(), "sgd", opt)
        else:
            self.trainer = gluon.Trainer(net.collect_params(), "sgd", opt, kvstore=None)
        self._grad_views: Optional[List[np.ndarray]] = None

    # -- parameters and optimizer state -------------------------------------------------------
    def broadcast_parameters(self) -> None:
        mx.nd.waitall()
        collectives.broadcast_arrays(self.comm, [numpy_view(a) for a in self._arrays], self._arrays,
                                     name="iteravg.bcast.params")

    def _updater(self) -> Any:
        return self.trainer._updaters[0]

    def _momentum(self, create: bool) -> List[mx.nd.NDArray]:
        """Momentum buffers in ``self.trainer._params`` order, created if needed (restoring before step 1)."""
        upd = self._updater()
        out = []
        for i, p in enumerate(self.trainer._params):
            if i not in upd.states:
                if not create:
                    raise ValueError("optimizer state is not initialised yet")
                upd.states[i] = self.trainer._optimizer.create_state_multi_precision(i, p.data())
                upd.states_synced[i] = True
            out.append(upd.states[i])
        return out

    def training_files(self, last_iterate: Optional[Dict[str, mx.nd.NDArray]] = None) -> Dict[str, Any]:
        """Writers of the training state's files: the last iterate (``last_iterate`` if the network holds other
        weights, e.g. the average at train end) and the momentum buffers."""
        mx.nd.waitall()
        params = last_iterate if last_iterate is not None else \
            {self._structural[id(p)]: p.data() for p in self._all_params}
        momentum = {f"m{i}": s for i, s in enumerate(self._momentum(create=True)) if s is not None}
        return {TRAINING_FILE: lambda path: mx.nd.save(str(path), params),
                OPTIMIZER_FILE: lambda path: mx.nd.save(str(path), momentum)}

    def training_record(self, result: FitResult, config: Dict[str, Any]) -> Dict[str, Any]:
        opt = self.trainer._optimizer
        return {"epochs_done": result.epochs_done, "history": list(result.history),
                "num_update": int(opt.num_update), "learning_rate": float(opt.learning_rate),
                "index_update_count": {str(k): int(v) for k, v in opt._index_update_count.items()},
                "config": dict(config)}

    def restore(self, checkpoint_dir: os.PathLike, config: Dict[str, Any]) -> Dict[str, Any]:
        """Restore last iterate, momentum and history from the latest snapshot on every rank (collective).

        Rank 0 reads and checks the files; the JSON state and the arrays are then broadcast. Raises
        ``ValueError`` (``CheckpointError`` on rank 0) on every rank if the snapshot cannot be used.
        """
        arrays: Dict[str, Any] = {}

        def read() -> Dict[str, Any]:
            snap, state = read_snapshot(checkpoint_dir)  # verifies the SHA-256 of every file
            extra = state.get("extra")
            training = extra.get("training") if isinstance(extra, dict) else None
            if not isinstance(training, dict) or TRAINING_FILE not in state.get("files", {}):
                raise CheckpointError(f"checkpoint {checkpoint_dir} holds no training state (last iterate, optimizer) "
                                      "to resume from; was it written by another program?")
            _check_training_record(training, f"checkpoint {checkpoint_dir}")
            for key, fname in (("params", TRAINING_FILE), ("momentum", OPTIMIZER_FILE)):
                data = read_verified(snap, state, fname)  # only a listed file, checked on the bytes loaded
                try:
                    loaded = mx.nd.load_frombuffer(data)
                except mx.base.MXNetError as exc:
                    raise CheckpointError(f"{snap / fname} is not a readable MXNet parameter file") from exc
                if loaded == []:  # MXNet saves an empty dict (no momentum) as an empty list
                    loaded = {}
                if not isinstance(loaded, dict):
                    raise CheckpointError(f"{snap / fname} holds a list of arrays, expected named ones")
                arrays[key] = loaded
            return dict(training, world_size=state.get("world_size"))

        training = collectives.broadcast_json(self.comm, collectives.run_on_root(self.comm, read, "reading training state"))
        momentum = self._momentum(create=True)
        targets = list(self._arrays) + [m for m in momentum if m is not None]

        def check_and_copy() -> None:
            names = [self._structural[id(p)] for p in self._all_params]
            loaded = [arrays["params"].get(n) for n in names]
            names += [f"m{i}" for i, m in enumerate(momentum) if m is not None]
            loaded += [arrays["momentum"].get(f"m{i}") for i, m in enumerate(momentum) if m is not None]
            for name, dst, src in zip(names, targets, loaded):
                if src is None or src.shape != dst.shape or src.dtype != dst.dtype:
                    found = "missing" if src is None else f"{np.dtype(src.dtype).name}{tuple(src.shape)}"
                    raise CheckpointError(f"checkpoint {checkpoint_dir}: training state does not match this model "
                                          f"({name!r}: checkpoint has {found}, the model has "
                                          f"{np.dtype(dst.dtype).name}{tuple(dst.shape)})")
            for dst, src in zip(targets, loaded):
                src.copyto(dst)

        collectives.run_on_root(self.comm, check_and_copy, "restoring training state")
        mx.nd.waitall()
        collectives.broadcast_arrays(self.comm, [numpy_view(a) for a in targets], targets, name="iteravg.bcast.resume")
        opt = self.trainer._optimizer
        opt.num_update = int(training["num_update"])
        opt._index_update_count = {int(k): v for k, v in training["index_update_count"].items()}
        if self.comm.rank == 0:
            saved = training.get("config", {})
            for key, now in config.items():
                if key in saved and saved[key] != now:
                    logger.warning("iteravg: resuming with %s=%r, the checkpoint was written with %r; the run will "
                                   "not repeat the uninterrupted one", key, now, saved[key])
            if training.get("world_size") not in (None, self.comm.size):
                logger.warning("iteravg: the checkpoint was written by %s rank(s), resuming on %d: the data shards "
                               "differ, so the continuation is valid but not bitwise identical to an uninterrupted "
                               "%s-rank run", training["world_size"], self.comm.size, training["world_size"])
        return training

    # -- one step --------------------------------------------------------------------------------
    def step(self, xb: np.ndarray, yb: np.ndarray) -> float:
        with autograd.record():
            loss = self.loss_fn(self.net(mx.nd.array(xb)), mx.nd.array(yb))
        loss.backward()
        if self.comm.name == "mpi" and self.comm.size > 1:
            mx.nd.waitall()
            if self._grad_views is None:
                grads = [p.grad() for p in self.params]
                self._grad_views = [numpy_view(g) for g in grads]
                self._grads = grads
            collectives.allreduce_mean_arrays(self.comm, self._grad_views, self._grads)
        self.trainer.step(len(yb))
        return float(loss.sum().asscalar())


def _check_training_record(training: Dict[str, Any], where: str) -> None:
    """The loop's part of a snapshot record, field by field (a record from disk is untrusted)."""
    def is_count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62

    counts = training.get("index_update_count")
    ok = (is_count(training.get("epochs_done")) and is_count(training.get("num_update"))
          and isinstance(training.get("history"), list) and all(isinstance(h, dict) for h in training["history"])
          and isinstance(counts, dict) and all(k.isdigit() and len(k) < 19 and is_count(v) for k, v in counts.items())
          and isinstance(training.get("config", {}), dict))
    if not ok:
        raise CheckpointError(f"{where}: the training state (epochs_done, num_update, history, index_update_count) "
                              "is malformed")


class TrainingSnapshots:
    """The loop's checkpoints: rank 0 writes training state and the averaging callback's files in one snapshot."""

    def __init__(self, fitter: Fitter, result: FitResult, config: Dict[str, Any], callbacks: Sequence[Any],
                 directory: os.PathLike, keep: int, on_save_error: str = "raise") -> None:
        from ..callback import ModelIterationAveraging  # noqa: WPS433

        averaging = [cb for cb in callbacks if isinstance(cb, ModelIterationAveraging)]
        if len(averaging) > 1:
            raise ValueError("fit(checkpoint_dir=...) stores one ModelIterationAveraging callback's state; got "
                             f"{len(averaging)}")
        if averaging and averaging[0].checkpoint_dir is not None:
            raise ValueError("fit(checkpoint_dir=...) writes the averaging state itself: construct "
                             "ModelIterationAveraging without checkpoint_dir")
        self.fitter, self.result, self.config = fitter, result, config
        self.averaging = averaging[0] if averaging else None
        self.directory, self.keep = os.fspath(directory), keep
        self.save_errors = SaveErrors(on_save_error)
        self.last_epoch: Optional[int] = None

    def check_writable(self) -> None:
        collectives.run_on_root(self.fitter.comm, lambda: checkpoint.check_writable(self.directory),
                                f"checking that the checkpoint directory {self.directory!r} is writable")

    def write(self, stage: str, last_iterate: Optional[Dict[str, mx.nd.NDArray]] = None) -> None:
        """Collective: the average is synced (agreed), then rank 0 writes; a failure is raised on every rank (or,
        with ``on_save_error="warn"`` and a storage failure, logged once and retried at the next snapshot)."""
        epoch = self.result.epochs_done
        with collectives.phase(f"checkpoint ({stage})"):
            averaged = None
            if self.averaging is not None:
                self.averaging.avg_strategy.sync_average()
                averaged = self.averaging.gathered_average()

            def write() -> None:
                files, record = self.averaging.snapshot_contents(averaged, checkpoint_dir=self.directory) \
                    if self.averaging is not None else ({}, {})
                files.update(self.fitter.training_files(last_iterate))
                record.update(epoch=epoch, stage=stage, world_size=self.fitter.comm.size, comm=self.fitter.comm.name,
                              extra={"training": self.fitter.training_record(self.result, self.config)})
                checkpoint.write_snapshot(self.directory, f"epoch-{epoch:06d}", record, files, keep=self.keep)

            written, _ = self.save_errors.run(self.fitter.comm, write, f"writing the checkpoint to {self.directory!r}")
        if written:
            self.last_epoch = epoch

    def write_final(self, net: gluon.Block) -> None:
        """After ``on_train_end``: a snapshot only if the last epoch has none; the network may now hold the
        average, so the last iterate comes from the averaging strategy's swap cache."""
        if self.last_epoch == self.result.epochs_done:
            return
        last = None
        if self.averaging is not None and self.averaging.avg_strategy.averager.has_average:
            strategy = self.averaging.avg_strategy
            cached = strategy.cached_model
            if cached is not None and strategy.binding is not None:
                last = {strategy.binding.structural[k]: cached[k] for k in strategy.binding.param_names}
        self.write("train_end", last)


def _ensure_initialized(net: gluon.Block, x: np.ndarray) -> None:
    """Run one forward pass if parameters are still deferred (shapes unknown), as GluonTS's first forward."""
    try:
        for p in net.collect_params().values():
            p.data()
    except gluon.parameter.DeferredInitializationError:
        net(mx.nd.array(x[:1]))


def fit(
    net: gluon.Block,
    loss_fn: gluon.loss.Loss,
    train: Sequence[np.ndarray],
    val: Optional[Sequence[np.ndarray]],
    *,
    comm: Communicator,
    callbacks: Sequence[Any] = (),
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float = 0.9,
    seed: int = 0,
    resume_from: Optional[os.PathLike] = None,
    checkpoint_dir: Optional[os.PathLike] = None,
    keep_checkpoints: int = 2,
    on_epoch: Optional[Callable[[Dict[str, float]], None]] = None,
    on_save_error: str = "raise",
) -> FitResult:
    """Train ``net`` (initialised, one forward done) data-parallel across ``comm``'s ranks, calling hooks.

    ``callbacks`` are GluonTS-style callbacks. An iteravg ``ModelIterationAveraging`` among them gets the
    loop's training state added to its snapshots; with ``resume_from`` the loop restores it (and the
    callback, constructed with ``resume=True``, restores the averaging state). ``on_save_error``: ``"raise"`` stops
    training when a snapshot cannot be written (disk full, read-only, ...), ``"warn"`` goes on (``iteravg.saving``).
    """
    from ..callback import ModelIterationAveraging  # noqa: WPS433

    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    stop_after = stop_after_epoch()
    _ensure_initialized(net, train[0])
    fitter = Fitter(net, loss_fn, comm, learning_rate=learning_rate, momentum=momentum, seed=seed)
    fitter.broadcast_parameters()
    result = FitResult()
    config = {"learning_rate": learning_rate, "momentum": momentum, "batch_size": batch_size, "seed": seed}
    if checkpoint_dir is not None:
        result.snapshots = TrainingSnapshots(fitter, result, config, callbacks, checkpoint_dir, keep_checkpoints,
                                             on_save_error)
        result.snapshots.check_writable()
    if resume_from is not None:
        training = fitter.restore(resume_from, config)
        result.history.extend(training["history"])
        result.epochs_done = result.resumed_from = int(training["epochs_done"])
        for cb in callbacks:
            if isinstance(cb, ModelIterationAveraging) and cb.checkpoint_dir is None:
                cb.restore(resume_from, net)

    def call(hook: str, **kwargs: Any) -> List[Any]:
        return [getattr(cb, hook)(**kwargs) for cb in callbacks]

    call("on_train_start", max_epochs=epochs)
    call("on_network_initializing_end", training_network=net)
    best: Dict[str, Any] = {"params_path": None, "epoch_no": -1, "score": np.inf}
    for epoch in range(result.epochs_done, epochs):
        _seed_epoch(seed, epoch)
        call("on_train_epoch_start", training_network=net)
        batches = _shard(len(train[1]), comm.rank, comm.size, batch_size, seed, epoch)
        total, done, halt = 0.0, 0, False
        for idx in batches:
            total += fitter.step(train[0][idx], train[1][idx])
            done += 1
            if not all(call("on_train_batch_end", training_network=net)) and not halt:
                halt = True
                if comm.size == 1:
                    break  # GluonTS stops at once; several ranks finish the epoch's batches (see module doc)
        train_loss, halted = collectives.mean_of_ranks(comm, [total / (done * batch_size), 1.0 if halt else 0.0])
        go_on = all(call("on_train_epoch_end", epoch_no=epoch, epoch_loss=train_loss, training_network=net,
                         trainer=fitter.trainer))
        epoch_loss = train_loss
        row: Dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss}
        if val is not None:
            call("on_validation_epoch_start", training_network=net)
            try:
                s, c = evaluate(net, loss_fn, [val[0][comm.rank :: comm.size], val[1][comm.rank :: comm.size]])
            except BaseException:
                _restore_training_weights(callbacks, net)  # never leave averaged weights in the training network
                raise
            row["val_on_average"] = _holds_average(callbacks)
            total_sum, total_count = collectives.mean_of_ranks(comm, [s, c])
            epoch_loss = total_sum / total_count
            row["val_loss"] = epoch_loss
            go_on = all(call("on_validation_epoch_end", epoch_no=epoch, epoch_loss=epoch_loss, training_network=net,
                             trainer=fitter.trainer)) and go_on
        if epoch_loss < best["score"]:
            best = {"params_path": None, "epoch_no": epoch, "score": epoch_loss}
        result.history.append(row)
        result.epochs_done = epoch + 1
        go_on = _all_ranks_agree(comm, go_on)  # on_epoch_end holds collectives: all ranks call it or none
        if go_on:
            go_on = _all_ranks_agree(comm, all(call("on_epoch_end", epoch_no=epoch, epoch_loss=epoch_loss,
                                                    training_network=net, trainer=fitter.trainer,
                                                    best_epoch_info=best, ctx=mx.cpu())))
        if on_epoch is not None:
            on_epoch(row)
        if result.snapshots is not None:  # after on_epoch: the row it completes is part of the snapshot
            result.snapshots.write("epoch_end")
        if stop_after and epoch + 1 == stop_after:
            raise StoppedEarly(f"stopped after epoch {epoch + 1} ({STOP_ENV}={stop_after})")
        if not go_on or halted > 0:
            result.stopped_by_callback = True
            logger.info("a callback stopped training after epoch %d", epoch + 1)
            break
    return result


def finish_training(net: gluon.Block, callbacks: Sequence[Any], temporary_dir: Optional[str] = None,
                    result: Optional[FitResult] = None) -> None:
    """GluonTS's last hook: ``on_train_end`` (iteravg's loads the averaged model into ``net``), then, with
    ``result`` of ``fit(checkpoint_dir=...)``, a final snapshot if the last epoch has none.

    Call it on every rank after ``fit``; then ``collectives.finish(comm)`` before the process may exit.
    """
    for cb in callbacks:
        cb.on_train_end(training_network=net, temporary_dir=temporary_dir, ctx=mx.cpu())
    if result is not None and result.snapshots is not None:
        result.snapshots.write_final(net)


def _holds_average(callbacks: Sequence[Any]) -> bool:
    """Whether validation ran on averaged weights (an iteravg strategy with an average swapped them in)."""
    return any(getattr(getattr(cb, "avg_strategy", None), "averaged_model", None) is not None for cb in callbacks)


def _restore_training_weights(callbacks: Sequence[Any], net: gluon.Block) -> None:
    for cb in callbacks:
        strategy = getattr(cb, "avg_strategy", None)
        if strategy is not None and hasattr(strategy, "load_cached_model"):
            strategy.load_cached_model(net)
