"""``iteravg.lightning.IterationAveraging`` in real Lightning jobs on 2 CPU processes (Gloo), started by Lightning's own
launcher (it re-runs the worker script for rank 1): DDP and FSDP2 (``ModelParallelStrategy`` + ``fully_shard``).

Each job trains fit A, writing a full checkpoint at every epoch end, then -- in the same processes -- fit B: a fresh
model and callback resumed from epoch 3's checkpoint. Asserted: the averaged weights and the final model bitwise
identical on both ranks, the final model is the average, one checkpoint per epoch (written once, by rank 0), the
checkpoint's contents, the trigger decided as GluonTS's NTA decides on the same metric log, and fit B continuing the
average bit for bit like the uninterrupted fit A."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

from multirank.launch import run  # noqa: E402

pytestmark = pytest.mark.multirank
WORKER = "tests/multirank/worker_lightning.py"
EPOCHS, RESUME = 5, 3


def launch(out: Path, *args: str) -> list:
    run([sys.executable, WORKER, str(out), "--epochs", str(EPOCHS), "--resume-epoch", str(RESUME), "--control", *args],
        timeout=420, env={"ITERAVG_COLLECTIVE_TIMEOUT": "90"})
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def digest(tensors: dict) -> str:
    """The worker's digest: SHA-256 of the floating tensors' names and bytes, sorted by name."""
    h = hashlib.sha256()
    for k in sorted(k for k, v in tensors.items() if v.is_floating_point()):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def gluonts_trigger_epoch(val_logs: list, epochs: int, n: int) -> int:
    """GluonTS's own NTA (gluonts.mx) fed the metric log iteravg's trigger saw; the epoch it starts averaging."""
    pytest.importorskip("mxnet")
    from gluonts.mx.trainer.model_iteration_averaging import NTA

    nta = NTA(epochs=epochs, n=n)
    for epoch, metric in enumerate(val_logs, start=1):
        nta.update_average_trigger(metric=metric, epoch=epoch)
        if nta.averaging_started:
            return epoch
    return -1


def check_job(res: list, out: Path) -> None:
    a0, a1 = res[0]["a"], res[1]["a"]
    assert {r["a"]["comm"] for r in res} == {"torch"} and {r["a"]["world"] for r in res} == {2}
    for fit in ("a", "b"):
        shas = {r[fit]["averaged_sha"] for r in res}
        assert len(shas) == 1 and None not in shas, f"fit {fit}: the ranks' averages differ"
        assert {r[fit]["final_model_sha"] for r in res} == shas, f"fit {fit}: the final model is not the average"
    assert a0["epochs"] == a1["epochs"]  # every epoch's training parameters and average, on both ranks
    # Swapping the average in and out (validation, between epochs) leaves training alone: the same fit without
    # averaging (fit C) trains the same parameters, epoch by epoch.
    for r in res:
        assert {e: v["trained"] for e, v in r["a"]["epochs"].items()} == \
            {e: v["trained"] for e, v in r["control"]["epochs"].items()}
    assert a0["counter"] == a1["counter"] > 1 and a0["val_logs"] == a1["val_logs"]  # one decision for all
    # The trigger: GluonTS's NTA on the same (rank-reduced) metric log starts at the same epoch, before the last.
    assert 1 < a0["trigger_epoch"] < EPOCHS
    assert gluonts_trigger_epoch(a0["val_logs"], EPOCHS, 1) == a0["trigger_epoch"]
    # Resume: fit B from epoch RESUME's checkpoint reproduces fit A's every later epoch, bit for bit.
    for r in res:
        b, a = r["b"], r["a"]
        assert b["averaged_sha"] == a["averaged_sha"] and b["counter"] == a["counter"]
        assert b["global_step"] == a["global_step"]
        assert {e: b["epochs"][e] for e in b["epochs"]} == {e: a["epochs"][e] for e in b["epochs"]}
        assert sorted(b["epochs"]) == [str(e) for e in range(RESUME, EPOCHS)]


@pytest.fixture(scope="module")
def ddp_jobs(tmp_path_factory) -> dict:
    """The DDP job with the average replicated on every rank (default) and sharded (1/N per rank)."""
    jobs = {}
    for sharded in (False, True):
        out = tmp_path_factory.mktemp("ddp-sharded" if sharded else "ddp")
        jobs[sharded] = (out, launch(out, "--strategy", "ddp", *(["--sharded"] if sharded else [])))
    return jobs


def test_ddp_identical_average_checkpoints_and_exact_resume(ddp_jobs):
    out, res = ddp_jobs[False]
    check_job(res, out)
    assert not any(r["a"]["sharded"] for r in res)
    a = res[0]["a"]
    ckpt = out / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [f"epoch={e}.ckpt" for e in range(EPOCHS)]
    assert sorted(p.name for p in (out / "ckpt-b").iterdir()) == [f"epoch={e}.ckpt" for e in range(RESUME, EPOCHS)]
    # Written at epoch RESUME's end, after the trigger: the model's state_dict is the average (the model held it
    # between epochs), the training weights are under current_model_state, the callback state holds the average too.
    saved = torch.load(ckpt / f"epoch={RESUME - 1}.ckpt", map_location="cpu", weights_only=False)
    assert a["trigger_epoch"] <= RESUME
    assert digest(saved["state_dict"]) == a["epochs"][str(RESUME - 1)]["averaged"]
    parameters = {k: v for k, v in saved["current_model_state"].items() if "running_" not in k}
    assert digest(parameters) == a["epochs"][str(RESUME - 1)]["trained"]
    state = saved["callbacks"]["IterationAveraging"]
    assert digest(state["averager"]["averaged"]) == a["epochs"][str(RESUME - 1)]["averaged"]
    assert state["averager"]["averager"]["schedule"]["trigger_epoch"] == a["trigger_epoch"]
    # DistributedSampler: the ranks trained on different batches.
    assert res[0]["a"]["first_batch"] != res[1]["a"]["first_batch"]


def test_ddp_sharded_average_is_the_replicated_one(ddp_jobs):
    """IterationAveraging(sharded=True) under DDP: each rank keeps half the average, every swap gathers it; the job
    passes the same checks and ends with the replicated job's average, bit for bit."""
    out, res = ddp_jobs[True]
    check_job(res, out)
    assert all(r["a"]["sharded"] for r in res)
    assert res[0]["a"]["averaged_sha"] == ddp_jobs[False][1][0]["a"]["averaged_sha"]
    assert res[0]["a"]["epochs"] == ddp_jobs[False][1][0]["a"]["epochs"]


def test_fsdp2_identical_average_sharded_checkpoints_and_exact_resume(tmp_path):
    """ModelParallelStrategy (FSDP2 on a 1-D mesh of 2 CPU processes): each rank folds its own shard; the gathered
    average is identical on both ranks; Lightning's distributed checkpoint is a folder per epoch with one shard file
    per rank and one metadata file (rank 0's) holding the callback's whole average; resume is exact."""
    out = tmp_path / "fsdp"
    res = launch(out, "--strategy", "fsdp")
    check_job(res, out)
    a = res[0]["a"]
    ckpt = out / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [f"epoch={e}.ckpt" for e in range(EPOCHS)]
    for folder in ckpt.iterdir():
        assert sorted(p.name for p in folder.iterdir() if p.suffix != ".metadata" and p.name != ".metadata") == \
            ["__0_0.distcp", "__1_0.distcp", "meta.pt"]
    meta = torch.load(ckpt / f"epoch={RESUME - 1}.ckpt" / "meta.pt", map_location="cpu", weights_only=False)
    state = meta["callbacks"]["IterationAveraging"]
    assert digest(state["averager"]["averaged"]) == a["epochs"][str(RESUME - 1)]["averaged"]
