"""Which Horovod binding moves the arrays (``iteravg.comm.horovod.choose_binding``), in real ``horovodrun`` jobs:
a job that never imported MXNet uses ``horovod.torch`` when Horovod was built with PyTorch (scripts/install.sh
builds it so) and never loads MXNet; a PyTorch model's averages, reduced through that binding (numpy views, or
torch tensors passed as ``native``), are bitwise identical on every rank.

torch is only ever imported in subprocesses, never into the pytest process (see tests/test_torch_example.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import REPO, horovodrun, job_env, run, torch_binding_built  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"),
              pytest.mark.skipif(importlib.util.find_spec("horovod") is None, reason="Horovod is not installed")]
WORKER = "tests/multirank/worker_hvd_torch.py"


def choose_in_subprocess(before: str = "", env: dict = None) -> dict:
    """``choose_binding()`` in a fresh interpreter after running ``before``; what it returned (or raised) and
    which framework modules were loaded afterwards."""
    code = (f"{before}\nimport json, sys\nfrom iteravg.comm.horovod import choose_binding\n"
            "try:\n    got = choose_binding()\nexcept ValueError as exc:\n    got = 'ValueError: ' + str(exc)\n"
            "print(json.dumps({'binding': got, 'loaded': sorted(m for m in ('mxnet', 'torch', 'horovod.mxnet', "
            "'horovod.torch') if m in sys.modules)}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=job_env(env), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_choice_rules():
    torch_built = torch_binding_built()
    plain = choose_in_subprocess()
    if torch_built:
        assert plain == {"binding": "torch", "loaded": ["horovod.torch", "torch"]}, plain
    else:
        assert plain == {"binding": "mxnet", "loaded": []}, plain  # deciding loads nothing
    # An MXNet job keeps horovod.mxnet (its buffers are NDArrays), without even trying horovod.torch.
    assert choose_in_subprocess("import mxnet") == {"binding": "mxnet", "loaded": ["mxnet"]}
    # The binding the user's own script imported wins: one Horovod runtime per process.
    if torch_built:
        assert choose_in_subprocess("import mxnet, horovod.torch")["binding"] == "torch"
    assert choose_in_subprocess("import horovod.mxnet")["binding"] == "mxnet"
    # ITERAVG_HOROVOD_BINDING forces it, and imports nothing to decide.
    assert choose_in_subprocess(env={"ITERAVG_HOROVOD_BINDING": "mxnet"}) == {"binding": "mxnet", "loaded": []}
    assert choose_in_subprocess("import mxnet", env={"ITERAVG_HOROVOD_BINDING": "Torch"})["binding"] == "torch"
    bad = choose_in_subprocess(env={"ITERAVG_HOROVOD_BINDING": "tf"})["binding"]
    assert bad.startswith("ValueError: ITERAVG_HOROVOD_BINDING must be torch or mxnet, got 'tf'"), bad


def torch_ranks(out: Path, size: int) -> list:
    found = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(size)]
    assert [r["rank"] for r in found] == list(range(size)) and {r["size"] for r in found} == {size}
    assert {r["comm"] for r in found} == {"horovod"}
    assert all(r["loaded"] and r["counter"] > 0 for r in found), found
    assert len({r["last_digest"] for r in found}) == size, "independent replicas should end on different iterates"
    assert len({r["averaged_digest"] for r in found}) == 1, "the ranks' averaged models differ"
    assert all(r["model_digest"] == r["averaged_digest"] for r in found), "finalize did not load the average"
    return found


@pytest.mark.multirank
@pytest.mark.timeout(300)
@pytest.mark.parametrize("gloo,native", [(False, False), (True, True)], ids=["mpi-numpy-views", "gloo-native-tensors"])
def test_torch_model_under_horovodrun(tmp_path, gloo, native):
    """A PyTorch model (float64 and float16 layers) averaged through numpy views of its parameters, independent
    replicas: the averages agree bit for bit on both ranks, through horovod.torch when it is built -- MXNet never
    loaded -- else through horovod.mxnet."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed (optional: requirements/torch.txt)")
    run(horovodrun(2, [WORKER, str(tmp_path)] + (["--native"] if native else []), gloo=gloo), timeout=240)
    found = torch_ranks(tmp_path, 2)
    if native:
        assert all(r["native_backed"] for r in found), "the averages do not live in the allocator's tensors"
    if torch_binding_built():
        assert {r["binding"] for r in found} == {"torch"}
        assert all(r["frameworks"] == ["horovod.torch", "torch"] for r in found), [r["frameworks"] for r in found]
    else:
        assert {r["binding"] for r in found} == {"mxnet"}
