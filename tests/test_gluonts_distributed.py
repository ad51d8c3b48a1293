"""``iteravg.gluonts.Trainer``: GluonTS estimators trained data-parallel under real launchers, and the guard.

Multi-rank jobs (one per launcher) train SimpleFeedForward and DeepAR on synthetic series, then train again
resuming the averaging state; every rank's trained and averaged networks must be bitwise identical, the rank-0
predictor must deserialise with GluonTS and forecast within a documented tolerance of one process trained on the
same total number of windows. Single-process tests check parity with GluonTS's own Trainer.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import horovodrun, mpirun, run  # noqa: E402

pytest.importorskip("gluonts.mx")
pytestmark = pytest.mark.filterwarnings("ignore")

WORKER = "tests/multirank/worker_gluonts.py"
ESTIMATORS = ("sff", "deepar")
#: 2 ranks x batch 16 vs 1 process x batch 32 (same windows per step, same steps): documented in docs/gluonts.md.
MSE_TOLERANCE = 1.25

JOBS = {
    "horovodrun-mpi-2": (lambda a: horovodrun(2, a), None, "horovod"),
    "horovodrun-gloo-2": (lambda a: horovodrun(2, a, gloo=True), None, "horovod"),
    "mpirun-mpi4py-2": (lambda a: mpirun(2, a), {"ITERAVG_COMM": "mpi"}, "mpi"),
}


def worker_module():
    import worker_gluonts  # noqa: WPS433 -- the worker's data, for the baseline

    return worker_gluonts


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, batch 32 (= 2 ranks x 16), the same epochs and batches per epoch."""
    out = tmp_path_factory.mktemp("one")
    run([sys.executable, WORKER, str(out), "--batch-size", "32"], timeout=240)
    return {k: json.loads((out / k / "rank0.json").read_text()) for k in ESTIMATORS}


def zero_forecast_mse() -> float:
    w = worker_module()
    return float(np.mean([np.mean(v[-w.PRED:] ** 2) for v in w.series()]))


@pytest.mark.multirank
@pytest.mark.parametrize("job", list(JOBS))
def test_estimators_train_data_parallel(job, tmp_path, one_process):
    launch, env, comm = JOBS[job]
    run(launch([WORKER, str(tmp_path), "--batch-size", "16", "--resume"]), timeout=300, env=env)
    for kind in ESTIMATORS:
        out = tmp_path / kind
        for prefix in ("", "resumed-"):
            infos = [json.loads((out / f"{prefix}rank{r}.json").read_text()) for r in (0, 1)]
            assert {i["comm"] for i in infos} == {comm} and {i["size"] for i in infos} == {2}
            # Bitwise: the last training iterate and the final (averaged) network, every parameter byte.
            for what in ("last", "avg"):
                a, b = ((out / f"{prefix}rank{r}-{what}.bin").read_bytes() for r in (0, 1))
                assert len(a) > 1000 and a == b, f"{kind} {prefix}{what}: ranks differ"
            assert (out / f"{prefix}rank0-last.bin").read_bytes() != (out / f"{prefix}rank0-avg.bin").read_bytes()
            # Callbacks saw the same reduced losses and learning rates; averaging decided the same.
            assert infos[0]["losses"] == infos[1]["losses"] and len(infos[0]["losses"]) == 3
            assert infos[0]["lrs"] == infos[1]["lrs"]
            assert infos[0]["started"] and infos[0]["average_counter"] == infos[1]["average_counter"] > 0
            assert "mse" in infos[0] and "mse" not in infos[1]  # rank 0 serialised, deserialised and forecast
            assert (out / f"{prefix}predictor").is_dir() and np.isfinite(infos[0]["mse"])
        first = json.loads((out / "rank0.json").read_text())
        resumed = [json.loads((out / f"resumed-rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["resumed_epoch"] for r in resumed] == [3, 3]  # the averaging state of epoch 3 was restored
        assert resumed[0]["average_counter"] > first["average_counter"]  # and counting went on from it
        # Quality: within the documented tolerance of one process on the same windows per step, and useful.
        assert first["mse"] <= MSE_TOLERANCE * one_process[kind]["mse"], (kind, first["mse"], one_process[kind])
        assert first["mse"] < 0.8 * zero_forecast_mse()


@pytest.mark.multirank
def test_plain_gluonts_trainer_under_horovodrun_is_refused(tmp_path):
    """The old path: GluonTS's own Trainer + iteravg's callback on 2 ranks must fail loudly, not average replicas."""
    proc = run(horovodrun(2, [WORKER, str(tmp_path), "--plain", "--estimator", "sff", "--epochs", "2"]),
               timeout=240, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "IndependentReplicasError" in text and "from iteravg.gluonts import Trainer" in text
    assert not (tmp_path / "sff" / "rank0.json").exists()


@pytest.mark.multirank
def test_gluonts_default_model_averaging_picks_the_best_epoch_by_reduced_loss(tmp_path):
    """No iteration averaging: GluonTS's default ModelAveraging (best epoch) runs on rank 0, from files only rank 0
    wrote, scored with the losses reduced across ranks; every rank ends with that epoch's network."""
    # 2 batches per epoch: noisy epoch losses, so the best epoch is not simply the last one (epoch 5 of 6 here).
    run(horovodrun(2, [WORKER, str(tmp_path), "--estimator", "sff", "--epochs", "6", "--batches", "2", "--defaults"],
                   gloo=True), timeout=240)
    infos = [json.loads((tmp_path / "sff" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert infos[0]["losses"] == infos[1]["losses"] and infos[0]["epoch_hashes"] == infos[1]["epoch_hashes"]
    best = int(np.argmin(infos[0]["losses"]))
    assert infos[0]["final_hash"] == infos[1]["final_hash"] == infos[0]["epoch_hashes"][best]
    assert all(infos[0]["files"]) and not any(infos[1]["files"])  # per-epoch parameter files: rank 0 only
    a, b = ((tmp_path / "sff" / f"rank{r}-avg.bin").read_bytes() for r in (0, 1))
    assert a == b


@pytest.mark.multirank
def test_a_rank_skipping_nan_batches_joins_the_step(tmp_path):
    """GluonTS skips a batch with a NaN loss on the rank that saw it; that rank must still join the step's
    allreduce (mid-epoch and as the epoch's last batch), and the ranks stay bitwise identical."""
    # 8 batches per epoch: batch 5 is mid-epoch 0 (caught up when batch 6 is fetched), 7 ends epoch 0 (caught up
    # in on_train_epoch_end), 8 and 9 are consecutive at the start of epoch 1.
    proc = run(mpirun(2, [WORKER, str(tmp_path), "--estimator", "sff", "--epochs", "2", "--nan-batch", "1:5,7,8,9"]),
               timeout=240, env={"ITERAVG_COMM": "mpi"})
    text = proc.stdout + proc.stderr
    assert text.count("rank 1 skipped a batch with a non-finite loss") == 4, text[-3000:]
    for what in ("last", "avg"):
        a, b = ((tmp_path / "sff" / f"rank{r}-{what}.bin").read_bytes() for r in (0, 1))
        assert a == b and np.isfinite(np.frombuffer(a, dtype=np.float32)).all()
    infos = [json.loads((tmp_path / "sff" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert infos[0]["losses"] == infos[1]["losses"] and all(np.isfinite(infos[0]["losses"]))


# -- one process --------------------------------------------------------------------------------------------
def _train(trainer_cls, callbacks=None, **kw):
    import random

    from gluonts.mx import SimpleFeedForwardEstimator

    w = worker_module()
    mx.random.seed(5)
    np.random.seed(5)
    random.seed(5)
    trainer = trainer_cls(ctx="cpu", epochs=3, num_batches_per_epoch=4, learning_rate=1e-2,
                          callbacks=callbacks, **kw)
    est = SimpleFeedForwardEstimator(num_hidden_dimensions=[8], prediction_length=w.PRED, context_length=12,
                                     batch_size=8, trainer=trainer)
    data = w.dataset([v[: -w.PRED] for v in w.series()])
    predictor = est.train(data, data)
    return trainer, [p.data().asnumpy() for p in predictor.prediction_net.collect_params().values()]


def test_one_process_is_gluonts_trainer_bitwise():
    from gluonts.mx.trainer import Trainer as GluonTSTrainer

    from iteravg.gluonts import Trainer

    _, ref = _train(GluonTSTrainer)
    trainer, got = _train(Trainer)
    assert isinstance(trainer, GluonTSTrainer)
    assert len(got) == len(ref) and all(a.tobytes() == b.tobytes() for a, b in zip(got, ref))


def test_default_model_averaging_left_out_with_iteration_averaging():
    from gluonts.mx.trainer.learning_rate_scheduler import LearningRateReduction
    from gluonts.mx.trainer.model_averaging import ModelAveraging, SelectNBestMean

    from iteravg.gluonts import Trainer
    from iteravg.mx import NTA, ModelIterationAveraging

    kinds = lambda t: [type(cb) for cb in t.callbacks.callbacks]  # noqa: E731
    assert kinds(Trainer()) == [ModelAveraging, LearningRateReduction]  # GluonTS's defaults
    mia = ModelIterationAveraging(NTA(epochs=3))
    with pytest.warns(UserWarning, match="default ModelAveraging callback is left out"):
        t = Trainer(callbacks=[mia])
    assert kinds(t) == [ModelIterationAveraging, LearningRateReduction]
    with pytest.warns(UserWarning, match="replaces the iteration-averaged network"):
        t = Trainer(callbacks=[mia, ModelAveraging(avg_strategy=SelectNBestMean(num_models=2))])
    assert kinds(t) == [ModelIterationAveraging, ModelAveraging, LearningRateReduction]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kinds(Trainer(callbacks=[mia], add_default_callbacks=False)) == [ModelIterationAveraging]


def test_averaged_model_survives_training_on_one_process():
    """With iteravg's callback the network the predictor holds is the average, not the best epoch's."""
    from iteravg.gluonts import Trainer
    from iteravg.mx import Alpha_Suffix, ModelIterationAveraging

    strategy = Alpha_Suffix(epochs=3, alpha=0.7)
    _, got = _train(Trainer, callbacks=[ModelIterationAveraging(strategy)])
    avg = [v.asnumpy() for v in strategy.averaged_model.values()]
    assert len(avg) == len(got) and all(a.tobytes() == b.tobytes() for a, b in zip(avg, got))


def test_incompatible_gluonts_is_named(monkeypatch):
    from gluonts.mx.trainer import _base

    from iteravg.gluonts import trainer as mod

    monkeypatch.setattr(_base, "mx", object())
    with pytest.raises(mod.GluonTSVersionError, match=r"GluonTS 0\.17.*installed GluonTS 0\.17\.\d"):
        mod.check_gluonts()


def test_guard_on_one_process_and_fingerprint_bits():
    from iteravg.comm import LocalComm
    from iteravg.gluonts.guard import check_replicas_in_sync, parameter_fingerprint

    net = mx.gluon.nn.Dense(3, in_units=4)
    net.initialize()
    before = parameter_fingerprint(net)
    assert check_replicas_in_sync(LocalComm(), net, strict=True)
    w = net.weight.data().asnumpy()
    w.view(np.uint32)[0, 0] ^= 1  # one bit
    net.weight.set_data(mx.nd.array(w))
    assert parameter_fingerprint(net) != before



def test_trainer_round_trips_through_gluonts_serde():
    """GluonTS serialises estimators with their trainer (serde); ours must come back as itself."""
    from gluonts.core import serde

    from iteravg.gluonts import Trainer

    back = serde.load_json(serde.dump_json(Trainer(epochs=3, learning_rate=0.01, num_batches_per_epoch=7)))
    assert type(back) is Trainer and (back.epochs, back.learning_rate, back.num_batches_per_epoch) == (3, 0.01, 7)
