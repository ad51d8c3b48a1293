"""The ``iteravg`` CLI fails well: defaults in ``--help``; every usage error is one line, exit 2, printed by rank 0
only (also under horovodrun); no empty run directory left by a failed run; ``--resume`` with no epochs left says
so; ``iteravg inspect`` takes a run directory; progress on rank 0 only. Single-process tests run the CLI
in-process (tiny runs); one horovodrun job checks "once" and "rank 0 only" for real."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from iteravg.comm import RANK_ENV
from iteravg.mx import cli

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import horovodrun, run  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
TINY = ["--epochs", "3", "--hidden", "8", "--batch-size", "32", "--nta-n", "1"]


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for key in RANK_ENV:
        monkeypatch.delenv(key, raising=False)


def call(capsys, *argv: str) -> tuple:
    """(exit code, stdout, stderr) of ``iteravg argv`` run in this process."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_help_shows_every_default_and_the_accepted_ranges(capsys):
    code, out, _ = call(capsys, "train", "--help")
    assert code == 0
    blocks = {}  # first option string -> its help text, whitespace normalised
    for chunk in re.split(r"\n(?=  -)", out.split("options:", 1)[1].strip("\n")):
        blocks[chunk.split()[0].rstrip(",")] = " ".join(chunk.split())
    for option, default in [("--strategy", "nta"), ("--epochs", "40"), ("--batch-size", "8"), ("--lr", "0.05"),
                            ("--momentum", "0.9"), ("--nta-n", "5"), ("--alpha", "0.75"), ("--eta", "0.0"),
                            ("--fallback-alpha", "0.05"), ("--comm", "auto"), ("--sync", "mean"),
                            ("--out", "runs/<timestamp>"), ("--checkpoint-dir", "<out>/checkpoints")]:
        assert f"(default: {default})" in blocks[option], (option, blocks[option])
    text = " ".join(out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "in (-1, inf)" in text  # --eta: what is accepted, as the parser checks it


@pytest.mark.parametrize("value,ok", [("inf", False), ("-1", False), ("nan", False), ("1e300", True), ("-0.5", True)])
def test_eta_accepts_exactly_the_documented_range(capsys, value, ok):
    try:
        args = cli.build_parser().parse_args(["train", "--eta", value])
        code = 0
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    if ok:
        assert code == 0 and args.eta == float(value)
    else:
        assert code == 2 and "--eta: must be in (-1, inf)" in one_line(err)


def _file(tmp_path: Path) -> Path:
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


@pytest.mark.parametrize("args,needle", [
    (["--epochs", "-3"], "argument --epochs: must be >= 1"),
    (["--strategy", "swa"], "argument --strategy: invalid choice"),
    (["--nta-n", "zero"], "argument --nta-n/--n: expected an integer"),
    (["--progress", "--no-progress"], "not allowed with argument"),
    (["--batch-size", "100000"], "--batch-size 100000 is larger than each rank's share"),
    (["--resume"], "--resume: checkpoint directory"),
    (["--data", "{tmp}/semi.csv"], "semi.csv line 1 has a single column; it looks separated by semicolons"),
    (["--data", "{tmp}/missing.csv"], "line 3, column 2 ('b') is empty"),
    (["--out", "{file}/run"], "--out {file}/run: {file} exists and is not a directory"),
    (["--checkpoint-dir", "{file}/ck"], "--checkpoint-dir {file}/ck: {file} exists and is not a directory"),
])
def test_usage_errors_are_one_line_exit_2_and_leave_no_directory(tmp_path, capsys, args, needle):
    (tmp_path / "semi.csv").write_text("a;b;target\n" + "\n".join("1;2;3" for _ in range(20)))
    (tmp_path / "missing.csv").write_text("a,b,target\n1,2,3\n1,,3\n")
    subst = {"tmp": str(tmp_path), "file": str(_file(tmp_path))}
    out = tmp_path / "new" / "deeper" / "run"
    code, _, err = call(capsys, "train", "--out", str(out), *TINY, *[a.format(**subst) for a in args])
    line = one_line(err)
    assert code == 2 and line.startswith("iteravg train: error: ") and needle.format(**subst) in line, line
    assert not (tmp_path / "new").exists()  # nothing created by the failed run is left behind


def test_a_failed_run_keeps_directories_it_did_not_create(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    code, _, _ = call(capsys, "train", "--out", str(out), *TINY, "--batch-size", "100000")
    assert code == 2 and out.is_dir()


def test_a_run_failing_in_training_removes_the_directories_it_created(tmp_path, capsys, monkeypatch):
    import iteravg.mx.train as train_mod
    from iteravg import checkpoint

    def failing_fit(*args, checkpoint_dir, **kwargs):
        checkpoint.check_writable(checkpoint_dir)  # what the real loop does first
        raise RuntimeError("simulated failure in epoch 1")

    monkeypatch.setattr(train_mod, "fit", failing_fit)
    with pytest.raises(RuntimeError, match="simulated"):
        cli.main(["train", "--out", str(tmp_path / "new" / "run"), *TINY])
    assert not (tmp_path / "new").exists()


def test_unwritable_out_is_a_usage_error(tmp_path, capsys):
    import os

    if Path("/sys/kernel").is_dir():  # sysfs refuses new directories, even to root
        code, _, err = call(capsys, "train", "--out", "/sys/iteravg-test-run", *TINY)
        assert code == 2 and one_line(err).startswith("iteravg train: error: --out /sys/iteravg-test-run cannot be "
                                                      "created or written: ")
    if os.geteuid() != 0:  # root writes into a read-only directory anyway
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, _, err = call(capsys, "train", "--out", str(ro / "run"), *TINY)
        assert code == 2 and "--out" in one_line(err) and "cannot be created" in err and not (ro / "run").exists()


@pytest.mark.parametrize("env", ["HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"])
def test_usage_errors_are_printed_by_rank_0_only(capsys, monkeypatch, env):
    monkeypatch.setenv(env, "1")
    assert cli.launcher_rank() == 1
    code, out, err = call(capsys, "train", "--eta", "inf")
    assert code == 2 and out == "" and err == ""
    code, out, err = call(capsys, "train", "--help")
    assert code == 0 and out == "" and err == ""
    monkeypatch.setenv(env, "0")
    code, _, err = call(capsys, "train", "--eta", "inf")
    assert code == 2 and "--eta" in one_line(err)


def test_progress_bar_on_rank_0_only(monkeypatch):
    args = cli.build_parser().parse_args(["train", "--progress", "--epochs", "4"])
    bar = cli._progress(args, rank0=True)
    assert bar is not None and not bar.disable and bar.total == 4
    bar.close()
    assert cli._progress(args, rank0=False) is None
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    assert cli._progress(args, rank0=True) is None
    assert cli._progress(cli.build_parser().parse_args(["train", "--no-progress"]), rank0=True) is None


def test_resume_without_epochs_left_and_inspect_of_a_run_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = call(capsys, "train", "--out", str(run_dir), *TINY, "--progress")
    assert code == 0 and "epochs" in err  # the bar (forced: stderr is no terminal here)
    first = json.loads((run_dir / "report.json").read_text())
    snapshot = cli.checkpoint_dir_of(run_dir / "checkpoints")
    for epochs, what in (("3", "that is all of them"), ("2", "more than --epochs 2")):
        code, _, err = call(capsys, "train", "--out", str(run_dir), *TINY, "--resume", "--epochs", epochs,
                            "--no-progress")
        line = one_line(err)
        assert code == 2 and "--resume" in line and "already holds 3 trained epochs" in line and what in line
        assert "pass --epochs larger than 3" in line
    # iteravg inspect: the run directory, its checkpoints/ and the snapshot directory name the same snapshot.
    seen = []
    for path in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "latest"):
        code, out, err = call(capsys, "inspect", str(path), "--json")
        assert code == 0, err
        info = json.loads(out)
        assert info["verified"] and info["epoch"] == 3
        seen.append(Path(info["snapshot"]).resolve())
    assert len(set(seen)) == 1 and snapshot.exists()
    code, _, err = call(capsys, "inspect", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in one_line(err)
    # Resuming for one more epoch: the resumed epoch's values are re-evaluated from the checkpoint, bit for bit.
    code, out, err = call(capsys, "train", "--out", str(run_dir), *TINY, "--resume", "--epochs", "4", "--no-progress")
    assert code == 0, err
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["resumed_from_epoch"] == 3 and rep["epochs_done"] == 4
    resumed = rep["history"][3]["resumed"]
    assert resumed["after_epoch"] == 3 and resumed["was_world_size"] == 1
    assert resumed["val_mse_last"] == first["history"][2]["val_mse_last"]
    assert resumed["val_mse_avg"] == first["history"][2]["val_mse_avg"]
    csv_text = (run_dir / "val_loss.csv").read_text()
    assert "resumed after epoch 3" in csv_text and ",," not in csv_text.splitlines()[3]


@pytest.mark.multirank
@pytest.mark.timeout(400)
def test_under_horovodrun_errors_print_once_and_progress_shows_on_rank_0_only(tmp_path):
    """Real 2-rank jobs: a parse error and a post-start usage error are each printed once; the bar is rank 0's."""
    for args, needle in ((["--eta", "inf"], "--eta"), (["--batch-size", "1000"], "--batch-size 1000")):
        proc = run(horovodrun(2, ["-m", "iteravg", "train", "--out", str(tmp_path / "bad"), *args]), timeout=180,
                   check=False)
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "iteravg train: error:" in ln]
        assert proc.returncode != 0 and len(errors) == 1 and needle in errors[0], proc.stdout + proc.stderr
        assert not (tmp_path / "bad").exists()
    proc = run(horovodrun(2, ["-m", "iteravg", "train", "--out", str(tmp_path / "ok"), *TINY, "--epochs", "2",
                              "--progress"]), timeout=240)
    # Open MPI tags every chunk a rank writes with "[job,rank]<stream>:"; tqdm redraws with "\r".
    parts = re.split(r"\[\d+,(\d+)\]<std(?:out|err)>:", proc.stdout + proc.stderr)
    bars = [(rank, text) for rank, text in zip(parts[1::2], parts[2::2]) if "epochs:" in text]
    assert bars and {rank for rank, _ in bars} == {"0"}, bars
    assert (proc.stdout + proc.stderr).count("held-out MSE") == 1  # the table: rank 0 only
