"""Fuzzing the checkpoint readers with hypothesis: mutated safetensors headers, mutated state records (damaged, or
re-signed as a hostile author would), and whole mutated snapshot directories (records, tensor files, ``latest``).

Every reader must either succeed or raise ``CheckpointError`` with a one-line message: no other exception type, no
hang (pytest-timeout), no allocation beyond the input's size (the address space is capped at the process's size plus
1 GiB while fuzzing, so an allocation sized from a hostile field fails loudly).

``make test`` runs a small, deterministic subset (``ITERAVG_FUZZ_EXAMPLES`` unset: 120 examples per property);
``make fuzz`` runs 100,000+ (``ITERAVG_FUZZ_EXAMPLES=50000``; random seeds, so each run explores anew).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, List

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import iteravg  # noqa: E402
from iteravg import checkpoint  # noqa: E402
from iteravg.checkpoint import (LATEST, STATE_FILE, CheckpointError, parse_record, read_snapshot,  # noqa: E402
                                record_digest)
from iteravg.core.records import AVERAGED_FILE, averager_record, describe_snapshot  # noqa: E402
from iteravg.core.tensorfile import parse_tensors  # noqa: E402

FULL = "ITERAVG_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("ITERAVG_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not FULL,
                suppress_health_check=list(HealthCheck))
#: On-disk examples cost ~100x more than in-memory ones: a tenth as many.
FUZZ_DISK = settings(FUZZ, max_examples=max(30, EXAMPLES // 10))
pytestmark = pytest.mark.timeout(7200 if FULL else 300)

# -- values a hostile or damaged file may hold --------------------------------------------------------
INTERESTING = [None, True, False, 0, -1, 1, 2**31, 2**62, 2**63, 2**64, -(2**63), 10**30, 1e308, float("inf"),
               float("nan"), -0.0, "", ".", "..", "../x", "/etc/hostname", "a/b", "a\\b", ".hidden", "x\x00y",
               "averaged.safetensors", "averaging-state.json", "F32", "F16", "float32", "int64", "nta", [], {},
               [2**62, 4], [-1], [0, 2**64], ["a", [1], "float32"], "0" * 64, "f" * 32]
SCALARS = st.one_of(st.sampled_from(INTERESTING), st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(), st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=8)


def _paths(obj: Any, prefix: tuple = ()) -> List[tuple]:
    """Every path into a JSON value (dict keys, list indices)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(data: Any, obj: Any) -> Any:
    """A few random edits of a JSON value: replace, delete or add at random paths."""
    obj = copy.deepcopy(obj)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths = _paths(obj)
        path = data.draw(st.sampled_from(paths), label="path")
        action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
        value = copy.deepcopy(data.draw(JSON, label="value"))  # INTERESTING's lists must stay as they are
        if not path:
            obj = value if action == "replace" else obj
            continue
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if action == "replace":
            parent[key] = value
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[data.draw(st.sampled_from(INTERESTING[16:28]) | st.text(max_size=8), label="key")] = value
        else:
            parent.insert(key, value)
    return obj


def _damage(data: Any, raw: bytes) -> bytes:
    """Raw byte damage: flips, cuts, insertions."""
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="damages")):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "truncate"]), label="damage")
        i = data.draw(st.integers(0, max(0, len(raw))), label="at")
        if kind == "flip" and raw:
            raw[min(i, len(raw) - 1)] ^= data.draw(st.integers(1, 255), label="bits")
        elif kind == "cut":
            del raw[i : i + data.draw(st.integers(1, 16), label="n")]
        elif kind == "insert":
            raw[i:i] = data.draw(st.binary(max_size=16), label="bytes")
        else:
            del raw[i:]
    return bytes(raw)


def _one_line(exc: BaseException) -> None:
    assert isinstance(exc, CheckpointError), f"{type(exc).__name__}: {exc}"
    assert "\n" not in str(exc), str(exc)
    event("refused")  # --hypothesis-show-statistics shows how many inputs were refused and how many read


def _read() -> None:
    event("read")


@pytest.fixture(autouse=True)
def bounded_memory():
    """Cap the address space at the current size + 1 GiB while fuzzing: an allocation sized from a hostile field
    (2**62 elements...) raises MemoryError -- which the properties count as a failure."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    cap = size + (1 << 30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# -- 1. safetensors headers --------------------------------------------------------------------------------
def _encode(header: Any, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + body


BASE_HEADER = {"__metadata__": {"format": "iteravg-averaged"},
               "w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
               "h": {"dtype": "F16", "shape": [2], "data_offsets": [48, 52]},
               "s": {"dtype": "I64", "shape": [], "data_offsets": [52, 60]}}
BASE_BODY = bytes(range(60))


def _check_tensors(raw: bytes) -> None:
    try:
        out = parse_tensors(raw, "fuzzed.safetensors")
    except Exception as exc:  # noqa: BLE001 -- the property: only CheckpointError
        _one_line(exc)
        return
    assert sum(a.nbytes for a in out.values()) <= len(raw)  # nothing beyond the file's own bytes
    _read()


@FUZZ
@given(data=st.data())
def test_fuzzed_safetensors_headers(data):
    mode = data.draw(st.sampled_from(["json", "bytes", "header-text", "length"]), label="mode")
    if mode == "json":  # a well-formed file whose header was edited (re-encoded with the right length)
        body = BASE_BODY if data.draw(st.booleans(), label="same body") else _damage(data, BASE_BODY)
        raw = _encode(_mutate(data, BASE_HEADER), body)
    elif mode == "bytes":  # raw damage anywhere
        raw = _damage(data, _encode(BASE_HEADER, BASE_BODY))
    elif mode == "header-text":  # damage inside the JSON text, the length prefix kept right
        text = _damage(data, json.dumps(BASE_HEADER).encode())
        raw = struct.pack("<Q", len(text)) + text + BASE_BODY
    else:
        n = data.draw(st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 7, 8, 2**63, 2**64 - 1]), label="n")
        raw = struct.pack("<Q", n) + _encode(BASE_HEADER, BASE_BODY)[8:]
    _check_tensors(raw)


# -- 2. state records -------------------------------------------------------------------------------------
def _base_snapshot(root: Path) -> Path:
    avg = iteravg.Averager(iteravg.NTASchedule(epochs=6, n=1), comm="local")
    params = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "h": np.ones(2, np.float16)}
    for epoch, metric in enumerate([3.0, 2.0, 4.0, 5.0], start=1):  # averaging starts at epoch 3
        params["w"] += 1
        avg.epoch_end(params, metric=metric, epoch=epoch)
    avg.save(root / "ckpt")
    avg.save(root / "ckpt")  # a second snapshot (epoch-000004.1): fallbacks have somewhere to go
    return root / "ckpt"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    ckpt = _base_snapshot(tmp_path_factory.mktemp("fuzz-base"))
    snap = ckpt / os.readlink(ckpt / LATEST)
    return {"ckpt": ckpt, "record": json.loads((snap / STATE_FILE).read_text()),
            "tensors": (snap / AVERAGED_FILE).read_bytes()}


def _sign(record: Any) -> Any:
    if isinstance(record, dict):
        record = dict(record)
        record.pop("record_sha256", None)
        try:
            record["record_sha256"] = record_digest(record)
        except (ValueError, RecursionError):
            pass
    return record


def _check_record(raw: bytes) -> None:
    try:
        record = parse_record(raw, "fuzzed-state.json")
        averager_record(record)
    except Exception as exc:  # noqa: BLE001 -- the property: only CheckpointError
        _one_line(exc)
        return
    _read()


@FUZZ
@given(data=st.data())
def test_fuzzed_state_records(base, data):
    mode = data.draw(st.sampled_from(["hostile", "damaged-json", "bytes"]), label="mode")
    if mode == "hostile":  # structurally edited, then re-signed: the checksum cannot save us
        raw = json.dumps(_sign(_mutate(data, base["record"]))).encode()
    elif mode == "damaged-json":  # edited, checksum not updated
        raw = json.dumps(_mutate(data, base["record"])).encode()
    else:
        raw = _damage(data, json.dumps(base["record"]).encode())
    _check_record(raw)


# -- 3. whole snapshot directories ----------------------------------------------------------------------
LINKS = ["epoch-000004", "epoch-000004.1", "../outside", "/tmp", "epoch-000004.1/..", "missing-000001", "",
         "epoch-000004/../../x", "latest"]


def _readers(ckpt: Path) -> List[Callable[[], Any]]:
    def load() -> None:
        avg = iteravg.Averager(iteravg.NTASchedule(epochs=6, n=1), comm="local")
        avg.load(ckpt, {"w": np.zeros((3, 4), np.float32), "h": np.zeros(2, np.float16)})

    return [lambda: read_snapshot(ckpt), lambda: describe_snapshot(ckpt), load,
            lambda: checkpoint.latest_epoch(ckpt), lambda: checkpoint.list_snapshots(ckpt)]


@FUZZ_DISK
@given(data=st.data())
def test_fuzzed_snapshot_directories(base, data, tmp_path_factory):
    work = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    try:
        ckpt = work / "ckpt"
        shutil.copytree(base["ckpt"], ckpt, symlinks=True)
        snap = ckpt / os.readlink(ckpt / LATEST)
        tensors = base["tensors"]
        if data.draw(st.booleans(), label="edit tensors"):
            header_len = struct.unpack("<Q", tensors[:8])[0]
            header = json.loads(tensors[8 : 8 + header_len])
            tensors = (_encode(_mutate(data, header), tensors[8 + header_len :])
                       if data.draw(st.booleans(), label="as json") else _damage(data, tensors))
            (snap / AVERAGED_FILE).write_bytes(tensors)
        record = copy.deepcopy(base["record"])
        if isinstance(record.get("files"), dict):
            record["files"][AVERAGED_FILE] = hashlib.sha256(tensors).hexdigest()  # the hostile author re-signs
        if data.draw(st.booleans(), label="edit record"):
            record = _mutate(data, record)
        (snap / STATE_FILE).write_bytes(json.dumps(_sign(record) if data.draw(st.booleans(), label="sign") else
                                                   record).encode())
        if data.draw(st.booleans(), label="edit latest"):
            (ckpt / LATEST).unlink()
            os.symlink(data.draw(st.sampled_from(LINKS), label="latest") or ".", ckpt / LATEST)
        if data.draw(st.booleans(), label="damage older"):
            older = ckpt / "epoch-000004"
            (older / STATE_FILE).write_bytes(_damage(data, (older / STATE_FILE).read_bytes()))
        for read in _readers(ckpt):
            try:
                read()
            except Exception as exc:  # noqa: BLE001 -- the property: only CheckpointError
                _one_line(exc)
                continue
            _read()
    finally:
        shutil.rmtree(work, ignore_errors=True)
