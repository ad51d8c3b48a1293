"""The framework-neutral engine in real multi-process jobs, on a numpy-only model (no MXNet in the worker under
mpirun + mpi4py, nor under horovodrun when Horovod has its PyTorch binding): every rank ends with
bitwise-identical averages that equal, up to rounding, the same schedule run on one process with the rank-mean
iterates; rank 0's snapshot reloads bit for bit on every rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import horovodrun, mpirun, run, torch_binding_built  # noqa: E402
import worker_numpy as W  # noqa: E402

import iteravg  # noqa: E402

pytestmark = [pytest.mark.multirank, pytest.mark.filterwarnings("ignore")]
WORKER = "tests/multirank/worker_numpy.py"


def reference(kind: str, size: int) -> dict:
    """One process, float64, the rank-mean iterates and metric: what the synced average approximates."""
    avg = iteravg.Averager(W.schedule(kind), comm="local")
    params = {k: np.zeros(shape, dtype=np.float64) for k, (shape, _) in W.SHAPES.items()}
    for epoch in range(W.EPOCHS):
        for step in range(W.STEPS):
            its = [W.iterate(r, epoch, step, W.SHAPES) for r in range(size)]
            for k in params:
                params[k][...] = np.mean([it[k].astype(np.float64) for it in its], axis=0)
            avg.step(params)
        avg.epoch_end(params, metric=float(np.mean([W.metric(r, epoch) for r in range(size)])), epoch=epoch + 1)
    return {k: v.copy() for k, v in avg.averaged().items()}


def check(out: Path, size: int, kind: str, comm: str, no_framework: bool, frameworks: tuple = ()) -> None:
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(size)]
    assert [r["rank"] for r in ranks] == list(range(size)) and {r["comm"] for r in ranks} == {comm}
    assert len({r["digest"] for r in ranks}) == 1, "averaged models differ across ranks"
    assert all(r["reloaded"] == r["digest"] for r in ranks), "the snapshot did not reload bit for bit"
    assert len({(r["counter"], r["trigger_epoch"]) for r in ranks}) == 1
    assert all(r["swapped_equals_average"] and r["training_restored"] for r in ranks)
    assert ranks[0]["saved"] and all(r["saved"] is None for r in ranks[1:]), "only rank 0 writes"
    if no_framework:
        assert all(r["frameworks"] == list(frameworks) for r in ranks), [r["frameworks"] for r in ranks]
    ref = reference(kind, size)
    for k, v in ranks[0]["averaged"].items():
        tol = 2e-2 if W.SHAPES[k][1] == "float16" else 1e-5
        np.testing.assert_allclose(np.array(v), ref[k], rtol=tol, atol=tol, err_msg=k)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["nta", "ema", "every2"])
def test_mpirun_mpi4py_numpy_only(tmp_path, kind):
    run(mpirun(3, [WORKER, str(tmp_path), kind]), env={"ITERAVG_COMM": "mpi"}, timeout=240)
    check(tmp_path, 3, kind, "mpi", no_framework=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("gloo", [False, True], ids=["mpi", "gloo"])
def test_horovodrun_numpy_model(tmp_path, gloo):
    """Under horovodrun the default communicator is Horovod. With Horovod built with PyTorch, its torch binding
    moves the numpy buffers (zero-copy ``torch.from_numpy``) and the job never loads MXNet; else horovod.mxnet."""
    run(horovodrun(2, [WORKER, str(tmp_path), "nta"], gloo=gloo), timeout=240)
    check(tmp_path, 2, "nta", "horovod", no_framework=False)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    if torch_binding_built():
        assert {r["binding"] for r in ranks} == {"torch"}
        assert all("mxnet" not in r["frameworks"] for r in ranks), [r["frameworks"] for r in ranks]
    else:
        assert {r["binding"] for r in ranks} == {"mxnet"}


@pytest.mark.timeout(300)
def test_horovodrun_numpy_model_mxnet_binding(tmp_path):
    """ITERAVG_HOROVOD_BINDING=mxnet: horovod.mxnet moves the numpy buffers (copied into NDArrays and back)."""
    run(horovodrun(2, [WORKER, str(tmp_path), "every2"]), env={"ITERAVG_HOROVOD_BINDING": "mxnet"}, timeout=240)
    check(tmp_path, 2, "every2", "horovod", no_framework=False)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert {r["binding"] for r in ranks} == {"mxnet"} and all("mxnet" in r["frameworks"] for r in ranks)


@pytest.mark.timeout(300)
def test_horovodrun_numpy_only_with_mpi4py(tmp_path):
    """horovodrun's MPI controller starts MPI processes: ITERAVG_COMM=mpi runs the worker with no framework."""
    run(horovodrun(2, [WORKER, str(tmp_path), "ema"]), env={"ITERAVG_COMM": "mpi"}, timeout=240)
    check(tmp_path, 2, "ema", "mpi", no_framework=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["nta", "every2"])
def test_torchrun_numpy_model(tmp_path, kind):
    """The README's "any framework" path under torchrun: torch.distributed is chosen by itself (no ITERAVG_COMM),
    it moves the numpy buffers (zero-copy ``torch.from_numpy`` over Gloo), and MXNet is never loaded."""
    pytest.importorskip("torch")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    run([torchrun, "--standalone", "--nproc_per_node=3", WORKER, str(tmp_path), kind], timeout=240)
    check(tmp_path, 3, kind, "torch", no_framework=True, frameworks=("torch",))
