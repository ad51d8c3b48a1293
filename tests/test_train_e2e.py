"""End to end: ``iteravg train`` single-process and under horovodrun; checkpoint, report and plot agree;
``iteravg inspect`` verifies; resume is exact; bad arguments are usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import horovodrun, job_env, run  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
FAST = ["--epochs", "8", "--nta-n", "1", "--batch-size", "16", "--no-progress"]


def cli(*args: str) -> list:
    return [sys.executable, "-m", "iteravg", *args]


def single(out: Path, *extra: str, check: bool = True, env=None):
    return run(cli("train", "--out", str(out), *FAST, *extra), timeout=180, check=check, env=env)


def distributed(np_: int, out: Path, *extra: str, check: bool = True, env=None, gloo: bool = False):
    return run(horovodrun(np_, ["-m", "iteravg", "train", "--out", str(out), *FAST, *extra], gloo=gloo),
               timeout=240, check=check, env=env)


def check_run(out: Path, world_size: int) -> dict:
    import mxnet as mx
    from mxnet.gluon import nn  # noqa: F401

    from iteravg.mx.cli import _make_net

    rep = json.loads((out / "report.json").read_text())
    assert rep["world_size"] == world_size and rep["epochs_done"] == 8
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads((out / "checkpoints" / "averaging-state.json").read_text())
    assert state["averager"]["fingerprint"] == rep["fingerprint"] and state["world_size"] == world_size
    assert rep["trigger_epoch"] == state["averager"]["schedule"]["trigger_epoch"] is not None
    assert {"last iterate", "averaged"} <= set(rep["metrics"])
    # The checkpoint loads into the model and evaluates to the reported averaged test MSE.
    from iteravg.mx.data import load

    ds = load()
    net = _make_net(ds.num_features, 64, seed=123)
    net.load_parameters(str(out / "checkpoints" / "averaged.params"))
    pred = net(mx.nd.array(ds.test[0])).asnumpy()
    mse = float(np.mean((pred - ds.test[1]) ** 2))
    assert mse == pytest.approx(rep["metrics"]["averaged"]["test_mse"], rel=1e-4)
    proc = run(cli("inspect", str(out / "checkpoints")), timeout=60)
    assert "verified" in proc.stdout and "True" in proc.stdout
    return rep


def test_single_process_run_and_inspect(tmp_path):
    single(tmp_path)
    check_run(tmp_path, 1)
    params = tmp_path / "checkpoints" / "latest" / "averaged.params"
    data = bytearray(params.read_bytes())
    data[len(data) // 2] ^= 0x01
    params.write_bytes(bytes(data))
    proc = run(cli("inspect", str(tmp_path / "checkpoints")), timeout=60, check=False)
    assert proc.returncode == 1 and "corrupted" in proc.stderr


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_horovodrun_two_ranks(tmp_path):
    distributed(2, tmp_path)
    check_run(tmp_path, 2)


def _final(out: Path) -> tuple:
    rep = json.loads((out / "report.json").read_text())
    params = (out / "checkpoints" / "latest" / "averaged.params").read_bytes()
    # A resumed run marks its resume point in the history (for the plot); everything else must be identical.
    history = [{k: v for k, v in row.items() if k != "resumed"} for row in rep["history"]]
    return rep["metrics"], rep["trigger_epoch"], rep["fingerprint"], history, params


def test_resume_is_exact_single_process(tmp_path):
    single(tmp_path / "full")
    proc = single(tmp_path / "part", check=False, env={"ITERAVG_STOP_AFTER_EPOCH": "5"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert not (tmp_path / "part" / "report.json").exists()
    single(tmp_path / "part", "--resume")
    assert json.loads((tmp_path / "part" / "report.json").read_text())["resumed_from_epoch"] == 5
    assert _final(tmp_path / "part") == _final(tmp_path / "full")


@pytest.mark.multirank
@pytest.mark.timeout(600)
def test_resume_is_exact_under_horovodrun_and_works_on_another_world_size(tmp_path):
    distributed(2, tmp_path / "full")
    proc = distributed(2, tmp_path / "part", check=False, env={"ITERAVG_STOP_AFTER_EPOCH": "5"})
    assert proc.returncode != 0
    import shutil

    shutil.copytree(tmp_path / "part", tmp_path / "three", symlinks=True)
    distributed(2, tmp_path / "part", "--resume")
    assert _final(tmp_path / "part") == _final(tmp_path / "full")
    # Resume on 3 ranks (Gloo controller): a valid continuation (different shards), same trigger epoch.
    distributed(3, tmp_path / "three", "--resume", gloo=True)
    rep = json.loads((tmp_path / "three" / "report.json").read_text())
    assert rep["world_size"] == 3 and rep["resumed_from_epoch"] == 5 and rep["epochs_done"] == 8
    assert rep["trigger_epoch"] == _final(tmp_path / "full")[1]
    assert run(cli("inspect", str(tmp_path / "three" / "checkpoints")), timeout=60).returncode == 0


@pytest.mark.parametrize("args,needle", [
    (["--epochs", "-3"], "--epochs"),
    (["--alpha", "1.5"], "--alpha"),
    (["--eta", "-1"], "--eta"),
    (["--lr", "0"], "--lr"),
    (["--strategy", "swa"], "--strategy"),
    (["--resume", "--checkpoint-dir", "/nonexistent/iteravg"], "does not exist"),
    (["--data", "/nonexistent.csv"], "--data"),
    (["--batch-size", "100000"], "--batch-size"),
])
def test_bad_arguments_are_usage_errors(tmp_path, args, needle):
    proc = subprocess.run(cli("train", "--out", str(tmp_path / "o"), *args), capture_output=True, text=True,
                          timeout=120, env=job_env())
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]  # one line (MXNet may log its own)
    assert len(errors) == 1 and errors[0].startswith("iteravg train: error: ") and needle in errors[0], proc.stderr


def test_poly_averages_every_iterate_from_the_first_batch(tmp_path):
    single(tmp_path, "--strategy", "poly", "--epochs", "3")
    rep = json.loads((tmp_path / "report.json").read_text())
    batches = 265 // 16
    assert rep["trigger_epoch"] == 0 and rep["average_counter"] == 3 * (batches + 1)  # + GluonTS's epoch-end recount


def test_user_csv(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.standard_normal(200)
    path = tmp_path / "data.csv"
    path.write_text("a,b,c,target\n" + "\n".join(",".join(f"{v:.6f}" for v in (*row, t)) for row, t in zip(x, y)))
    single(tmp_path / "run", "--data", str(path))
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["data"] == "data.csv" and rep["metrics"]["averaged"]["test_mse"] < 0.5


# -- stopping, as in GluonTS, and agreed across ranks --------------------------------------------------
from iteravg.mx.callback import _callback_base  # noqa: E402 -- GluonTS's Callback (or iteravg's hook base)


class Stopper(_callback_base()):
    """Records hook calls; returns False from ``hook`` at ``epoch`` (0-based; batch ``batch`` for batch hooks)
    on ``rank`` only (None: every rank)."""

    def __init__(self, hook: str, epoch: int, batch: int = 0, rank=None, comm_rank: int = 0):
        self.hook, self.epoch, self.batch, self.rank, self.comm_rank = hook, epoch, batch, rank, comm_rank
        self.calls, self._epoch, self._batch = [], -1, 0

    def _says(self, name: str) -> bool:
        stop = name == self.hook and self._epoch == self.epoch and (self.rank is None or self.rank == self.comm_rank)
        if name == "on_train_batch_end":
            stop = stop and self._batch == self.batch
        return not stop

    def on_train_epoch_start(self, training_network):
        self._epoch, self._batch = self._epoch + 1, 0
        self.calls.append(("on_train_epoch_start", self._epoch))

    def on_train_batch_end(self, training_network):
        self._batch += 1
        self.calls.append(("on_train_batch_end", self._epoch))
        return self._says("on_train_batch_end")

    def on_train_epoch_end(self, **kw):
        self.calls.append(("on_train_epoch_end", self._epoch))
        return self._says("on_train_epoch_end")

    def on_validation_epoch_end(self, **kw):
        self.calls.append(("on_validation_epoch_end", self._epoch))
        return self._says("on_validation_epoch_end")

    def on_epoch_end(self, **kw):
        self.calls.append(("on_epoch_end", self._epoch))
        return self._says("on_epoch_end")


def test_a_false_batch_hook_stops_at_once_on_one_process():
    import iteravg.mx as im
    from iteravg.mx.cli import _make_net
    from iteravg.comm import get_comm
    from iteravg.mx.data import load
    from iteravg.mx.train import fit

    ds = load()
    stopper = Stopper("on_train_batch_end", epoch=1, batch=3)
    res = fit(_make_net(ds.num_features, 8, 0), __import__("mxnet").gluon.loss.L2Loss(), ds.train, ds.val,
              comm=get_comm("local"), callbacks=[im.ModelIterationAveraging(im.Alpha_Suffix(epochs=5, alpha=1.0)),
                                                 stopper], epochs=5, batch_size=32, learning_rate=0.05)
    assert res.stopped_by_callback and res.epochs_done == 2
    assert stopper.calls.count(("on_train_batch_end", 1)) == 3  # no batch after the one that said stop
    assert ("on_epoch_end", 1) in stopper.calls  # GluonTS finishes the epoch's hooks, then stops


def test_a_false_epoch_hook_skips_on_epoch_end_and_train_end_snapshot_keeps_the_last_iterate(tmp_path):
    import mxnet as mx

    import iteravg.mx as im
    from iteravg.mx.cli import _make_net
    from iteravg.comm import get_comm
    from iteravg.mx.data import load
    from iteravg.mx.train import finish_training, fit

    ds = load()
    net = _make_net(ds.num_features, 8, 0)
    strategy = im.Alpha_Suffix(epochs=5, alpha=1.0)
    callbacks = [im.ModelIterationAveraging(strategy), Stopper("on_validation_epoch_end", epoch=2)]
    res = fit(net, mx.gluon.loss.L2Loss(), ds.train, ds.val, comm=get_comm("local"), callbacks=callbacks,
              epochs=5, batch_size=32, learning_rate=0.05, checkpoint_dir=tmp_path / "ck")
    assert res.stopped_by_callback and res.epochs_done == 3
    assert ("on_epoch_end", 2) not in callbacks[1].calls and ("on_epoch_end", 1) in callbacks[1].calls
    last = {k: v.data().asnumpy().copy() for k, v in net._collect_params_with_prefix().items()}
    finish_training(net, callbacks, result=res)  # net holds the average; the loop's epoch-3 snapshot stays latest
    state = json.loads((tmp_path / "ck" / "averaging-state.json").read_text())
    assert state["snapshot"] == "epoch-000003" and state["extra"]["training"]["epochs_done"] == 3
    saved = mx.nd.load(str(tmp_path / "ck" / "latest" / "training.params"))
    for k, v in last.items():
        np.testing.assert_array_equal(saved[k].asnumpy(), v)  # the last iterate, not the averaged weights
    averaged = mx.nd.load(str(tmp_path / "ck" / "averaged.params"))
    for k, v in net._collect_params_with_prefix().items():
        np.testing.assert_array_equal(averaged[k].asnumpy(), v.data().asnumpy())


WORKER = '''
import sys
sys.path.insert(0, {tests!r})
import mxnet as mx
import iteravg.mx as im
from iteravg import collectives
from iteravg.mx.cli import _make_net
from iteravg.mx.data import load
from iteravg.mx.train import finish_training, fit
from test_train_e2e import Stopper

strategy = im.Alpha_Suffix(epochs=6, alpha=1.0, comm="horovod")
comm = strategy.comm
ds = load()
net = _make_net(ds.num_features, 8, 0)
stopper = Stopper({hook!r}, epoch=1, batch=2, rank=1, comm_rank=comm.rank)
res = fit(net, mx.gluon.loss.L2Loss(), ds.train, ds.val, comm=comm, callbacks=[im.ModelIterationAveraging(strategy),
          stopper], epochs=6, batch_size=16, learning_rate=0.05)
finish_training(net, [im.ModelIterationAveraging(strategy)])
collectives.finish(comm)
with open({out!r} + f"/result-{{comm.rank}}.txt", "w") as f:
    f.write(f"{{res.epochs_done}} {{stopper.calls.count(('on_epoch_end', 1))}}")
'''


@pytest.mark.multirank
@pytest.mark.timeout(300)
@pytest.mark.parametrize("hook", ["on_train_batch_end", "on_validation_epoch_end"])
def test_a_stop_on_one_rank_stops_every_rank_at_the_same_epoch(tmp_path, hook):
    """A hook saying stop on rank 1 only must not leave rank 0 alone in on_epoch_end's collectives."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), hook=hook, out=str(tmp_path)))
    run(horovodrun(2, [str(script)]), timeout=240)
    results = [(tmp_path / f"result-{r}.txt").read_text() for r in range(2)]
    expected_epoch_end = 1 if hook == "on_train_batch_end" else 0  # batch stop: the epoch's hooks still run
    assert results == [f"2 {expected_epoch_end}"] * 2  # epochs done, on_epoch_end calls in the stop epoch


def test_cli_spellings_and_data_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,target\n1,2,3\n4,five,6\n")
    proc = subprocess.run(cli("train", "--out", str(tmp_path / "o"), "--data", str(bad)), capture_output=True,
                          text=True, timeout=120, env=job_env())
    assert proc.returncode == 2 and "line 3, column 2 ('b'): 'five' is not a number" in proc.stderr
    proc = subprocess.run(cli("train", "--n", "zero"), capture_output=True, text=True, timeout=120, env=job_env())
    assert proc.returncode == 2 and "--nta-n/--n" in proc.stderr
    proc = subprocess.run(cli("train", "--out", str(tmp_path / "o")), capture_output=True, text=True, timeout=120,
                          env=job_env({"ITERAVG_STOP_AFTER_EPOCH": "soon"}))
    assert proc.returncode == 2 and "ITERAVG_STOP_AFTER_EPOCH" in proc.stderr
