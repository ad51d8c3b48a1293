"""GluonTS's PyTorch estimators with ``iteravg.lightning.IterationAveraging`` in ``trainer_kwargs``, unchanged
otherwise, on one process and under Lightning's DDP with 2 CPU processes (real processes, Lightning's launcher).

Asserted: DeepAR trained with DDP and NTA forecasts within 1.3x of the single-process forecast error (mean weighted
quantile loss on real monthly series); the predictor -- serialised, deserialised -- is an averaged model (GluonTS
reloads its best epoch-end checkpoint, which holds the average from the trigger on) and the same on both ranks; with
``RankSeeding`` the ranks draw different windows (rank 0 the single process's), without it the same ones; the same for
SimpleFeedForward with EMA averaging."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("lightning")
pytest.importorskip("gluonts.torch")

from multirank.launch import run  # noqa: E402

pytestmark = pytest.mark.multirank
WORKER = "tests/multirank/worker_gluonts_torch.py"


def job(out: Path, devices: int, *args: str) -> list:
    run([sys.executable, WORKER, str(out), "--devices", str(devices), *args], timeout=600,
        env={"ITERAVG_COLLECTIVE_TIMEOUT": "120"})
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(devices)]


def test_deepar_ddp_nta_forecasts_like_one_process_and_ranks_draw_their_own_windows(tmp_path):
    (single,) = job(tmp_path / "one", 1)
    ranks = job(tmp_path / "two", 2, "--windows-check")
    r0, r1 = ranks
    assert (single["comm"], single["world"]) == ("local", 1)
    assert {(r["comm"], r["world"]) for r in ranks} == {("torch", 2)}
    for run_ in (single, r0, r1):
        assert run_["trigger_epoch"] is not None and run_["counter"] > 1
        assert run_["best_epoch_average"] is not None  # GluonTS reloaded a checkpoint written after the trigger ...
        assert run_["predictor_sha"] == run_["best_epoch_average"]  # ... which holds the averaged model
    assert single["deserialized_sha"] == single["predictor_sha"] and r0["deserialized_sha"] == r0["predictor_sha"]
    assert r0["averaged_sha"] == r1["averaged_sha"] and r0["predictor_sha"] == r1["predictor_sha"]
    # RankSeeding: rank 0 draws what one process draws, rank 1 its own windows.
    assert r0["windows"] == single["windows"] and r0["windows"] != r1["windows"]
    # The forecast error of the 2-process model is within 1.3x of the single process's.
    one, two = single["metrics"]["mean_wQuantileLoss"], r0["metrics"]["mean_wQuantileLoss"]
    assert two <= 1.3 * one, (single["metrics"], r0["metrics"])
    # SimpleFeedForward (EMA): without RankSeeding both ranks train on the same windows; with it, on their own.
    plain = [r["windows_check"]["plain"] for r in ranks]
    seeded = [r["windows_check"]["seeded"] for r in ranks]
    assert plain[0]["windows"] == plain[1]["windows"]
    assert seeded[0]["windows"] != seeded[1]["windows"] and seeded[0]["windows"] == plain[0]["windows"]
    for check in plain + seeded:
        assert check["best_epoch_average"] is not None and check["predictor_sha"] == check["best_epoch_average"]
    assert seeded[0]["predictor_sha"] == seeded[1]["predictor_sha"]


def test_example_trains_with_ddp_on_two_processes(tmp_path):
    """examples/gluonts_torch_train.py under Lightning's DDP (its launcher starts the second process): rank 0 writes
    the serialised predictor and the report, the other rank nothing."""
    out = tmp_path / "run"
    proc = run([sys.executable, "examples/gluonts_torch_train.py", "--out", str(out), "--devices", "2", "--epochs", "3",
                "--batches", "4"], timeout=600, env={"ITERAVG_COLLECTIVE_TIMEOUT": "120"})
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["trigger_epoch"] == 3 and report["averaged_iterates"] == 1
    assert report["mean_wQuantileLoss"] > 0 and (out / "predictor").is_dir()
    assert proc.stdout.count('"processes": 2') == 1  # printed once, by rank 0
