"""The model zoo: tiny real Gluon networks covering the layer types, dtypes and set-ups averaging must handle.

Every averaging test can run over ``ZOO``. A model is built by ``build(dtype)`` into a ``Built``: the initialized
network (deferred shapes already resolved by one forward), a function making a seeded input batch, and the
contexts it lives on. ``train_step`` is the one SGD step every test uses, so two copies of a model trained with
the same batches and seeds hold bitwise-identical weights (MXNet's CPU kernels are deterministic with
``OMP_NUM_THREADS=1``, which tests/conftest.py sets).

``docs/models.md`` lists this registry as the supported-models table; tests/zoo/test_zoo_docs.py checks the two
agree (``python -m tests.zoo.models`` prints the table).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.base import _LIB, check_call
from mxnet.gluon import nn, rnn

DTYPES = ("float32", "float16", "float64")
BATCH = 4


@dataclass
class Built:
    net: gluon.Block
    batch: Callable[[np.random.Generator], mx.nd.NDArray]  # one input batch (on the CPU, split later)
    ctx: List[mx.Context] = field(default_factory=lambda: [mx.cpu()])


@dataclass(frozen=True)
class ZooModel:
    name: str
    layers: str  # what it exercises, for the docs table
    build: Callable[[str], Built]
    dtypes: Tuple[str, ...] = DTYPES
    #: dtype -> why it is not run (MXNet itself cannot train the model in that dtype on CPU)
    unsupported: Dict[str, str] = field(default_factory=dict)
    multirank: bool = False  # part of the subset run under horovodrun / mpirun
    #: dtype -> why MXNet's own computation on this model is not bitwise reproducible
    nondeterministic: Dict[str, str] = field(default_factory=dict)
    #: False: MXNet's inference outputs under ``hybridize(static_alloc=True)`` vary between identical networks
    static_alloc_reproducible: bool = True

    def runnable(self) -> List[str]:
        return [d for d in self.dtypes if d not in self.unsupported]


# -- builders ------------------------------------------------------------------------------------------------


def _finish(net: gluon.Block, dtype: str, x: Callable[[np.random.Generator], np.ndarray],
            ctx: Sequence[mx.Context] = (mx.cpu(),), cast_input: bool = True) -> Built:
    """Initialize (seeded), cast, resolve deferred shapes with one forward, and wrap the batch maker."""
    mx.random.seed(1)
    net.initialize(mx.init.Xavier(magnitude=1.5), ctx=list(ctx))
    if dtype != "float32":
        net.cast(dtype)

    def batch(rng: np.random.Generator) -> mx.nd.NDArray:
        value = x(rng)
        return mx.nd.array(value, dtype=dtype if cast_input else value.dtype)

    net(batch(np.random.default_rng(0)).as_in_context(ctx[0]))  # deferred initialization happens here
    mx.nd.waitall()
    return Built(net, batch, list(ctx))


def _normal(*shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: rng.standard_normal((BATCH,) + shape).astype(np.float32)


def dense(dtype: str) -> Built:
    net = nn.HybridSequential()
    net.add(nn.Dense(6, in_units=5, activation="tanh"), nn.Dense(3, in_units=6))
    return _finish(net, dtype, _normal(5))


def conv1d(dtype: str) -> Built:
    net = nn.HybridSequential()
    net.add(nn.Conv1D(8, 3, in_channels=4, activation="relu"), nn.Conv1D(4, 3, in_channels=8), nn.Dense(2))
    return _finish(net, dtype, _normal(4, 12))


def conv2d(dtype: str) -> Built:
    net = nn.HybridSequential()
    net.add(nn.Conv2D(8, 3, in_channels=3, activation="relu"), nn.Conv2D(4, 3, in_channels=8, padding=1),
            nn.GlobalAvgPool2D(), nn.Dense(2, in_units=4))
    return _finish(net, dtype, _normal(3, 8, 8))


class _Recurrent(gluon.HybridBlock):
    """A fused gluon.rnn layer (one parameter per gate matrix, ``l0_i2h_weight``...) with a Dense head."""

    def __init__(self, cell: str, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            layer = rnn.LSTM if cell == "lstm" else rnn.GRU
            self.rnn = layer(6, num_layers=2, layout="NTC", input_size=3)
            self.head = nn.Dense(2, flatten=False, in_units=6)

    def hybrid_forward(self, F, x):
        return self.head(self.rnn(x))


def lstm(dtype: str) -> Built:
    return _finish(_Recurrent("lstm"), dtype, _normal(5, 3))


def gru(dtype: str) -> Built:
    return _finish(_Recurrent("gru"), dtype, _normal(5, 3))


class _Scale(gluon.HybridBlock):
    """``tanh(x * w)`` with a per-feature weight: a trainable head MXNet can run in float16 on CPU (it has no
    float16 GEMM there, so no Dense / Conv / RNN in float16)."""

    def __init__(self, units: int, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.weight = self.params.get("weight", shape=(1, units), init=mx.init.Uniform(1.0))

    def hybrid_forward(self, F, x, weight):
        return F.tanh(F.broadcast_mul(x, weight))


class _Embed(gluon.HybridBlock):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.embed = nn.Embedding(11, 4)
            self.norm = nn.BatchNorm(in_channels=4, axis=-1)
            self.head = _Scale(4)

    def hybrid_forward(self, F, x):
        return self.head(self.norm(self.embed(x)))


def embedding_batchnorm(dtype: str) -> Built:
    return _finish(_Embed(), dtype, lambda rng: rng.integers(0, 11, (BATCH, 5)).astype(np.float32))


def layernorm_dropout(dtype: str) -> Built:
    net = nn.HybridSequential()
    net.add(_Scale(5), nn.LayerNorm(in_channels=5), nn.Dropout(0.3), _Scale(5))
    return _finish(net, dtype, _normal(5))


class _Shared(gluon.HybridBlock):
    """The same Dense weights applied twice (``params=``), plus a head: the shared parameters appear once."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.first = nn.Dense(5, in_units=5, activation="tanh")
            self.second = nn.Dense(5, in_units=5, activation="tanh", params=self.first.params)
            self.head = nn.Dense(2, in_units=5)

    def hybrid_forward(self, F, x):
        return self.head(self.second(self.first(x)))


def shared(dtype: str) -> Built:
    return _finish(_Shared(), dtype, _normal(5))


def frozen(dtype: str) -> Built:
    """A frozen (``grad_req='null'``) Conv1D feature extractor under a trained head: averaged all the same."""
    net = nn.HybridSequential()
    net.add(nn.Conv1D(6, 3, in_channels=3), nn.Dense(2))
    built = _finish(net, dtype, _normal(3, 8))
    net[0].collect_params().setattr("grad_req", "null")
    return built


def deferred(dtype: str) -> Built:
    """No ``in_units`` / ``in_channels`` anywhere: shapes are known only after the first forward."""
    net = nn.HybridSequential()
    net.add(nn.Conv1D(4, 3), nn.BatchNorm(), nn.Dense(5), nn.Dense(2))
    return _finish(net, dtype, _normal(3, 9))


class _Mixed(gluon.HybridBlock):
    """A float16 trunk (Embedding, LayerNorm) feeding a float32 Dense head: two dtype groups in one model."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.embed = nn.Embedding(11, 4, dtype="float16")
            self.norm = nn.LayerNorm(in_channels=4)
            self.head = nn.Dense(2, in_units=20)

    def hybrid_forward(self, F, x):
        return self.head(F.cast(self.norm(self.embed(x)), "float32"))


def mixed(dtype: str) -> Built:
    net = _Mixed()
    net.norm.cast("float16")
    return _finish(net, "float32", lambda rng: rng.integers(0, 11, (BATCH, 5)).astype(np.float32))


def two_contexts(dtype: str) -> Built:
    net = nn.HybridSequential()
    net.add(nn.Conv1D(8, 3, in_channels=4, activation="relu"), nn.Dense(2))
    return _finish(net, dtype, _normal(4, 12), ctx=(mx.cpu(0), mx.cpu(1)))


_NO_F16 = "MXNet has no float16 GEMM on CPU (Dense, Conv, RNN)"
_RNN_F64 = ("MXNet 1.9.1's CPU RNN backward in float64 is not reproducible (identical nets drift apart, sometimes "
            "to NaN): iterates are set by perturb() instead of trained")

ZOO: List[ZooModel] = [
    ZooModel("dense", "Dense", dense, unsupported={"float16": _NO_F16}),
    ZooModel("conv1d", "Conv1D (oneDNN)", conv1d, unsupported={"float16": _NO_F16}, multirank=True),
    ZooModel("conv2d", "Conv2D, GlobalAvgPool2D (oneDNN)", conv2d, unsupported={"float16": _NO_F16}),
    ZooModel("lstm", "LSTM (gluon.rnn, fused, 2 layers)", lstm, unsupported={"float16": _NO_F16}, multirank=True,
             nondeterministic={"float64": _RNN_F64}, static_alloc_reproducible=False),
    ZooModel("gru", "GRU (gluon.rnn, fused, 2 layers)", gru, unsupported={"float16": _NO_F16},
             nondeterministic={"float64": _RNN_F64}, static_alloc_reproducible=False),
    ZooModel("embedding_batchnorm", "Embedding, BatchNorm (running statistics)", embedding_batchnorm,
             multirank=True),
    ZooModel("layernorm_dropout", "LayerNorm, Dropout", layernorm_dropout),
    ZooModel("shared", "shared parameters (params=)", shared, unsupported={"float16": _NO_F16}, multirank=True),
    ZooModel("frozen", "frozen Conv1D (grad_req='null')", frozen, unsupported={"float16": _NO_F16}),
    ZooModel("deferred", "deferred initialization (no in_units)", deferred, unsupported={"float16": _NO_F16}),
    ZooModel("mixed", "float16 Embedding + LayerNorm, float32 Dense", mixed, dtypes=("float16+float32",),
             multirank=True),
    ZooModel("two_contexts", "one network on mx.cpu(0) and mx.cpu(1)", two_contexts, dtypes=("float32",)),
]
BY_NAME = {m.name: m for m in ZOO}


def cases(multirank_only: bool = False) -> List[Tuple[str, str]]:
    """(model name, dtype) pairs that run, for ``pytest.mark.parametrize``."""
    return [(m.name, d) for m in ZOO for d in m.runnable() if m.multirank or not multirank_only]


# -- training ------------------------------------------------------------------------------------------------


def make_trainer(built: Built, lr: float = 0.05) -> gluon.Trainer:
    return gluon.Trainer(built.net.collect_params(), "sgd", {"learning_rate": lr})


def train_step(built: Built, trainer: gluon.Trainer, rng_seed: int, batch: mx.nd.NDArray) -> float:
    """One SGD step on ``batch`` (split across the model's contexts); Dropout draws from ``rng_seed``.

    On several contexts the weights are first put back into the default layout: MXNet 1.9.1 races when training
    starts from weights an inference forward left oneDNN-blocked (the conv op pushes its reorder back from a
    worker thread, after the kvstore's copy into the weight was queued: "Check failed: to.IsDefaultData()").
    That happens with or without averaging (e.g. after a validation epoch in which no average exists yet).
    """
    if len(built.ctx) > 1:
        to_default_layout(built.net)
    parts = gluon.utils.split_and_load(batch, built.ctx, even_split=False) if len(built.ctx) > 1 else [batch]
    mx.random.seed(rng_seed)
    with autograd.record():
        losses = [((built.net(x).astype("float32") - 1) ** 2).mean() for x in parts]
    autograd.backward(losses)
    trainer.step(batch.shape[0])
    return float(sum(loss.asscalar() for loss in losses))


def perturb(built: Built, rng: np.random.Generator) -> None:
    """A deterministic stand-in for a training step: every trained parameter moves by a seeded random step."""
    for p in built.net.collect_params().values():
        if p.grad_req == "null":
            continue
        value = p.list_data()[0].asnumpy()
        p.set_data(mx.nd.array(value + 0.05 * rng.standard_normal(value.shape).astype(value.dtype),
                               dtype=value.dtype))
    mx.nd.waitall()


def step(model: ZooModel, dtype: str, built: Built, trainer: gluon.Trainer, seed: int,
         batch: mx.nd.NDArray) -> None:
    """``train_step``, or ``perturb`` where MXNet's training of this model in ``dtype`` is not reproducible."""
    if dtype in model.nondeterministic:
        perturb(built, np.random.default_rng(seed))
    else:
        train_step(built, trainer, seed, batch)


def infer(built: Built, batch: mx.nd.NDArray, recording: bool) -> mx.nd.NDArray:
    """An inference-mode forward, as validation does: plain, or GluonTS's ``record()`` + ``predict_mode()``.

    Under oneDNN this reorders Conv / FullyConnected weights in place into a blocked layout.
    """
    x = batch.as_in_context(built.ctx[0])
    if recording:
        with autograd.record(), autograd.predict_mode():
            out = built.net(x)
    else:
        out = built.net(x)
    out.wait_to_read()
    return out


def weights(net: gluon.Block) -> List[np.ndarray]:
    """Every parameter (first context), in ``collect_params()`` order."""
    return [p.list_data()[0].asnumpy() for p in net.collect_params().values()]


def to_default_layout(net: gluon.Block) -> None:
    """Undo oneDNN's in-place blocked layout of every parameter (``MXNDArrayGetData`` reorders back).

    Needed before ``set_data`` into a Conv1D weight an inference forward left in oneDNN layout: MXNet 1.9.1
    cannot copy into it (``Check failed: to.IsDefaultData()``, oneDNN supports 1-, 2- and 4-d arrays only).
    """
    mx.nd.waitall()
    ptr = ctypes.c_void_p()
    for p in net.collect_params().values():
        for arr in p.list_data():
            check_call(_LIB.MXNDArrayGetData(arr.handle, ctypes.byref(ptr)))


def copy_weights(src: gluon.Block, dst: gluon.Block) -> None:
    """Make ``dst`` (the same architecture, built separately) start from ``src``'s exact values."""
    to_default_layout(dst)
    for a, b in zip(src.collect_params().values(), dst.collect_params().values()):
        b.set_data(a.list_data()[0].copy())
    mx.nd.waitall()


def table() -> str:
    """The supported-models table of docs/models.md, from this registry."""
    head = ["model", "layers", *DTYPES, "float16+float32", "2 ranks (horovodrun, mpirun)"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in ZOO:
        cells = [f"`{m.name}`", m.layers]
        for d in (*DTYPES, "float16+float32"):
            cells.append("yes" if d in m.runnable() else "n/a (MXNet)" if d in m.unsupported else "-")
        cells.append("yes" if m.multirank else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
