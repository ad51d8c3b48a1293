"""Immutable snapshots: the writer killed (SIGKILL) at every stage of a write never loses the previous snapshot;
names are never reused; pruning touches only iteravg's own snapshots; a bad ``latest`` falls back to the newest
snapshot that verifies; the state record carries its own checksum; explicit snapshot paths are read, and written
next to, never inside."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

from iteravg.checkpoint import (CheckpointError, check_writable, checkpoint_root, list_snapshots, read_snapshot,
                                resolve_snapshot, write_snapshot)

HERE = Path(__file__).parent


def make_net(seed: int) -> nn.HybridSequential:
    mx.random.seed(seed)
    net = nn.HybridSequential(prefix="snap_")
    with net.name_scope():
        net.add(nn.Dense(4, in_units=3))
    net.initialize(mx.init.Uniform())
    net(mx.nd.ones((1, 3)))
    return net


def params_of(net) -> list:
    return [p.data().asnumpy() for p in net.collect_params().values()]


def write(root, epoch: int, keep: int = 2) -> Path:
    """One snapshot of a real MXNet network (seeded by ``epoch``): averaged.params and a second file."""
    net = make_net(epoch)
    return write_snapshot(root, f"epoch-{epoch:06d}", {"epoch": epoch},
                          {"averaged.params": lambda p: net.save_parameters(str(p)),
                           "extra.bin": lambda p: p.write_bytes(bytes([epoch]) * 64)}, keep=keep)


def assert_loads(snap: Path, epoch: int) -> None:
    _, state = read_snapshot(snap)  # every file's SHA-256 and the record checksum
    assert state["epoch"] == epoch
    net = make_net(999)
    net.load_parameters(str(snap / "averaged.params"))
    for got, want in zip(params_of(net), params_of(make_net(epoch))):
        np.testing.assert_array_equal(got, want)


STAGES = ["tmp-created", "file-1", "file-2", "state-written", "renamed", "latest-switched", "pruning"]


@pytest.mark.parametrize("stage", STAGES)
def test_kill_9_at_every_write_stage_keeps_the_previous_snapshot(tmp_path, stage):
    write(tmp_path, 1)
    write(tmp_path, 2)
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); from test_snapshots import write; write({str(tmp_path)!r}, 3)"
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ITERAVG_FAULT=f"kill-at:{stage}"),
                          capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    # The previous snapshot always verifies and loads, whatever the stage.
    assert_loads(tmp_path / "epoch-000002", 2)
    published = stage in ("latest-switched", "pruning")
    snap, state = read_snapshot(tmp_path)
    assert snap.name == ("epoch-000003" if published else "epoch-000002")
    assert_loads(snap, state["epoch"])
    assert os.readlink(tmp_path / "latest") == snap.name  # never dangling
    # The next writer succeeds, cleans the leftovers and keeps the newest two.
    new = write(tmp_path, 4)
    assert new.name == "epoch-000004" and os.readlink(tmp_path / "latest") == "epoch-000004"
    assert not list(tmp_path.glob(".tmp-*"))
    assert_loads(new, 4)
    kept = list_snapshots(tmp_path)
    assert len(kept) == 2 and kept[-1].name == "epoch-000004"
    for s in kept:
        assert_loads(s, json.loads((s / "averaging-state.json").read_text())["epoch"])


def test_a_published_snapshot_is_never_rewritten_and_names_are_never_reused(tmp_path):
    first = write(tmp_path, 7)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    second = write(tmp_path, 7)  # same epoch, new state (e.g. train end after a skipped on_epoch_end)
    assert (first.name, second.name) == ("epoch-000007", "epoch-000007.1")
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert os.readlink(tmp_path / "latest") == "epoch-000007.1"
    s1 = json.loads((first / "averaging-state.json").read_text())
    s2 = json.loads((second / "averaging-state.json").read_text())
    assert s2["seq"] > s1["seq"] and s2["snapshot"] == "epoch-000007.1"
    write(tmp_path, 8, keep=1)
    write(tmp_path, 9, keep=1)
    assert [p.name for p in list_snapshots(tmp_path)] == ["epoch-000009"]
    again = write(tmp_path, 7, keep=1)  # e.g. a resume from an older copy: still a fresh name
    assert again.name == "epoch-000007.2"


def test_pruning_removes_only_iteravg_snapshots(tmp_path):
    user = tmp_path / "my_dataset"
    user.mkdir()
    (user / "data.csv").write_text("a,b\n1,2\n")
    lookalike = tmp_path / "epoch-000000"  # iteravg's name pattern, but not iteravg's (no state record)
    lookalike.mkdir()
    (lookalike / "notes.txt").write_text("mine")
    (tmp_path / "notes.txt").write_text("also mine")
    for e in range(1, 5):
        write(tmp_path, e, keep=1)
    assert (user / "data.csv").read_text() == "a,b\n1,2\n" and (lookalike / "notes.txt").exists()
    assert (tmp_path / "notes.txt").exists()
    assert [p.name for p in list_snapshots(tmp_path)] == ["epoch-000004"]


@pytest.mark.parametrize("damage", ["no-latest", "dangling", "bad-json", "bad-record-sha", "bad-file"])
def test_a_bad_latest_falls_back_to_the_newest_snapshot_that_verifies(tmp_path, damage, caplog):
    write(tmp_path, 1, keep=5)
    write(tmp_path, 2, keep=5)
    last = write(tmp_path, 3, keep=5)
    js = last / "averaging-state.json"
    if damage == "no-latest":
        (tmp_path / "latest").unlink()
    elif damage == "dangling":
        (tmp_path / "latest").unlink()
        os.symlink("epoch-000042", tmp_path / "latest")
    elif damage == "bad-json":
        js.write_text(js.read_text()[:30])
    elif damage == "bad-record-sha":  # valid JSON, a field changed: only the record checksum catches it
        js.write_text(json.dumps(dict(json.loads(js.read_text()), epoch=30)))
    else:
        (last / "extra.bin").write_bytes(b"\0" * 64)
    want = 3 if damage in ("no-latest", "dangling") else 2  # the newest snapshot that verifies
    with caplog.at_level(logging.WARNING, logger="iteravg"):
        snap, state = read_snapshot(tmp_path)
    assert snap.name == f"epoch-00000{want}" and state["epoch"] == want
    assert "newest snapshot that verifies" in caplog.text
    assert_loads(snap, want)
    if damage != "bad-file":  # the record is fine there: only a full verification falls back
        assert resolve_snapshot(tmp_path).name == f"epoch-00000{want}"
    # The next write publishes normally.
    assert write(tmp_path, 4).name == "epoch-000004" and read_snapshot(tmp_path)[0].name == "epoch-000004"


def test_record_checksum_and_records_from_before_it(tmp_path, caplog):
    snap = write(tmp_path, 1)
    js = snap / "averaging-state.json"
    record = json.loads(js.read_text())
    js.write_text(json.dumps(dict(record, epoch=5)))
    with pytest.raises(CheckpointError, match="record_sha256"):
        read_snapshot(tmp_path)
    del record["record_sha256"]  # written by an older iteravg: accepted, with a warning
    js.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="iteravg"):
        assert read_snapshot(tmp_path)[1]["epoch"] == 1
    assert "no record_sha256" in caplog.text


def test_an_explicit_snapshot_path_is_read_and_written_next_to(tmp_path):
    old = write(tmp_path, 1, keep=5)
    write(tmp_path, 2, keep=5)
    snap, state = read_snapshot(old)
    assert snap == old and state["epoch"] == 1
    assert checkpoint_root(old) == tmp_path and checkpoint_root(tmp_path / "latest") == tmp_path
    assert checkpoint_root(tmp_path) == tmp_path and checkpoint_root(tmp_path / "new") == tmp_path / "new"
    new = write(old, 3, keep=5)  # resume from the explicit path, then save: next to it, not inside it
    assert new.parent == tmp_path and not [p for p in old.iterdir() if p.is_dir()]
    assert os.readlink(tmp_path / "latest") == "epoch-000003"


def test_check_writable_names_the_directory(tmp_path):
    assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="not writable") as err:
        check_writable(blocker / "ckpt")
    assert str(blocker / "ckpt") in str(err.value)
    assert not list((tmp_path / "a" / "b").iterdir())  # the probe is gone


def test_snapshot_names_are_checked(tmp_path):
    with pytest.raises(ValueError, match="snapshot name"):
        write_snapshot(tmp_path, "my_dataset", {}, {})
