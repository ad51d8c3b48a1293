"""``iteravg train --posthoc`` and ``iteravg posthoc RUN`` on real small runs: one process (in-process) and a real
2-rank ``horovodrun`` job. The row at the schedule's own start holds the run's averaged model (its iterates and its
validation MSE); ``--json`` has the documented structure with real numbers; ``--export`` writes a snapshot that
``iteravg inspect`` verifies and ``net.load_parameters`` loads (the run's averaged model, at the schedule's start);
a stopped and resumed run rebuilds the same numbers; ``--posthoc-keep`` bounds the store; errors are clear."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from iteravg import checkpoint
from iteravg.comm import RANK_ENV
from iteravg.mx import cli

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import horovodrun, run  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
EPOCHS = 6
TINY = ["--epochs", str(EPOCHS), "--hidden", "8", "--batch-size", "32", "--nta-n", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for key in RANK_ENV:
        monkeypatch.delenv(key, raising=False)


def call(capsys, *argv: str) -> tuple:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def posthoc_json(capsys, run_dir: Path) -> dict:
    code, out, err = call(capsys, "posthoc", run_dir, "--json")
    assert code == 0, err
    return json.loads(out)


def weights(params_file: Path) -> dict:
    net = cli.make_net(10, 8, 0)
    net.load_parameters(str(params_file))
    return {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()}


def check_run(capsys, run_dir: Path, tmp_path: Path) -> dict:
    """The ``iteravg posthoc`` checks every run must pass; returns the ``--json`` output."""
    report = json.loads((run_dir / "report.json").read_text())
    data = posthoc_json(capsys, run_dir)
    assert set(data) == {"schedule_start", "best_start", "rows"}
    rows = data["rows"]
    assert all(set(r) == {"start_epoch", "iterates", "val_mse"} for r in rows)
    assert [r["start_epoch"] for r in rows] == list(range(EPOCHS + 1))
    iterates = [r["iterates"] for r in rows]
    assert iterates == sorted(iterates, reverse=True) and iterates[-1] == 1  # the last start: its end iterate alone
    assert all(0.05 < r["val_mse"] < 5 for r in rows)  # real MSEs on standardised targets
    by_start = {r["start_epoch"]: r for r in rows}
    start = data["schedule_start"]
    assert start == report["trigger_epoch"] is not None
    own = report["metrics"]["averaged"]["val_mse"]
    assert by_start[start]["iterates"] == report["average_counter"]
    assert abs(by_start[start]["val_mse"] - own) <= 1e-5 * own, (by_start[start]["val_mse"], own)
    assert data["best_start"] == min(rows, key=lambda r: r["val_mse"])["start_epoch"]
    lines = (run_dir / "posthoc.csv").read_text().splitlines()
    assert lines[0] == "start_epoch,iterates,val_mse,note" and len(lines) == len(rows) + 1
    assert "schedule's start" in lines[1 + start] and "best" in lines[1 + data["best_start"]]
    assert (run_dir / "posthoc.png").read_bytes()[:4] == b"\x89PNG"
    # The table: both marks, and the comparison line.
    code, out, _ = call(capsys, "posthoc", run_dir)
    assert code == 0 and "<- schedule's start" in out and "best start: epoch" in out
    # --export at the schedule's start: a verified snapshot holding the run's averaged model.
    exported = tmp_path / f"export-{run_dir.name}"
    code, out, err = call(capsys, "posthoc", run_dir, "--export", start, exported)
    assert code == 0, err
    code, out, err = call(capsys, "inspect", exported, "--json")
    info = json.loads(out)
    assert code == 0 and info["verified"] and info["stage"] == "posthoc", err
    assert info["trigger_epoch"] == start and info["average_counter"] == report["average_counter"]
    mine, theirs = weights(exported / "averaged.params"), weights(run_dir / "checkpoints" / "averaged.params")
    for k, v in theirs.items():
        assert np.max(np.abs(mine[k] - v)) <= 1e-5 * np.max(np.abs(v)), k
    return data


def test_posthoc_on_a_one_process_run_resumed_and_bounded(tmp_path, capsys, monkeypatch):
    full = tmp_path / "full"
    code, out, err = call(capsys, "train", "--out", full, *TINY, "--posthoc")
    assert code == 0 and f"iteravg posthoc {full}" in out, err
    data = check_run(capsys, full, tmp_path)
    # Stopped after epoch 3, resumed: the post-hoc sums continue exactly, so every number is the same.
    part = tmp_path / "part"
    monkeypatch.setenv("ITERAVG_STOP_AFTER_EPOCH", "3")
    assert call(capsys, "train", "--out", part, *TINY, "--posthoc")[0] == 3
    monkeypatch.delenv("ITERAVG_STOP_AFTER_EPOCH")
    assert call(capsys, "train", "--out", part, *TINY, "--posthoc", "--resume")[0] == 0
    assert posthoc_json(capsys, part) == data
    # --posthoc-keep 2: the newest two prefixes (and start 0, which needs none).
    kept = tmp_path / "kept"
    assert call(capsys, "train", "--out", kept, *TINY, "--posthoc", "--posthoc-keep", "2")[0] == 0
    rows = posthoc_json(capsys, kept)["rows"]
    assert [r["start_epoch"] for r in rows] == [0, EPOCHS - 1, EPOCHS]
    assert [r["val_mse"] for r in rows] == [data["rows"][e]["val_mse"] for e in (0, EPOCHS - 1, EPOCHS)]
    assert [p.name for p in checkpoint.list_snapshots(kept / "checkpoints" / "posthoc")] == \
        [f"prefix-{EPOCHS - 1:06d}", f"prefix-{EPOCHS:06d}"]


def test_posthoc_errors_are_clear(tmp_path, capsys):
    plain = tmp_path / "plain"
    assert call(capsys, "train", "--out", plain, *TINY[2:], "--epochs", "2")[0] == 0
    code, _, err = call(capsys, "posthoc", plain)
    assert code == 1 and "trained without posthoc=True (iteravg train --posthoc)" in err
    code, _, err = call(capsys, "train", "--out", tmp_path / "x", *TINY, "--posthoc-keep", "3")
    assert code == 2 and "--posthoc-keep needs --posthoc" in err and not (tmp_path / "x").exists()
    code, _, err = call(capsys, "posthoc", tmp_path / "nope")
    assert code == 2 and "does not exist" in err
    code, _, err = call(capsys, "posthoc", plain, "--export", "three", tmp_path / "out")
    assert code == 2 and "--export START must be an epoch number" in err


@pytest.mark.multirank
@pytest.mark.timeout(400)
def test_posthoc_on_a_two_rank_horovodrun_run(tmp_path, capsys):
    run_dir = tmp_path / "hvd"
    run(horovodrun(2, ["-m", "iteravg", "train", "--out", str(run_dir), *TINY, "--posthoc"]), timeout=300)
    assert json.loads((run_dir / "report.json").read_text())["world_size"] == 2
    check_run(capsys, run_dir, tmp_path)
