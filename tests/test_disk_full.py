"""Full and read-only disks, really: a small tmpfs is mounted and filled (root needed; skipped with the reason
otherwise). A snapshot that does not fit is one clear error on every rank naming the checkpoint directory, the
bytes needed and free; its temporary files are removed; the previous snapshot stays intact and loads. With
``on_save_error="warn"`` training goes on and the next snapshot is tried."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import iteravg
from iteravg import checkpoint
from iteravg.checkpoint import SnapshotWriteError, read_snapshot

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import mpirun, run  # noqa: E402


def _mount(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs; unmounted again afterwards."""
    disk = tmp_path / "disk"
    _mount(disk, "1m")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free."""
    import os

    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


def _averager(elems: int = 75_000):
    params = {"w": np.arange(elems, dtype=np.float32)}
    avg = iteravg.Averager(iteravg.EMASchedule(decay=0.5), comm="local")
    return avg, params


def _no_temporaries(root: Path) -> None:
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_a_snapshot_that_does_not_fit_is_one_clear_error_and_leaves_the_previous_one(small_disk):
    ckpt = small_disk / "ckpt"
    avg, params = _averager(100_000)
    for epoch in (1, 2):  # 400 kB each: two fit in 1 MiB, three do not
        avg.step(params)
        avg.epoch_end(params, metric=1.0, epoch=epoch)
        avg.save(ckpt, keep=2)
    avg.step(params)
    avg.epoch_end(params, metric=1.0, epoch=3)
    with pytest.raises(SnapshotWriteError) as err:
        avg.save(ckpt, keep=2)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"checkpoint_dir {str(ckpt)!r}" in msg and "no space left on device (ENOSPC)" in msg
    assert "it needs about " in msg and "kB, the size of the previous snapshot)" in msg and " free;" in msg
    assert "nothing was published" in msg and "'latest' still names epoch-000002" in msg
    _no_temporaries(ckpt)
    snap, record = read_snapshot(ckpt)  # every file's SHA-256 verified
    assert snap.name == "epoch-000002" and record["epoch"] == 2
    fresh, fresh_params = _averager(100_000)
    fresh.load(ckpt, fresh_params)
    assert fresh.average_counter == record["averager"]["schedule"]["average_counter"]


def test_warn_goes_on_says_it_once_and_retries(small_disk, caplog):
    ckpt = small_disk / "ckpt"
    avg, params = _averager()
    filler = _fill(small_disk, 700_000)  # two snapshots fit, a third does not
    results = []
    with caplog.at_level(logging.WARNING, logger="iteravg"):
        for epoch in range(1, 6):
            avg.step(params)
            avg.epoch_end(params, metric=1.0, epoch=epoch)
            results.append(avg.save(ckpt, keep=2, on_save_error="warn"))
            if epoch == 4:
                filler.unlink()  # the operator frees space
    assert [p is not None for p in results] == [True, True, False, False, True]
    failures = [r.getMessage() for r in caplog.records if "training goes on" in r.getMessage()]
    assert len(failures) == 1 and "ENOSPC" in failures[0]  # said once for the run of failures
    assert any("written again after 2 failed snapshot(s)" in r.getMessage() for r in caplog.records)
    _no_temporaries(ckpt)
    assert read_snapshot(ckpt)[1]["epoch"] == 5
    with pytest.raises(ValueError, match="on_save_error"):
        avg.save(ckpt, on_save_error="ignore")


def test_a_read_only_file_system_is_named(small_disk):
    ckpt = small_disk / "ckpt"
    avg, params = _averager(1000)
    avg.step(params)
    avg.epoch_end(params, metric=1.0, epoch=1)
    avg.save(ckpt)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    avg.epoch_end(params, metric=1.0, epoch=2)
    with pytest.raises(SnapshotWriteError, match=r"read-only file system \(EROFS\).*'latest' still names "
                                                 r"epoch-000001"):
        avg.save(ckpt)
    assert read_snapshot(ckpt)[1]["epoch"] == 1


def test_a_writer_without_an_errno_on_a_full_disk_is_a_disk_error(small_disk):
    """MXNet reports a full disk as 'FileStream.Write incomplete' (no errno): the free space tells."""
    import mxnet as mx

    _fill(small_disk, 100_000)

    def params_writer(path: Path) -> None:
        mx.nd.save(str(path), {"w": mx.nd.zeros((100_000,))})

    with pytest.raises(SnapshotWriteError, match=r"the disk is \(nearly\) full: .*Write incomplete"):
        checkpoint.write_snapshot(small_disk / "ckpt", "epoch-000001", {}, {"averaged.params": params_writer})
    _no_temporaries(small_disk / "ckpt")


def test_a_failing_writer_that_is_not_the_disk_is_reraised_as_is(tmp_path):
    def broken(path: Path) -> None:
        raise KeyError("a bug in a writer")

    with pytest.raises(KeyError):
        checkpoint.write_snapshot(tmp_path, "epoch-000001", {}, {"x.bin": broken})
    _no_temporaries(tmp_path)


def test_atomic_write_names_the_path_and_leaves_nothing(small_disk):
    _fill(small_disk, 8192)
    target = small_disk / "report.json"
    with pytest.raises(OSError) as err:
        checkpoint.atomic_write(target, b"x" * 200_000)
    assert err.value.filename == str(target) and err.value.errno == 28
    assert not [p for p in small_disk.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.multirank
@pytest.mark.parametrize("policy", ["raise", "warn"])
def test_every_rank_gets_the_same_error_or_trains_on(tmp_path, small_disk, policy):
    ckpt = small_disk / "ckpt"
    filler = _fill(small_disk, 700_000)
    out = tmp_path / "out"
    out.mkdir()
    proc = run(mpirun(2, ["tests/multirank/worker_disk.py", str(out), str(ckpt), policy, str(filler), "4"]),
               timeout=180, env={"ITERAVG_COMM": "mpi"}, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    _no_temporaries(ckpt)
    if policy == "raise":
        errors = [r["error"] for r in ranks]
        assert errors[0] == errors[1], errors  # one error, the same on every rank
        assert errors[0]["class"] == "SnapshotWriteError" and errors[0]["epoch"] == 3
        assert str(ckpt) in errors[0]["message"] and "ENOSPC" in errors[0]["message"]
        assert "failed on rank 0" in errors[0]["message"] and "free" in errors[0]["message"]
        assert read_snapshot(ckpt)[1]["epoch"] == 2
    else:
        assert ranks[0]["written"] == ["epoch-000001", "epoch-000002", None, None, "epoch-000005", "epoch-000006"]
        assert ranks[1]["written"] == [None] * 6 and ranks[1]["error"] is None  # rank 1 trained on, too
        assert text.count("training goes on without this snapshot") == 1, text[-3000:]
        assert read_snapshot(ckpt)[1]["epoch"] == 6


def test_the_mxnet_callback_warns_once_and_writes_again_at_train_end(tmp_path, caplog):
    """``ModelIterationAveraging(checkpoint_dir=..., on_save_error="warn")``: epoch-end snapshots on a disk too small
    for them fail (said once); after space is freed, train end writes the snapshot the last epoch did not get."""
    import mxnet as mx

    import iteravg.mx as ours

    disk = tmp_path / "disk"
    _mount(disk, "1m")
    try:
        net = mx.gluon.nn.Dense(10_000, in_units=1)  # 80 kB of float32 weights and biases per file
        net.initialize()
        net(mx.nd.ones((1, 1)))
        filler = _fill(disk, 250_000)  # one snapshot (averaged.params + averaged.safetensors) fits, two do not
        strategy = ours.Alpha_Suffix(epochs=3, alpha=1.0, comm="local")
        cb = ours.ModelIterationAveraging(strategy, checkpoint_dir=disk / "ckpt", on_save_error="warn")
        with caplog.at_level(logging.WARNING, logger="iteravg"):
            cb.on_train_start(max_epochs=3)
            for epoch in range(3):
                net.weight.set_data(net.weight.data() + 1)
                cb.on_train_batch_end(training_network=net)
                cb.on_epoch_end(epoch_no=epoch, epoch_loss=1.0, training_network=net, trainer=None,
                                best_epoch_info={}, ctx=mx.cpu())
            filler.unlink()
            cb.on_train_end(training_network=net, temporary_dir=None)
        said = [r.getMessage() for r in caplog.records if "training goes on" in r.getMessage()]
        assert len(said) == 1, said
        snap, record = read_snapshot(disk / "ckpt")
        assert record["epoch"] == 3 and record["stage"] == "train_end"
        _no_temporaries(disk / "ckpt")
        with pytest.raises(ValueError, match="on_save_error"):
            ours.ModelIterationAveraging(strategy, checkpoint_dir=disk / "ckpt", on_save_error="never")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_iteravg_train_on_a_full_disk(tmp_path):
    """The CLI: ``--on-save-error raise`` (default) stops with one line naming the directory, exit 1;
    ``--on-save-error warn`` trains to the end (exit 0) and says it once."""
    disk = tmp_path / "disk"
    _mount(disk, "64k")  # one epoch's snapshot (four small files) fits, two do not
    try:
        cmd = [sys.executable, "-m", "iteravg", "train", "--epochs", "4", "--no-progress"]
        stop = run(cmd + ["--out", str(tmp_path / "a"), "--checkpoint-dir", str(disk / "a")], check=False)
        assert stop.returncode == 1, stop.stderr[-2000:]
        errors = [ln for ln in stop.stderr.splitlines() if ln.startswith("iteravg train: error:")]
        assert len(errors) == 1 and f"checkpoint_dir '{disk / 'a'}'" in errors[0] and " free; " in errors[0]
        assert "Traceback" not in stop.stderr
        subprocess.run(["rm", "-rf", str(disk / "a")], check=True)
        go = run(cmd + ["--out", str(tmp_path / "b"), "--checkpoint-dir", str(disk / "b"), "--on-save-error", "warn"],
                 check=False)
        assert go.returncode == 0, go.stderr[-2000:]
        assert go.stderr.count("training goes on without this snapshot") == 1
        assert json.loads((tmp_path / "b" / "report.json").read_text())["epochs_done"] == 4
        assert read_snapshot(disk / "b")[1]["epoch"] == 1
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
