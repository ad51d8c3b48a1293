"""Every zoo model, every dtype MXNet can train it in, hybridized and not: GluonTS's own averaging and iteravg's,
driven through their callbacks by the same SGD training with validation swaps, end bitwise identical.

Compared bit for bit (``tobytes``) after every epoch: the training weights (a swap that corrupts a weight, as
oneDNN's in-place reorder of Conv weights once did, shows up here), the averaged model, the validation outputs
of the swapped-in averaged model, and the final networks after ``on_train_end``.
"""

from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest

import iteravg.mx as ours
from iteravg.mx.ndarray import mxnet_scalar

from .models import BY_NAME, cases, copy_weights, infer, make_trainer, step, to_default_layout, weights

gl = pytest.importorskip("gluonts.mx.trainer.model_iteration_averaging")
pytestmark = pytest.mark.filterwarnings("ignore")

EPOCHS, BATCHES, ETA = 4, 4, 0.5  # 12 folds; with eta=0.5 folds 6 and 9 hit MXNet's 1-ulp scalar parse


def bits(arrays) -> list:
    return [np.ascontiguousarray(a).tobytes() for a in arrays]


def assert_same_bits(got, ref, what: str) -> None:
    assert len(got) == len(ref), what
    for i, (a, b) in enumerate(zip(got, ref)):
        if a.tobytes() != b.tobytes():
            diff = int(np.sum(a.reshape(-1).view(np.uint8) != b.reshape(-1).view(np.uint8)))
            raise AssertionError(f"{what}: tensor {i} {a.dtype}{list(a.shape)} differs ({diff} bytes)")


def run(name: str, dtype: str, hybridize: bool):
    model = BY_NAME[name]
    ref, own = model.build(dtype), model.build(dtype)
    copy_weights(ref.net, own.net)
    if hybridize:
        ref.net.hybridize()
        own.net.hybridize()
    def gluonts_fix(built) -> None:
        """GluonTS's own swap crashes on a Conv1D weight an inference forward left in oneDNN layout (MXNet
        1.9.1 cannot ``set_data`` into a 3-d oneDNN array); restore the reference's layout (not its values)
        first. iteravg's network gets no such help."""
        if built is ref:
            to_default_layout(built.net)

    runs = []
    for built, lib in ((ref, gl), (own, ours)):
        strategy = lib.Alpha_Suffix(epochs=EPOCHS, alpha=1.0, eta=ETA)
        runs.append((built, make_trainer(built), strategy, lib.ModelIterationAveraging(avg_strategy=strategy)))
    rng = np.random.default_rng(3)
    val_batch = ref.batch(np.random.default_rng(99))
    for epoch in range(EPOCHS):
        for b in range(BATCHES):
            batch = ref.batch(rng)
            step(model, dtype, ref, runs[0][1], 100 * epoch + b, batch)
            if dtype in model.nondeterministic:  # see models.perturb: both see the reference's iterate
                copy_weights(ref.net, own.net)
            else:
                step(model, dtype, own, runs[1][1], 100 * epoch + b, batch)
            for built, _, _, cb in runs:
                cb.on_train_batch_end(training_network=built.net)
        outputs = []
        for built, _, _, cb in runs:
            gluonts_fix(built)
            cb.on_validation_epoch_start(training_network=built.net)
            outputs.append([infer(built, val_batch, recording=r).asnumpy() for r in (True, False)])
            gluonts_fix(built)
            cb.on_validation_epoch_end(epoch_no=epoch, epoch_loss=1.0, training_network=built.net, trainer=None)
        for built, _, _, cb in runs:
            cb.on_epoch_end(epoch_no=epoch, epoch_loss=1.0, training_network=built.net, trainer=None,
                            best_epoch_info={}, ctx=mx.cpu())
        assert_same_bits(weights(own.net), weights(ref.net), f"epoch {epoch}: training weights")
        (_, _, s_ref, _), (_, _, s_own, _) = runs
        assert s_own.average_counter == s_ref.average_counter
        if s_ref.averaged_model is not None:
            assert_same_bits([v.asnumpy() for v in s_own.averaged_model.values()],
                             [v.asnumpy() for v in s_ref.averaged_model.values()], f"epoch {epoch}: average")
        assert_same_bits(outputs[1], outputs[0], f"epoch {epoch}: validation output of the averaged model")
    for built, _, _, cb in runs:
        gluonts_fix(built)
        cb.on_train_end(training_network=built.net, temporary_dir=None)
    assert_same_bits(weights(own.net), weights(ref.net), "final network (averaged model loaded)")
    return runs[1][2]


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("name,dtype", cases())
def test_bitwise_equal_to_gluonts(name, dtype, hybridize):
    strategy = run(name, dtype, hybridize)
    assert strategy.average_counter >= 9
    # Not vacuous for float64: some fold weight is one MXNet parses 1 ulp away from the Python float.
    alphas = [(ETA + 1) / (ETA + k) for k in range(2, strategy.average_counter + 1)]
    assert any(mxnet_scalar(a) != a for a in alphas)


def set_all(built, fill) -> None:
    for p in built.net.collect_params().values():
        p.set_data(mx.nd.array(fill(p.shape), dtype=p.dtype))
    mx.nd.waitall()


@pytest.mark.parametrize("name", ["layernorm_dropout", "embedding_batchnorm", "mixed"])
def test_float16_fold_weight_is_rounded_like_mxnet(name):
    """MXNet turns the fold weight into float16 through float32 (two roundings); at fold 8283 with eta=0 that
    differs from rounding the double directly. Both implementations fold there once and must agree. (An average
    of zeros and an iterate of hundreds make ``alpha * (x - avg)`` visible in float16 at all.)"""
    k = 8283
    alpha = mxnet_scalar(1.0 / k)
    assert np.float16(alpha) != np.float16(np.float32(alpha))  # the case is the rare one
    model = BY_NAME[name]
    dtype = model.runnable()[-1] if name == "mixed" else "float16"
    ref, own = model.build(dtype), model.build(dtype)
    s_ref, s_own = gl.IterationAveragingStrategy(eta=0), ours.IterationAveragingStrategy(eta=0)
    rng = np.random.default_rng(0)
    for built in (ref, own):
        set_all(built, np.zeros)
    for strategy, built in ((s_ref, ref), (s_own, own)):
        strategy.averaging_started = True
        strategy.update_average(built.net)  # the copy: an average of zeros
        strategy.average_counter = k - 1
    set_all(ref, lambda shape: rng.uniform(100, 1000, shape))
    copy_weights(ref.net, own.net)
    s_ref.update_average(ref.net)
    s_own.update_average(own.net)
    assert s_own.average_counter == s_ref.average_counter == k
    assert_same_bits([v.asnumpy() for v in s_own.averaged_model.values()],
                     [v.asnumpy() for v in s_ref.averaged_model.values()], "fold with a double-rounded weight")
