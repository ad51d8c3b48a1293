"""Atomic, self-verifying checkpoints of the averaging state, written by rank 0 only.

Layout of ``checkpoint_dir``::

    checkpoint_dir/
      latest -> epoch-000007            # symlink, switched atomically; the only thing readers trust
      epoch-000006/                     # previous snapshot, kept (``keep`` snapshots in all)
      epoch-000007/
        averaging-state.json            # format, version, epoch, world size, strategy state, fingerprint,
                                        # layout and the SHA-256 of every file below
        averaged.params                 # the averaged model, ``net.load_parameters``-compatible
        ...                             # files added by the training loop (last iterate, optimizer state)
      averaged.params -> latest/averaged.params              # convenience links, never rewritten
      averaging-state.json -> latest/averaging-state.json

Why a directory per snapshot: a checkpoint is several files that must agree. Each snapshot is written into a
hidden temporary directory (``.tmp-*``), every file is fsynced, the directory is renamed into place and only
then ``latest`` is switched with an atomic ``rename``. A crash at any point leaves ``latest`` pointing at the
previous complete snapshot; leftovers named ``.tmp-*`` are never read and are removed by the next writer.

Nothing read from disk is unpickled: the state is JSON, tensors are MXNet's binary NDArray format.
Files and directories are created with the user's umask and are never world-writable.

Fault injection (for tests): ``ITERAVG_FAULT=crash-before-publish`` (or ``crash-before-publish:epoch-000005`` for
one snapshot) makes the writer ``os._exit(17)`` after the snapshot's files are written and synced but before it
is published.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

FORMAT = "iteravg-averaging-state"
FORMAT_VERSION = 1
STATE_FILE = "averaging-state.json"
PARAMS_FILE = "averaged.params"
LATEST = "latest"
FAULT_ENV = "ITERAVG_FAULT"

__all__ = ["CheckpointError", "atomic_write", "write_snapshot", "read_snapshot", "resolve_snapshot", "sha256_file", "FORMAT_VERSION"]


class CheckpointError(ValueError):
    """The checkpoint is missing, truncated, corrupted, of another format version, or for another model."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _secure(path: Path, is_dir: bool = False) -> None:
    """Apply the user's umask and never leave anything world-writable."""
    mode = (0o777 if is_dir else 0o666) & ~_umask() & ~0o002
    os.chmod(path, mode)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: os.PathLike, data: bytes) -> None:
    """Write a single file atomically (temp file + fsync + rename) with the user's umask, never world-writable."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _secure(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_snapshot(
    checkpoint_dir: os.PathLike,
    name: str,
    state: Dict[str, Any],
    files: Dict[str, Callable[[Path], None]],
    keep: int = 2,
) -> Path:
    """Write a snapshot directory ``name`` with ``state`` as JSON plus ``files`` (name -> writer(path)).

    Returns the published snapshot's path. Atomic: readers see the previous snapshot or this one, whole.
    """
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(root)
    tmp = root / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    _secure(tmp, is_dir=True)
    digests: Dict[str, str] = {}
    for fname, writer in files.items():
        path = tmp / fname
        writer(path)
        _secure(path)
        _fsync_file(path)
        digests[fname] = sha256_file(path)
    record = dict(state, format=FORMAT, format_version=FORMAT_VERSION, files=digests, written_at=time.time())
    state_path = tmp / STATE_FILE
    with open(state_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _secure(state_path)
    _fsync_dir(tmp)
    fault = os.environ.get(FAULT_ENV, "")
    if fault == "crash-before-publish" or fault == f"crash-before-publish:{name}":
        os._exit(17)  # simulate a crash after writing, before publishing
    final = root / name
    if final.exists():  # re-written snapshot (e.g. after a resume): move the old one aside first
        trash = root / f".tmp-old-{name}-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    _switch_latest(root, name)
    for link, target in ((PARAMS_FILE, f"{LATEST}/{PARAMS_FILE}"), (STATE_FILE, f"{LATEST}/{STATE_FILE}")):
        if not os.path.lexists(root / link):
            os.symlink(target, root / link)
    _prune(root, keep, current=name)
    return final


def _switch_latest(root: Path, name: str) -> None:
    tmp_link = root / f".tmp-link-{os.getpid()}-{time.monotonic_ns()}"
    os.symlink(name, tmp_link)
    os.replace(tmp_link, root / LATEST)
    _fsync_dir(root)


def _clean_temporaries(root: Path) -> None:
    for p in root.glob(".tmp-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _prune(root: Path, keep: int, current: str) -> None:
    snaps = sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")),
                   key=lambda p: p.stat().st_mtime)
    for p in snaps[: max(0, len(snaps) - max(keep, 1))]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def resolve_snapshot(checkpoint_dir: os.PathLike) -> Path:
    """The published snapshot directory: ``latest``'s target, or the directory itself if it is a snapshot."""
    root = Path(checkpoint_dir)
    if (root / LATEST).is_dir():
        return (root / os.readlink(root / LATEST)) if (root / LATEST).is_symlink() else root / LATEST
    if (root / STATE_FILE).is_file() and not (root / STATE_FILE).is_symlink():
        return root
    if not root.exists():
        raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist")
    raise CheckpointError(f"{str(root)!r} holds no published checkpoint (no {LATEST!r} link and no {STATE_FILE})")


def read_snapshot(checkpoint_dir: os.PathLike, verify: bool = True) -> Tuple[Path, Dict[str, Any]]:
    """Read and validate the latest snapshot's state; with ``verify``, check every file's SHA-256."""
    snap = resolve_snapshot(checkpoint_dir)
    path = snap / STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupted?): {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an iteravg averaging state")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {state.get('format_version')!r}; this iteravg reads version {FORMAT_VERSION}"
        )
    if verify:
        for fname, digest in state.get("files", {}).items():
            fpath = snap / fname
            if not fpath.is_file():
                raise CheckpointError(f"checkpoint file {fpath} is missing")
            actual = sha256_file(fpath)
            if actual != digest:
                raise CheckpointError(f"checkpoint file {fpath} is corrupted (SHA-256 {actual[:12]}..., "
                                      f"state file says {digest[:12]}...)")
    return snap, state


def latest_epoch(checkpoint_dir: os.PathLike) -> Optional[int]:
    try:
        return int(read_snapshot(checkpoint_dir, verify=False)[1].get("epoch"))
    except (CheckpointError, TypeError, ValueError):
        return None
