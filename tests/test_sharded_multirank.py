"""``sharded=True`` and exact data-parallel averages, in real multi-process jobs (mpirun + mpi4py, horovodrun with
the MPI and the Gloo controller, torchrun).

In data-parallel training every rank holds the same iterate: the epoch-end sync then moves no parameter bytes, and the
average of every replicated parameter equals, bit for bit, the same schedule run on one process over the same
iterates -- sharded (each rank folds and stores 1/N of the model) or not. Per-rank statistics (``per_rank``, like
BatchNorm's running means) are still averaged across ranks. Snapshots of a sharded state are whole and resume at any
world size; independent replicas (local SGD) with ``sharded=True`` are refused on every rank with one message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import horovodrun, mpirun, run  # noqa: E402
import worker_sharded as W  # noqa: E402

import iteravg  # noqa: E402

pytestmark = [pytest.mark.multirank, pytest.mark.filterwarnings("ignore")]
WORKER = "tests/multirank/worker_sharded.py"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def launch(kind: str, n: int, args: list, env: dict = None):
    args = [WORKER, *map(str, args)]
    if kind == "mpi":
        return run(mpirun(n, args), env={"ITERAVG_COMM": "mpi", **(env or {})}, timeout=240)
    if kind == "horovod":
        return run(horovodrun(n, args), env=env, timeout=240)
    if kind == "horovod-gloo":
        return run(horovodrun(n, args, gloo=True), env=env, timeout=240)
    return run([TORCHRUN, "--standalone", f"--nproc_per_node={n}", *args], env=env, timeout=240)


def ranks(out: Path, n: int) -> list:
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(n)]


def single_process(size: int, epochs: int = 6) -> dict:
    """The same schedule on one process over the same iterates (rank 0's; bn.mean: the rank-mean in float64)."""
    avg = iteravg.Averager(iteravg.NTASchedule(epochs=10, n=1), comm="local")
    params = {k: np.zeros(shape, dtype=dt) for k, (shape, dt) in W.SHAPES.items()}
    params["bn.mean"] = params["bn.mean"].astype(np.float64)
    for epoch in range(epochs):
        for step in range(W.STEPS):
            for k, v in W.iterate(0, epoch, step, False).items():
                params[k][...] = v
            params["bn.mean"][...] = np.mean([W.iterate(r, epoch, step, False)["bn.mean"].astype(np.float64)
                                              for r in range(size)], axis=0)
            avg.step(params)
        avg.epoch_end(params, metric=W.metric(epoch), epoch=epoch + 1)
    return {k: v.copy() for k, v in avg.averaged().items()}


def check_exact(res: list, size: int) -> None:
    assert len({json.dumps(r["digests"], sort_keys=True) for r in res}) == 1, "ranks differ"
    assert all(r["swap_equals_average"] and r["restored"] for r in res)
    assert len({json.dumps(r["final"], sort_keys=True) for r in res}) == 1
    ref = single_process(size)
    for k, v in ref.items():
        got = np.array(res[0]["averaged"][k])
        if k == "bn.mean":  # a per-rank statistic: the mean over ranks, to rounding
            np.testing.assert_allclose(got, v, rtol=1e-5, atol=1e-6)
        else:  # a data-parallel parameter: the single-process bits
            assert got.astype(v.dtype).tobytes() == v.tobytes(), k


@pytest.mark.timeout(600)
def test_mpirun_sharded_and_unsharded_equal_the_single_process_average(tmp_path):
    for sharded in (1, 0):
        out = tmp_path / f"s{sharded}"
        out.mkdir()
        launch("mpi", 3, [out, "--sharded", sharded])
        res = ranks(out, 3)
        assert all(r["sharded_state"] == bool(sharded) for r in res)
        check_exact(res, 3)
    assert ranks(tmp_path / "s1", 3)[0]["digests"] == ranks(tmp_path / "s0", 3)[0]["digests"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind,n", [("horovod", 2), ("horovod-gloo", 2), ("torch", 3)])
def test_sharded_under_horovodrun_and_torchrun(tmp_path, kind, n):
    if kind == "torch":
        pytest.importorskip("torch")
    launch(kind, n, [tmp_path, "--sharded", 1])
    res = ranks(tmp_path, n)
    assert all(r["sharded_state"] for r in res) and {r["size"] for r in res} == {n}
    check_exact(res, n)


@pytest.mark.timeout(900)
def test_resume_across_world_sizes_4_2_3_1(tmp_path):
    """A sharded snapshot holds whole tensors: 4 ranks -> 2 -> 3 (sharded) -> 1 process (unsharded), each stage
    loading exactly the bits the previous one saved and averaging on."""
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "w4"
    out.mkdir()
    launch("mpi", 4, [out, "--sharded", 1, "--ckpt", ckpt, "--epochs", 5])
    saved = ranks(out, 4)[0]
    for n, sharded in ((2, 1), (3, 1), (1, 0)):
        out = tmp_path / f"w{n}"
        out.mkdir()
        if n == 1:
            run([sys.executable, WORKER, str(out), "--sharded", "0", "--ckpt", str(ckpt), "--resume", "--epochs", "2"],
                timeout=120)
        else:
            launch("mpi", n, [out, "--sharded", sharded, "--ckpt", ckpt, "--resume", "--epochs", 2])
        res = ranks(out, n)
        assert {r["loaded_world"] for r in res} == {saved["size"]}
        assert all(r["loaded"] == saved["digests"] for r in res), f"world {n} did not load the saved bits"
        assert len({json.dumps(r["digests"], sort_keys=True) for r in res}) == 1
        assert res[0]["counter"] > saved["counter"]
        saved = res[0]


@pytest.mark.timeout(300)
def test_local_sgd_with_sharded_is_refused_on_every_rank(tmp_path):
    launch("mpi", 3, [tmp_path, "--sharded", 1, "--local-sgd"])
    res = ranks(tmp_path, 3)
    assert len({r.get("error") for r in res}) == 1 and "sharded=True needs data-parallel replicas" in res[0]["error"]


@pytest.mark.timeout(300)
def test_local_sgd_unsharded_still_averages_across_ranks(tmp_path):
    launch("mpi", 3, [tmp_path, "--sharded", 0, "--local-sgd"])
    res = ranks(tmp_path, 3)
    assert "error" not in res[0] and len({json.dumps(r["digests"], sort_keys=True) for r in res}) == 1
