"""Snapshots: atomic publication, verification, pruning, permissions, crash before publish, MXNet round trip."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

import iteravg.mx as im
from iteravg.checkpoint import CheckpointError, read_snapshot, write_snapshot
from test_differential import make_net, set_params


def write(root, epoch, payload=b"x" * 100):
    return write_snapshot(root, f"epoch-{epoch:06d}", {"epoch": epoch},
                          {"blob.bin": lambda p: p.write_bytes(payload + bytes([epoch]))})


def test_latest_moves_and_old_snapshots_are_pruned(tmp_path):
    for e in (1, 2, 3):
        write(tmp_path, e)
    assert os.readlink(tmp_path / "latest") == "epoch-000003"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.is_symlink()) == \
        ["epoch-000002", "epoch-000003"]
    snap, state = read_snapshot(tmp_path)
    assert state["epoch"] == 3 and (snap / "blob.bin").read_bytes()[-1] == 3


@pytest.mark.parametrize("damage", ["flip", "truncate-file", "truncate-json", "version", "missing"])
def test_damaged_snapshots_are_refused(tmp_path, damage):
    snap = write(tmp_path, 1)
    blob, js = snap / "blob.bin", snap / "averaging-state.json"
    if damage == "flip":
        blob.write_bytes(b"y" + blob.read_bytes()[1:])
    elif damage == "truncate-file":
        blob.write_bytes(blob.read_bytes()[:10])
    elif damage == "truncate-json":
        js.write_text(js.read_text()[:20])
    elif damage == "version":
        js.write_text(json.dumps(dict(json.loads(js.read_text()), format_version=0)))
    else:
        blob.unlink()
    with pytest.raises(CheckpointError):
        read_snapshot(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_snapshot(tmp_path / "nope")


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o000, 0o664, 0o775), (0o077, 0o600, 0o700),
                                                     (0o022, 0o644, 0o755)])
def test_permissions_follow_umask_and_are_never_world_writable(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        snap = write(tmp_path, 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE((snap / "blob.bin").stat().st_mode) == file_mode
    assert stat.S_IMODE((snap / "averaging-state.json").stat().st_mode) == file_mode
    assert stat.S_IMODE(snap.stat().st_mode) == dir_mode


def test_crash_before_publish_keeps_the_previous_snapshot_and_leftovers_are_ignored(tmp_path):
    write(tmp_path, 1)
    code = ("import sys; sys.path.insert(0, %r); from test_checkpoint import write; write(__import__('pathlib')"
            ".Path(%r), 2)") % (os.path.dirname(__file__), str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ITERAVG_FAULT="crash-before-publish"),
                          timeout=60)
    assert proc.returncode == 17
    assert list(tmp_path.glob(".tmp-epoch-000002-*"))
    snap, state = read_snapshot(tmp_path)
    assert state["epoch"] == 1 and snap.name == "epoch-000001"
    write(tmp_path, 3)
    assert not list(tmp_path.glob(".tmp-*"))


def _trained(rng, strategy, net, steps=4):
    strategy.averaging_started = True
    for _ in range(steps):
        set_params([net], rng)
        strategy.apply(net)


def test_mxnet_round_trip_restores_everything(tmp_path):
    rng = np.random.default_rng(0)
    s1, net1 = im.NTA(epochs=5, n=1), make_net()
    s1.update_average_trigger(metric=3.0, epoch=1)
    _trained(rng, s1, net1)
    im.save_checkpoint(s1, tmp_path, epoch=3)
    state = json.loads((tmp_path / "averaging-state.json").read_text())
    assert state["averager"]["schedule"]["val_logs"] == [3.0]
    assert "pickle" not in (tmp_path / "averaging-state.json").read_text()
    # The engine's framework-neutral copy, readable without MXNet (safetensors), holds the same bits.
    from iteravg.core.tensorfile import load_tensors

    neutral = load_tensors(tmp_path / "latest" / "averaged.safetensors")
    for k, s in zip(s1.averaged_model, s1.binding.layout.names):
        assert neutral[s].tobytes() == s1.averaged_model[k].asnumpy().tobytes()
    s2, net2 = im.NTA(epochs=5, n=1), make_net()
    im.load_checkpoint(s2, net2, tmp_path)
    assert (s2.average_counter, s2.averaging_started, s2.val_logs) == (s1.average_counter, True, [3.0])
    for k in s1.averaged_model:
        np.testing.assert_array_equal(s2.averaged_model[k].asnumpy(), s1.averaged_model[k].asnumpy())
    net3 = make_net()
    net3.load_parameters(str(tmp_path / "averaged.params"))
    for p3, k in zip(net3.collect_params().values(), s1.averaged_model):
        np.testing.assert_array_equal(p3.data().asnumpy(), s1.averaged_model[k].asnumpy())


def test_wrong_model_and_altered_params_are_refused(tmp_path):
    from mxnet.gluon import nn

    rng = np.random.default_rng(1)
    s1, net1 = im.Alpha_Suffix(epochs=4), make_net()
    _trained(rng, s1, net1)
    im.save_checkpoint(s1, tmp_path, epoch=2)
    other = nn.HybridSequential(prefix="m_")
    with other.name_scope():
        other.add(nn.Dense(4, in_units=5))
    other.initialize()
    other(mx.nd.ones((1, 5)))
    with pytest.raises(ValueError, match="another model"):
        im.load_checkpoint(im.Alpha_Suffix(epochs=4), other, tmp_path)
    params = tmp_path / "latest" / "averaged.params"
    data = bytearray(params.read_bytes())
    data[-3] ^= 0x40
    params.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        im.load_checkpoint(im.Alpha_Suffix(epochs=4), make_net(), tmp_path)
