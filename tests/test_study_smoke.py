"""``make study``'s pipeline end to end on a tiny grid (``--profile smoke``): real series from pmdarima, GluonTS's
SimpleFeedForward from ``gluonts.mx`` trained by ``iteravg.gluonts.Trainer`` with every averaging method on one
process and two of them on 2 ranks under ``mpirun``, and from ``gluonts.torch`` trained by Lightning with
``iteravg.lightning.IterationAveraging`` with every method on one process and EMA on 2 ranks (Lightning's DDP under
``torchrun``, ``RankSeeding``), GluonTS's ``Evaluator``, then the page, the CSV and the plots.

Checks the structure of the generated tables, that their numbers are finite and are the statistics of the per-run
results they were built from, that every method of a seed trained the same iterates and both ranks ended with the
same network, that a rerun reuses every cached run, and that a changed setting invalidates a run.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import job_env  # noqa: E402

pytest.importorskip("gluonts.mx")
pytest.importorskip("gluonts.torch")
pytest.importorskip("lightning")
pytest.importorskip("pmdarima")
pytestmark = [pytest.mark.multirank, pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?"
MX = "### taylor / SimpleFeedForward (gluonts.mx)"
TORCH = "### taylor / SimpleFeedForward (gluonts.torch)"
ONE_PROCESS = [(m, "1 process") for m in ("no averaging (best epoch)", "no averaging (last iterate)", "NTA",
                                          "Alpha_Suffix", "EMA")]


def study(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "studies/averaging_study.py", "--profile", "smoke", "--out", str(out / "runs"),
           "--report", str(out / "results.md"), "--assets", str(out / "img"), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def table_rows(page: str, heading: str) -> list:
    section = page.split(heading, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| ---") and not line.startswith("| method")]


def parse(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    study(out)
    return out


def test_table_structure_and_finite_numbers(smoke):
    page = (smoke / "results.md").read_text()
    two = [(m, "2 ranks") for m in ("no averaging (best epoch)", "no averaging (last iterate)", "NTA")]
    mx, torch = table_rows(page, MX), table_rows(page, TORCH)
    assert [(r[0], r[1]) for r in mx] == ONE_PROCESS + two
    assert [(r[0], r[1]) for r in torch] == ONE_PROCESS  # its one 2-rank run has no 2-rank baseline to compare with
    for r in mx + torch:
        assert len(r) == 9
        for cell in r[2:5]:  # MASE, RMSE, mean wQL: "mean ± std", both finite (2 seeds)
            m = re.fullmatch(rf"({NUMBER}) ± ({NUMBER})", cell)
            assert m, cell
            assert all(math.isfinite(parse(g)) for g in m.groups())
        if r[0].startswith("no averaging (best"):
            assert r[5] == "1 (baseline)"
        else:
            assert math.isfinite(parse(r[5].split()[0])) and math.isfinite(parse(r[8].split()[0]))
    summary = table_rows(page, "## Summary against PR #901")
    assert any(r[0].startswith("PR #901") and r[3].startswith("0.57") for r in summary)
    assert {(r[1], r[2]) for r in summary if r[0] == "EMA"} == {("gluonts.mx", "1 process"),
                                                                 ("gluonts.torch", "1 process")}
    # every method of a seed trained the same iterates: mx 2 seeds x 2 rank counts, torch 2 seeds + 1 on 2 ranks
    assert "7 of 7 (data, estimator, ranks, seed) groups trained bitwise-identical" in page
    assert "in 5 of 5 multi-rank runs that recorded it (of 5)" in page
    assert "gluonts.mx: 4 runs with" in page and "gluonts.torch: 1 run with" in page
    for png in ("metrics.png", "variance-ratios.png"):
        assert (smoke / "img" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_holds_the_statistics_of_the_runs(smoke):
    """The page's mean ± std are recomputed here from the per-run CSV (and the CSV from the runs' JSON)."""
    with open(smoke / "img" / "cells.csv") as f:
        runs = list(csv.DictReader(f))
    # mx: 12 runs plus the last iterate of its 4 "none" runs; torch: 9 runs plus the last iterate of 2
    assert len(runs) == 12 + 4 + 9 + 2
    records = [json.loads(p.read_text()) for p in (smoke / "runs" / "cells").glob("*.json")]
    assert len(records) == 12 + 9
    by_key = {(r["cell"]["family"], r["cell"]["method"], r["cell"]["ranks"], r["cell"]["seed"]): r for r in records}
    for row in runs:
        rec = by_key[(row["family"], row["method"] if row["method"] != "last" else "none", int(row["ranks"]),
                      int(row["seed"]))]
        src = rec["last_iterate"] if row["method"] == "last" else rec
        assert float(row["RMSE"]) == pytest.approx(src["metrics"]["RMSE"], rel=1e-5)
        assert all(math.isfinite(float(row[m])) for m in ("MASE", "RMSE", "mean_wQuantileLoss"))
    page = (smoke / "results.md").read_text()
    for family, heading in (("mx", MX), ("torch", TORCH)):
        rows = {(r[0], r[1]): r for r in table_rows(page, heading)}
        for method, label in (("ema", "EMA"), ("nta", "NTA")):
            values = np.array([float(r["RMSE"]) for r in runs
                               if r["family"] == family and r["method"] == method and r["ranks"] == "1"])
            assert len(values) == 2
            mean, std = (parse(x) for x in rows[(label, "1 process")][3].split(" ± "))
            assert mean == pytest.approx(values.mean(), rel=2e-3, abs=1)
            assert std == pytest.approx(values.std(ddof=1), rel=2e-2, abs=1)


def test_torch_runs_average_with_lightning_on_one_process_and_under_ddp(smoke):
    """The gluonts.torch runs: Lightning trained them (versions recorded), IterationAveraging averaged (EMA folds every
    optimizer step: 3 epochs x 4 batches), the evaluated model is the average, not the last iterate, and the 2-rank
    run ended with the same network on both ranks."""
    records = {p.stem: json.loads(p.read_text()) for p in (smoke / "runs" / "cells").glob("taylor-torch.*.json")}
    assert sorted(records) == sorted(
        [f"taylor-torch.sff-{m}-np1-s{s}" for m in ("none", "nta", "alpha_suffix", "ema") for s in (0, 1)]
        + ["taylor-torch.sff-ema-np2-s0"])
    for key, rec in records.items():
        info = rec["info"]
        assert {"torch", "lightning", "gluonts"} <= set(rec["versions"]) and "mxnet" not in rec["versions"]
        assert len(info["epoch_losses"]) == 3 and all(math.isfinite(x) for x in info["epoch_losses"])
        if rec["cell"]["method"] == "none":
            assert info["average_counter"] is None and "last_iterate" in rec
            continue
        assert info["averaging_started"] is True and info["average_counter"] >= 1
        assert isinstance(info["gluonts_checkpoint_averaged"], bool)
    for key in ("taylor-torch.sff-ema-np1-s0", "taylor-torch.sff-ema-np2-s0"):
        info = records[key]["info"]
        assert info["average_counter"] == 12
        assert info["final_sha256"] != info["last_iterate_sha256"]  # the average of 12 iterates, not the last one
    assert records["taylor-torch.sff-ema-np2-s0"]["info"]["ranks_identical"] is True
    # 1 process and 2 ranks (half the batch each, each rank its own windows) trained different iterates
    assert (records["taylor-torch.sff-ema-np2-s0"]["info"]["last_iterate_sha256"]
            != records["taylor-torch.sff-ema-np1-s0"]["info"]["last_iterate_sha256"])


def test_rerun_reuses_cached_runs_and_a_changed_setting_invalidates_one(smoke):
    cells = sorted((smoke / "runs" / "cells").glob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in cells}
    proc = study(smoke)
    assert "21 of 21 cells cached" in proc.stdout and "0 to run" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in cells} == before

    from studies.averaging import grid, runner
    from studies.averaging.grid import Cell

    profile = grid.PROFILES["smoke"]
    assert runner.missing(profile, profile.cells(), smoke / "runs") == []
    record = json.loads(cells[0].read_text())
    record["settings_id"] = "0" * 16  # as if computed with other settings
    cells[0].write_text(json.dumps(record))
    assert [c.key for c in runner.missing(profile, profile.cells(), smoke / "runs")] == [record["key"]]
    dry = study(smoke, "--dry-run")  # says so, and trains nothing
    assert "20 of 21 cells cached" in dry.stdout and "1 to run" in dry.stdout and record["key"] in dry.stdout
    assert runner.cached(profile, Cell(**record["cell"]), smoke / "runs") is None
