"""Real multi-process jobs: every rank must end with the same trigger and a bitwise-identical averaged model,
equal to GluonTS's averaging of the rank-mean iterates, and rank 0's checkpoint must load and equal it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import horovodrun, mpirun, run  # noqa: E402
from scenario import BATCHES, EPOCHS, iterate, make_net, metric, nta_kwargs, set_iterate  # noqa: E402

from iteravg.core.schedules import NTASchedule  # noqa: E402

pytestmark = [pytest.mark.multirank, pytest.mark.filterwarnings("ignore")]
WORKER = "tests/multirank/worker_sync.py"

JOBS = {
    "horovodrun-mpi-2": lambda out, *a: horovodrun(2, [WORKER, str(out), *a]),
    "horovodrun-gloo-3": lambda out, *a: horovodrun(3, [WORKER, str(out), *a], gloo=True),
    "mpirun-mpi4py-3": lambda out, *a: mpirun(3, [WORKER, str(out), *a]),
}
JOB_ENV = {"mpirun-mpi4py-3": {"ITERAVG_COMM": "mpi"}}
EXPECTED_COMM = {"horovodrun-mpi-2": "horovod", "horovodrun-gloo-3": "horovod", "mpirun-mpi4py-3": "mpi"}


def reference(size: int):
    """GluonTS's own callback driven with the rank-mean iterates and the rank-mean metric."""
    from gluonts.mx.trainer import model_iteration_averaging as gl

    net = make_net()
    strategy = gl.NTA(**nta_kwargs())
    cb = gl.ModelIterationAveraging(avg_strategy=strategy)
    started = []
    for epoch in range(EPOCHS):
        for b in range(BATCHES):
            per_rank = [iterate(net, r, epoch, b) for r in range(size)]
            set_iterate(net, [np.mean([v[i] for v in per_rank], axis=0, dtype=np.float64).astype(np.float32)
                              for i in range(len(per_rank[0]))])
            cb.on_train_batch_end(training_network=net)
        mean_metric = float(np.mean([metric(r, epoch) for r in range(size)]))
        cb.on_epoch_end(epoch_no=epoch, epoch_loss=mean_metric, training_network=net, trainer=None,
                        best_epoch_info={}, ctx=mx.cpu())
        started.append(strategy.averaging_started)
    avg = np.concatenate([v.asnumpy().ravel() for v in strategy.averaged_model.values()])
    return started, avg, strategy.average_counter


def alone_trigger(rank: int) -> int:
    s = NTASchedule(**nta_kwargs())
    for epoch in range(EPOCHS):
        if s.update_trigger(metric(rank, epoch), epoch + 1):
            return epoch
    return -1


def read_ranks(out: Path, size: int):
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(size)]
    avgs = [(out / f"rank{r}-avg.npy").read_bytes() for r in range(size)]
    nets = [(out / f"rank{r}-net.npy").read_bytes() for r in range(size)]
    return infos, avgs, nets


@pytest.mark.parametrize("job", list(JOBS))
def test_identical_average_on_every_rank(job, tmp_path):
    size = int(job.rsplit("-", 1)[1])
    run(JOBS[job](tmp_path), timeout=240, env=JOB_ENV.get(job))
    infos, avgs, nets = read_ranks(tmp_path, size)
    assert {i["comm"] for i in infos} == {EXPECTED_COMM[job]}
    assert {i["size"] for i in infos} == {size}

    # The scenario is meaningful: ranks alone would trigger at different epochs.
    assert len({alone_trigger(r) for r in range(size)}) == size
    # Consensus: identical decisions on every rank, equal to GluonTS's on the rank-mean metric.
    ref_started, ref_avg, ref_counter = reference(size)
    for info in infos:
        assert info["started"] == ref_started
        assert info["counter"] == ref_counter
    # Bitwise identity across ranks, of the average and of the network after on_train_end loaded it.
    assert all(a == avgs[0] for a in avgs), "averaged models differ across ranks"
    assert all(n == nets[0] for n in nets), "networks after on_train_end differ across ranks"
    avg0 = np.load(tmp_path / "rank0-avg.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "rank0-net.npy"), avg0)
    # Equal to the average of the rank-mean iterates (GluonTS's implementation).
    np.testing.assert_allclose(avg0, ref_avg, rtol=1e-5, atol=1e-6)

    # Rank 0's checkpoint: loads into a network and equals the averaged model; only rank 0 wrote.
    ckpt = tmp_path / "ckpt"
    state = json.loads((ckpt / "averaging-state.json").read_text())
    assert state["world_size"] == size and state["averager"]["schedule"]["averaging_started"]
    net = make_net()
    net.load_parameters(str(ckpt / "averaged.params"))
    loaded = np.concatenate([p.data().asnumpy().ravel() for p in net.collect_params().values()])
    np.testing.assert_array_equal(loaded, avg0)
    written = [p.name for p in ckpt.iterdir()]
    assert not [n for n in written if n.startswith(".tmp")], written


def test_mismatched_models_raise_the_same_error_on_every_rank(tmp_path):
    proc = run(horovodrun(3, [WORKER, str(tmp_path), "--variant-on-rank", "2"], gloo=True), timeout=180, check=False)
    assert proc.returncode != 0
    errors = [(tmp_path / f"rank{r}.error").read_text() for r in range(3)]
    assert len(set(errors)) == 1, errors
    # Structural names ("0.weight"), whatever Gluon's block counter was on each rank.
    assert "LayoutMismatchError" in errors[0] and "'0.weight'" in errors[0] and "ranks [2]" in errors[0]


def test_resume_on_same_and_different_world_size(tmp_path):
    """Stop after 5 epochs on 2 ranks; resume on 2 ranks (bitwise equal to an uninterrupted run) and on 3."""
    full, part = tmp_path / "full", tmp_path / "part"
    run(horovodrun(2, [WORKER, str(full)]), timeout=180)
    run(horovodrun(2, [WORKER, str(part), "--stop-after", "5"]), timeout=180)
    state = json.loads((part / "ckpt" / "averaging-state.json").read_text())
    assert state["epoch"] == 5 and state["averager"]["schedule"]["averaging_started"]
    three = tmp_path / "three"
    three.mkdir()
    shutil.copytree(part / "ckpt", three / "ckpt", symlinks=True)
    run(horovodrun(2, [WORKER, str(part), "--resume"]), timeout=180)
    infos_full, avgs_full, _ = read_ranks(full, 2)
    infos_part, avgs_part, _ = read_ranks(part, 2)
    assert avgs_part == avgs_full, "resumed run is not bitwise equal to the uninterrupted one"
    assert [i["counter"] for i in infos_part] == [i["counter"] for i in infos_full]
    assert infos_part[0]["trigger_epoch"] == infos_full[0]["trigger_epoch"]

    run(mpirun(3, [WORKER, str(three), "--resume"]), timeout=180, env={"ITERAVG_COMM": "mpi"})
    infos3, avgs3, _ = read_ranks(three, 3)
    assert all(a == avgs3[0] for a in avgs3)
    assert infos3[0]["trigger_epoch"] == infos_full[0]["trigger_epoch"]
    assert infos3[0]["counter"] == infos_full[0]["counter"]


def test_divergent_replicas_are_detected_and_repaired(tmp_path):
    """Fault injection flips one bit on rank 1 after each allreduce: the fingerprint check must catch it and
    the repair broadcast must leave every rank bitwise identical (and still equal to the reference)."""
    proc = run(horovodrun(2, [WORKER, str(tmp_path)]), timeout=180,
               env={"ITERAVG_FAULT": "diverge-after-allreduce:1"})
    assert "repaired by a broadcast from rank 0" in proc.stdout + proc.stderr
    _, avgs, nets = read_ranks(tmp_path, 2)
    assert avgs[0] == avgs[1] and nets[0] == nets[1]
    _, ref_avg, _ = reference(2)
    np.testing.assert_allclose(np.load(tmp_path / "rank0-avg.npy"), ref_avg, rtol=1e-5, atol=1e-6)


def test_nan_metric_on_one_rank_is_left_out_of_the_consensus(tmp_path):
    run(horovodrun(2, [WORKER, str(tmp_path), "--nan-metric-ranks", "1"]), timeout=180)
    infos, avgs, _ = read_ranks(tmp_path, 2)
    assert avgs[0] == avgs[1]
    # The consensus metric is rank 0's alone, so the trigger is rank 0's own.
    assert infos[0]["trigger_epoch"] == infos[1]["trigger_epoch"] == alone_trigger(0) + 1


def test_nan_metric_on_every_rank_raises_the_same_error_everywhere(tmp_path):
    proc = run(horovodrun(2, [WORKER, str(tmp_path), "--nan-metric-ranks", "0,1"]), timeout=180, check=False)
    assert proc.returncode != 0
    errors = [(tmp_path / f"rank{r}.error").read_text() for r in range(2)]
    assert errors[0] == errors[1] and "ValueError" in errors[0] and "metric" in errors[0]


def test_nan_parameters_on_one_rank_are_refused_not_averaged(tmp_path):
    proc = run(horovodrun(2, [WORKER, str(tmp_path), "--nan-param-rank", "1"]), timeout=180)
    assert "NaN or inf" in proc.stdout + proc.stderr
    infos, avgs, _ = read_ranks(tmp_path, 2)
    assert avgs[0] == avgs[1]
    assert np.isfinite(np.load(tmp_path / "rank0-avg.npy")).all()


def test_a_rank_with_nothing_folded_does_not_dilute_the_mean(tmp_path):
    """Rank 1's first averaged iterate (epoch 2's last, folded at the trigger) is NaN and refused, so at that
    epoch's sync rank 1 holds no average. The mean must be rank 0's alone, not half of it."""
    run(horovodrun(2, [WORKER, str(tmp_path), "--nan-param-rank", "1", "--nan-param-at", "2,2",
                       "--stop-after", "3"]), timeout=180)
    infos, avgs, _ = read_ranks(tmp_path, 2)
    assert avgs[0] == avgs[1] and infos[0]["counter"] == 1
    net = make_net()
    expected = np.concatenate([v.ravel() for v in iterate(net, 0, 2, BATCHES - 1)])
    np.testing.assert_array_equal(np.load(tmp_path / "rank0-avg.npy"), expected)


def _damage(snap: Path, damage: str) -> None:
    if damage == "corrupt-byte":
        data = bytearray((snap / "averaged.params").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (snap / "averaged.params").write_bytes(bytes(data))
    elif damage == "truncate":
        path = snap / "averaging-state.json"
        path.write_text(path.read_text()[:100])
    elif damage == "wrong-version":
        path = snap / "averaging-state.json"
        state = json.loads(path.read_text())
        state["format_version"] = 99
        path.write_text(json.dumps(state))


@pytest.mark.parametrize("damage", ["corrupt-byte", "truncate", "wrong-version", "wrong-model"])
def test_bad_checkpoint_on_resume_raises_the_same_error_on_every_rank(tmp_path, damage):
    """Every snapshot damaged (or another model): every rank raises the same clear error."""
    run(horovodrun(2, [WORKER, str(tmp_path), "--strategy", "alpha", "--stop-after", "6"]), timeout=180)
    snaps = [p for p in (tmp_path / "ckpt").iterdir() if p.is_dir() and not p.is_symlink() and p.name[0] != "."]
    assert len(snaps) == 2  # keep_checkpoints=2
    extra = ["--variant-on-rank", "-2"] if damage == "wrong-model" else []
    for snap in snaps:
        _damage(snap, damage)
    for r in range(2):
        (tmp_path / f"rank{r}.error").unlink(missing_ok=True)
    proc = run(horovodrun(2, [WORKER, str(tmp_path), "--strategy", "alpha", "--resume", *extra]), timeout=120,
               check=False)
    assert proc.returncode != 0
    errors = [(tmp_path / f"rank{r}.error").read_text() for r in range(2)]
    assert errors[0] == errors[1], errors
    expected = {"corrupt-byte": "verifies", "truncate": "verifies", "wrong-version": "verifies",
                "wrong-model": "another model"}[damage]
    assert errors[0].split(":")[0] in ("ValueError", "CheckpointError"), errors[0]
    assert expected in errors[0], errors[0]


def test_corrupt_latest_falls_back_to_the_previous_snapshot(tmp_path):
    """Only ``latest`` damaged: every rank resumes from the newest snapshot that verifies, and the log says so."""
    run(horovodrun(2, [WORKER, str(tmp_path), "--strategy", "alpha", "--stop-after", "6"]), timeout=180)
    _damage(tmp_path / "ckpt" / "latest", "corrupt-byte")
    proc = run(horovodrun(2, [WORKER, str(tmp_path), "--strategy", "alpha", "--resume"]), timeout=120)
    assert "epoch-000005, the newest snapshot that verifies" in proc.stdout + proc.stderr
    infos, avgs, _ = read_ranks(tmp_path, 2)
    assert avgs[0] == avgs[1]


def test_sync_every_k_batches_and_only_rank_0_writes(tmp_path):
    """sync_every_batches=2 adds batch-level syncs; the result is still the average of the rank means, and
    with a checkpoint directory per rank only rank 0's is ever created."""
    run(horovodrun(2, [WORKER, str(tmp_path), "--sync-every", "2", "--ckpt-per-rank"]), timeout=180)
    infos, avgs, _ = read_ranks(tmp_path, 2)
    assert avgs[0] == avgs[1]
    _, ref_avg, ref_counter = reference(2)
    assert infos[0]["counter"] == ref_counter
    np.testing.assert_allclose(np.load(tmp_path / "rank0-avg.npy"), ref_avg, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "ckpt-r0" / "averaged.params").exists()
    assert not (tmp_path / "ckpt-r1").exists()


@pytest.mark.timeout(900)
def test_mxnet_data_parallel_sharded_and_unsharded_equal_the_single_process_average(tmp_path):
    """An MXNet model (Dense + BatchNorm + Dense) with the same trained parameters on every rank: under horovodrun
    (MPI and Gloo controllers) and mpirun + mpi4py, sharded and not, every rank's average of the trained parameters
    has the bits of a single process averaging the same iterates, and sharded equals unsharded everywhere (BatchNorm's
    per-rank statistics included)."""
    alone = tmp_path / "one"
    run([sys.executable, WORKER, str(alone), "--data-parallel"], timeout=180)
    ref = json.loads((alone / "rank0.json").read_text())
    jobs = {"hvd": lambda a: horovodrun(2, a), "gloo": lambda a: horovodrun(2, a, gloo=True),
            "mpi": lambda a: mpirun(3, a)}
    for name, make in jobs.items():
        digests = []
        for sharded in (True, False):
            out = tmp_path / f"{name}-{sharded}"
            run(make([WORKER, str(out), "--data-parallel", *(["--sharded"] if sharded else [])]),
                env={"ITERAVG_COMM": "mpi"} if name == "mpi" else None, timeout=300)
            res = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
            assert all(r["sharded"] == sharded for r in res) and len(res) == res[0]["size"] > 1
            assert len({json.dumps(r["digests"], sort_keys=True) for r in res}) == 1, (name, sharded)
            for t in ref["trained"]:
                assert res[0]["digests"][t] == ref["digests"][t], (name, sharded, t)
            digests.append(res[0]["digests"])
        assert digests[0] == digests[1], name
