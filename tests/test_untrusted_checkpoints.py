"""Hostile or damaged checkpoints: every malformed input is a ``CheckpointError`` with a one-line message,
``iteravg inspect`` exits 1 without a traceback, ``latest`` and the record's file names cannot leave the checkpoint
directory, and only files the record lists and verifies are read. The hostile author re-signs everything (record
checksum, file SHA-256s): checksums protect against damage, not against malice. (The fuzzer: test_fuzz_checkpoints.)"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import iteravg
from iteravg.checkpoint import STATE_FILE, CheckpointError, read_snapshot, record_digest
from iteravg.core.records import AVERAGED_FILE, describe_snapshot
from iteravg.core.tensorfile import parse_tensors, save_tensors

REPO = Path(__file__).resolve().parents[1]


def _params() -> dict:
    return {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}


def _snapshot(tmp_path: Path) -> Path:
    """A real checkpoint: two snapshots, an average; returns the checkpoint directory."""
    avg = iteravg.Averager(iteravg.AlphaSuffixSchedule(epochs=2, alpha=1.0), comm="local")
    params = _params()
    for epoch in (1, 2):
        params["w"] += 1
        avg.epoch_end(params, epoch=epoch)
        avg.save(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _resign(snap: Path, edit: Callable[[dict], None]) -> None:
    """Edit the state record as a hostile author would: then fix every file's SHA-256 and the record checksum."""
    path = snap / STATE_FILE
    record = json.loads(path.read_text())
    edit(record)
    files = record.get("files")
    for name in list(files) if isinstance(files, dict) else []:
        f = snap / name
        if name and f.is_file():
            record["files"][name] = hashlib.sha256(f.read_bytes()).hexdigest()
    record["record_sha256"] = record_digest(record)
    path.write_text(json.dumps(record))


def _tensor_bytes(header: object, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _one_line_error(fn: Callable[[], object], match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as err:
        fn()
    text = str(err.value)
    assert "\n" not in text, text
    return text


def _load(ckpt: Path) -> None:
    avg = iteravg.Averager(iteravg.AlphaSuffixSchedule(epochs=2, alpha=1.0), comm="local")
    avg.load(ckpt, _params())


def _inspect(path: Path, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """``iteravg inspect PATH``: in this process (an exception would escape ``main``), or as a real command."""
    if subprocess_:
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        return subprocess.run([sys.executable, "-m", "iteravg", "inspect", str(path)], capture_output=True,
                              text=True, timeout=120, env=env)
    from iteravg.mx.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["inspect", str(path)])
    return subprocess.CompletedProcess([], code, out.getvalue(), err.getvalue())


# -- safetensors headers ---------------------------------------------------------------------------
@pytest.mark.parametrize("header,body,match", [
    ([], b"", "not a JSON object"),
    (5, b"", "not a JSON object"),
    ({"x": []}, b"", "needs exactly dtype, shape and data_offsets"),
    ({"x": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]}}, b"", r"needs 73786976294838206464 bytes"),
    ({"x": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, b"\0" * 16, "integers >= 0"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlaps another tensor's bytes"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "leaves a gap"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9, "belong to no tensor"),
    ({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "integers >= 0"),
    ({"x": {"dtype": "Q8", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "has dtype 'Q8'"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2**70]}}, b"\0" * 4, "outside the file"),
    ({"__metadata__": [1]}, b"", "__metadata__"),
])
def test_malformed_safetensors_headers(header, body, match):
    _one_line_error(lambda: parse_tensors(_tensor_bytes(header, body), "t.safetensors"), match)


def test_raw_damage_to_a_tensor_file():
    ok = _tensor_bytes({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    assert parse_tensors(ok)["x"].shape == (1,)
    for data, match in [(b"", "truncated"), (ok[:-1], "outside the file"), (b"\xff" * 8 + b"{}", "header length"),
                        (struct.pack("<Q", 3) + b"\xff\xfe{", "corrupted header"),
                        (struct.pack("<Q", 4000) + b"[" * 4000, "corrupted header"),
                        (struct.pack("<Q", 21) + b'{"a": 1, "a": 2}     ', "duplicate key")]:
        _one_line_error(lambda: parse_tensors(data), match)


def test_shared_bytes_load_nowhere(tmp_path):
    """Two tensors sharing bytes used to load (each a view of the other's data); now the file is refused."""
    save_tensors(tmp_path / "ok.safetensors", {"a": np.ones(2, np.float32)})
    data = _tensor_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    _one_line_error(lambda: parse_tensors(data), "overlaps")


# -- records, links and files -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../escape", "/etc/hostname", "sub/dir", "..", ".hidden", "a\\b", ""])
def test_record_file_names_may_not_leave_the_snapshot(tmp_path, name):
    ckpt = _snapshot(tmp_path)
    snap = ckpt / "epoch-000002"
    _resign(snap, lambda r: r["files"].__setitem__(name, "0" * 64))
    text = _one_line_error(lambda: read_snapshot(snap), "not a plain name inside its snapshot")
    assert repr(name)[1:-1] in text
    # Through the checkpoint directory, the damaged latest is skipped for the older snapshot that verifies.
    snap_used, record = read_snapshot(ckpt)
    assert snap_used.name == "epoch-000001"


@pytest.mark.parametrize("target", ["../elsewhere", "/tmp", "epoch-000002/..", "epoch-000001/../../x"])
def test_latest_may_not_leave_the_checkpoint_directory(tmp_path, target):
    ckpt = _snapshot(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / STATE_FILE).write_text((ckpt / "epoch-000002" / STATE_FILE).read_text())  # a valid-looking record
    (ckpt / "latest").unlink()
    os.symlink(target, ckpt / "latest")
    snap, _ = read_snapshot(ckpt)  # falls back, with a warning, to the newest snapshot inside that verifies
    assert snap.parent == ckpt.resolve() and snap.name == "epoch-000002"
    for p in ckpt.iterdir():
        if p.name.startswith("epoch-"):
            _resign(p, lambda r: r.__setitem__("format_version", 99))
    _one_line_error(lambda: read_snapshot(ckpt), "points to .* which is not a snapshot inside the checkpoint")
    proc = _inspect(ckpt)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("iteravg inspect:")]) == 1, proc.stderr


def test_an_unlisted_averaged_file_is_never_read(tmp_path):
    ckpt = _snapshot(tmp_path)
    snap = ckpt / "epoch-000002"
    save_tensors(snap / "planted.safetensors", {"w": np.zeros((3, 4), np.float32)})
    _resign(snap, lambda r: r["files"].pop(AVERAGED_FILE))
    os.replace(snap / "planted.safetensors", snap / AVERAGED_FILE)  # present, but not listed: not verified
    _one_line_error(lambda: _load(snap), f"holds no {AVERAGED_FILE} that its state record lists")
    summary, problems = describe_snapshot(snap)
    assert problems and f"holds no {AVERAGED_FILE} that its state record lists" in problems[0]


def test_a_symlinked_file_inside_a_snapshot_is_refused(tmp_path):
    ckpt = _snapshot(tmp_path)
    snap = ckpt / "epoch-000002"
    real = tmp_path / "outside.safetensors"
    os.replace(snap / AVERAGED_FILE, real)
    os.symlink(real, snap / AVERAGED_FILE)
    _one_line_error(lambda: read_snapshot(snap), "is a symbolic link")


@pytest.mark.parametrize("edit,match", [
    (lambda r: r.__setitem__("averager", []), "not a JSON object"),
    (lambda r: r["averager"].__setitem__("layout", [["w", [2**62, 4], "float32"]]), "implausible shape"),
    (lambda r: r["averager"].__setitem__("layout", [["w", [-3, 4], "float32"]]), "is not \\[name, shape, dtype\\]"),
    (lambda r: r["averager"]["schedule"].__setitem__("average_counter", 1e999), "average_counter"),
    (lambda r: r["averager"]["schedule"].__setitem__("averaging_started", "yes"), "averaging_started"),
    (lambda r: r["averager"].__setitem__("fingerprint", {"x": 1}), "fingerprint"),
    (lambda r: r.__setitem__("files", ["averaged.safetensors"]), "'files' must map"),
    (lambda r: r.__setitem__("format_version", True), "format version"),
    (lambda r: r["averager"]["schedule"].__setitem__("kind", 7), "'schedule' must be an object"),
])
def test_malformed_records_are_checkpoint_errors_everywhere(tmp_path, edit, match):
    ckpt = _snapshot(tmp_path)
    for name in ("epoch-000001", "epoch-000002"):
        _resign(ckpt / name, edit)
    _one_line_error(lambda: _load(ckpt), match)
    proc = _inspect(ckpt)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_inspect_of_a_hostile_tensor_file_exits_1_without_a_traceback(tmp_path):
    ckpt = _snapshot(tmp_path)
    snap = ckpt / "epoch-000002"
    (snap / AVERAGED_FILE).write_bytes(_tensor_bytes([]))
    _resign(snap, lambda r: None)
    proc = _inspect(snap, subprocess_=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "PROBLEM:" in proc.stderr and "not a JSON object" in proc.stderr
