"""``make study``'s pipeline end to end on a tiny grid (``--profile smoke``): real series from pmdarima, GluonTS's
SimpleFeedForward trained by ``iteravg.gluonts.Trainer`` with every averaging method on one process and two of them
on 2 ranks under ``mpirun``, GluonTS's ``Evaluator``, then the page, the CSV and the plots.

Checks the structure of the generated table, that its numbers are finite and are the statistics of the per-run
results it was built from, that a rerun reuses every cached run, and that a changed setting invalidates a run.
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
pytest.importorskip("pmdarima")
pytestmark = [pytest.mark.multirank, pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?"


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
    rows = table_rows(page, "### taylor / SimpleFeedForward (gluonts.mx)")
    got = [(r[0], r[1]) for r in rows]
    one = [(m, "1 process") for m in ("no averaging (best epoch)", "no averaging (last iterate)", "NTA",
                                      "Alpha_Suffix", "EMA")]
    two = [(m, "2 ranks") for m in ("no averaging (best epoch)", "no averaging (last iterate)", "NTA")]
    assert got == one + two
    for r in rows:
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
    assert any(r[0].startswith("PR #901") and r[2].startswith("0.57") for r in summary)
    assert "4 of 4 (data, estimator, ranks, seed) groups trained bitwise-identical" in page
    assert "in 4 of 4 multi-rank runs that recorded it (of 4)" in page
    for png in ("metrics.png", "variance-ratios.png"):
        assert (smoke / "img" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_holds_the_statistics_of_the_runs(smoke):
    """The page's mean ± std are recomputed here from the per-run CSV (and the CSV from the runs' JSON)."""
    with open(smoke / "img" / "cells.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 12 + 4  # 12 runs, plus the last iterate of the 4 "none" runs
    records = [json.loads(p.read_text()) for p in (smoke / "runs" / "cells").glob("*.json")]
    assert len(records) == 12
    by_key = {(r["cell"]["method"], r["cell"]["ranks"], r["cell"]["seed"]): r for r in records}
    for row in runs:
        rec = by_key[(row["method"] if row["method"] != "last" else "none", int(row["ranks"]), int(row["seed"]))]
        src = rec["last_iterate"] if row["method"] == "last" else rec
        assert float(row["RMSE"]) == pytest.approx(src["metrics"]["RMSE"], rel=1e-5)
        assert all(math.isfinite(float(row[m])) for m in ("MASE", "RMSE", "mean_wQuantileLoss"))
    page = (smoke / "results.md").read_text()
    rows = {(r[0], r[1]): r for r in table_rows(page, "### taylor / SimpleFeedForward (gluonts.mx)")}
    for method, label in (("ema", "EMA"), ("nta", "NTA")):
        values = np.array([float(r["RMSE"]) for r in runs if r["method"] == method and r["ranks"] == "1"])
        mean, std = (parse(x) for x in rows[(label, "1 process")][3].split(" ± "))
        assert mean == pytest.approx(values.mean(), rel=2e-3, abs=1)
        assert std == pytest.approx(values.std(ddof=1), rel=2e-2, abs=1)


def test_rerun_reuses_cached_runs_and_a_changed_setting_invalidates_one(smoke):
    cells = sorted((smoke / "runs" / "cells").glob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in cells}
    proc = study(smoke)
    assert "12 of 12 cells cached" in proc.stdout and "0 to run" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in cells} == before

    from studies.averaging import grid, runner

    profile = grid.PROFILES["smoke"]
    assert runner.missing(profile, profile.cells(), smoke / "runs") == []
    record = json.loads(cells[0].read_text())
    record["settings_id"] = "0" * 16  # as if computed with other settings
    cells[0].write_text(json.dumps(record))
    assert [c.key for c in runner.missing(profile, profile.cells(), smoke / "runs")] == [record["key"]]
