"""Atomic, immutable, self-verifying snapshots of the averaging state, written by rank 0 only.

Layout of ``checkpoint_dir``::

    checkpoint_dir/
      latest -> epoch-000007.1          # symlink, switched atomically; never names a missing snapshot
      epoch-000006/                     # older snapshots, kept (``keep`` snapshots in all)
      epoch-000007/                     # state at epoch 7 ...
      epoch-000007.1/                   # ... and a later, different state at epoch 7 (e.g. train end): new name
        averaging-state.json            # format, version, snapshot name, seq, epoch, world size, strategy state,
                                        # fingerprint, layout, the SHA-256 of every file below, and
                                        # ``record_sha256``: the SHA-256 of this record itself (canonical JSON)
        averaged.safetensors            # the averaged model by layout name (any framework; iteravg.core.tensorfile)
        averaged.params                 # the same, ``net.load_parameters``-compatible (the MXNet face adds it)
        ...                             # files added by the training loop (last iterate, optimizer state)
      averaged.safetensors -> latest/averaged.safetensors    # convenience links, never rewritten, made for the
      averaged.params -> latest/averaged.params              # ``averaged.*`` files a snapshot holds
      averaging-state.json -> latest/averaging-state.json
      .iteravg-snapshots                # append-only ledger: "<seq> <name>" of every name ever reserved

Rules:

* **Immutable once published.** A published directory is never rewritten. Names are monotonic: the caller's name
  (``epoch-000007``) if it was never used in this directory, else ``epoch-000007.<k>`` with the next ``k``; a name
  is never reused, not even after pruning (the ledger remembers it). Each snapshot also carries a global ``seq``.
* **Atomic.** Files go into a hidden ``.tmp-*`` directory, each is fsynced, the state record last; the directory is
  renamed into place, then ``latest`` is switched with an atomic ``rename`` of a new symlink. A crash at any point
  leaves ``latest`` naming a complete snapshot; ``.tmp-*`` leftovers are never read and the next writer removes them.
* **Pruning** removes only iteravg's own snapshots -- a directory whose name matches ``<word>-<6+ digits>[.<k>]``
  *and* that holds an iteravg state record or is in the ledger -- oldest ``seq`` first, never the one ``latest``
  names. A user's ``my_dataset/`` in the same directory is never touched. A pruned snapshot is first renamed to a
  ``.tmp-prune-*`` name, so a crash mid-deletion never leaves a half-deleted snapshot under a published name.
* **Fallback on read.** If ``latest`` is missing, dangling, or names a snapshot that does not verify, readers use the
  newest snapshot (by ``seq``) that verifies and log a warning saying so.
* **Explicit snapshot paths.** ``read_snapshot("ckpt/epoch-000007")`` reads that snapshot; writers given such a
  path write next to it (``checkpoint_root``), never inside it.
* **Record checksum.** ``record_sha256`` covers the whole record; a record without it (written before this field
  existed) is accepted with a warning (its files are still SHA-256 verified).

Nothing read from disk is unpickled: the state is JSON, tensors are safetensors (and MXNet's NDArray format for
``net.load_parameters``).
Files and directories are created with the user's umask and are never world-writable.

Fault injection (tests): ``ITERAVG_FAULT=kill-at:STAGE`` (or ``kill-at:STAGE:NAME`` for one snapshot) sends SIGKILL
to the writer at STAGE, one of ``tmp-created``, ``file-<k>`` (after the k-th file), ``state-written``,
``renamed``, ``latest-switched``, ``pruning`` (after the first pruned snapshot was renamed aside and partly
deleted). The older ``crash-before-publish[:NAME]`` makes the writer ``os._exit(17)`` at ``state-written``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import _faults

FORMAT = "iteravg-averaging-state"
#: Version 2 (iteravg 0.2): the averager's state nested under "averager", averaged.safetensors. Version 1 records
#: (iteravg 0.1) are still read; the engine translates them (``core.records.averager_record``).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STATE_FILE = "averaging-state.json"
PARAMS_FILE = "averaged.params"
LATEST = "latest"
LEDGER = ".iteravg-snapshots"
FAULT_ENV = _faults.FAULT_ENV
#: A snapshot's name: ``<word>-<6+ digits>`` as given by the caller, plus ``.<k>`` if that name was taken.
SNAPSHOT_NAME = re.compile(r"^(?P<base>[a-z][a-z0-9_]*-\d{6,})(?:\.(?P<rev>\d+))?$")

__all__ = ["CheckpointError", "SnapshotWriteError", "atomic_write", "write_snapshot", "read_snapshot", "read_verified",
           "parse_record", "check_file_name", "resolve_snapshot", "sha256_file", "checkpoint_root", "check_writable",
           "list_snapshots", "remove_snapshots", "record_digest", "FORMAT_VERSION"]
logger = logging.getLogger("iteravg")


class CheckpointError(ValueError):
    """The checkpoint is missing, truncated, corrupted, of another format version, or for another model."""


class SnapshotWriteError(CheckpointError):
    """A snapshot could not be written (disk full, quota exceeded, read-only file system, no permission): nothing
    was published, ``latest`` still names the previous snapshot, the temporary files are removed. The message names
    the checkpoint directory, the bytes needed and the bytes free."""


#: errno values that mean "the storage refused the write" (not a bug in the writer).
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG,
               errno.EMLINK, errno.ENAMETOOLONG)
#: A writer that fails with free space below this (MXNet reports a full disk as "FileStream.Write incomplete",
#: without an errno) is taken to have hit a full disk.
_LOW_SPACE = 1 << 20


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
    """Write a single file atomically (temp file + fsync + rename) with the user's umask, never world-writable.
    On failure the temp file is removed and the ``OSError`` names ``path``."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _secure(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(exc.errno, f"{exc.strerror or exc} (writing {len(data)} bytes)", str(path)) from exc
    _fsync_dir(path.parent)


def checkpoint_root(path: os.PathLike) -> Path:
    """The directory new snapshots go into when the user names ``path``.

    ``path`` itself, unless it is a published snapshot (it holds a real ``averaging-state.json``) or the ``latest``
    link: then its parent, so resuming from ``ckpt/epoch-000007`` writes ``ckpt/epoch-000008``, not
    ``ckpt/epoch-000007/epoch-000008``.
    """
    p = Path(path)
    if p.name == LATEST and p.is_symlink():
        return p.parent
    state = p / STATE_FILE
    if state.is_file() and not state.is_symlink():
        return p.parent
    return p


def check_writable(path: os.PathLike) -> Path:
    """Create the checkpoint root if needed and prove it is writable (a probe file); returns the root.

    Raises ``CheckpointError`` naming the directory, so a job fails at its start instead of at its first save.
    """
    root = checkpoint_root(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".tmp-probe-{os.getpid()}-{time.monotonic_ns()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"checkpoint_dir {str(root)!r} is not writable: {exc.strerror or exc}") from exc
    return root


def record_digest(record: Dict[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON (sorted keys, no spaces), without its ``record_sha256`` field."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_ledger(root: Path) -> List[Tuple[int, str]]:
    try:
        text = (root / LEDGER).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and len(parts[0]) <= 18 and SNAPSHOT_NAME.match(parts[1]):
            out.append((int(parts[0]), parts[1]))
    return out


def _reserve(root: Path, base: str) -> Tuple[str, int]:
    """Pick the next unused name for ``base`` and the next global seq; append them to the ledger (fsynced)."""
    ledger = _read_ledger(root)
    used = {n for _, n in ledger} | {p.name for p in root.iterdir()}
    seq = max([s for s, _ in ledger] + [_seq_of(root / n) for n in used if SNAPSHOT_NAME.match(n)] + [0]) + 1
    name = base
    if name in used:
        revs = [int(m.group("rev") or 0) for m in map(SNAPSHOT_NAME.match, used) if m and m.group("base") == base]
        name = f"{base}.{max(revs) + 1}"
    fd = os.open(root / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666 & ~_umask() & ~0o002)
    try:
        os.write(fd, f"{seq} {name}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return name, seq


def _peek_record(path: Path) -> Optional[Dict[str, Any]]:
    """A state record's JSON object if ``path`` holds one (no verification; never raises): for listing."""
    try:
        record = json.loads(_read_regular(path, MAX_RECORD_BYTES).decode("utf-8"))
    except (CheckpointError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _seq_of(snap: Path) -> int:
    seq = (_peek_record(snap / STATE_FILE) or {}).get("seq", 0)
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**62 else 0


def write_snapshot(
    checkpoint_dir: os.PathLike,
    name: str,
    state: Dict[str, Any],
    files: Dict[str, Callable[[Path], None]],
    keep: int = 2,
) -> Path:
    """Publish a new snapshot: ``state`` as JSON plus ``files`` (file name -> writer(path)).

    ``name`` (``<word>-<6+ digits>``, e.g. ``epoch-000007``) is used as is if never used in this directory, else
    suffixed ``.<k>`` (see the module doc); returns the published snapshot's path. Atomic and immutable: readers
    see the previous snapshot or this one, whole, and no published directory is ever rewritten.
    ``checkpoint_dir`` may be a snapshot path: the snapshot is then written next to it (``checkpoint_root``).
    """
    if not SNAPSHOT_NAME.match(name) or "." in name:
        raise ValueError(f"snapshot name must look like 'epoch-000007' (<word>-<6+ digits>), got {name!r}")
    root = checkpoint_root(checkpoint_dir)
    made: List[Path] = []  # the temporary directory while it exists; then the published snapshot's path
    try:
        return _write(root, name, state, files, keep, made)
    except Exception as exc:  # noqa: BLE001 -- classified below; anything else is re-raised as it was
        failure = _write_failure(root, name, exc, made)
        if failure is None:
            raise
        raise failure from exc


def _write(root: Path, name: str, state: Dict[str, Any], files: Dict[str, Callable[[Path], None]], keep: int,
           made: List[Path]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(root)
    final_name, seq = _reserve(root, name)
    names = (name, final_name)
    tmp = root / f".tmp-{final_name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    made.append(tmp)
    _secure(tmp, is_dir=True)
    _faults.snapshot_stage("tmp-created", names)
    digests: Dict[str, str] = {}
    for k, (fname, writer) in enumerate(files.items(), start=1):
        path = tmp / fname
        writer(path)
        _secure(path)
        _fsync_file(path)
        digests[fname] = sha256_file(path)
        _faults.snapshot_stage(f"file-{k}", names)
    record = dict(state, format=FORMAT, format_version=FORMAT_VERSION, files=digests, written_at=time.time(),
                  snapshot=final_name, seq=seq)
    record["record_sha256"] = record_digest(record)
    state_path = tmp / STATE_FILE
    with open(state_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _secure(state_path)
    _fsync_dir(tmp)
    _faults.snapshot_stage("state-written", names)
    final = root / final_name
    if os.path.lexists(final):  # another writer took the name since _reserve: never overwrite
        raise CheckpointError(f"snapshot {str(final)!r} appeared while writing it; is another job writing here?")
    os.rename(tmp, final)
    made[:] = [final]  # published: never removed by the failure path
    _fsync_dir(root)
    _faults.snapshot_stage("renamed", names)
    _switch_latest(root, final_name)
    _faults.snapshot_stage("latest-switched", names)
    for link in [STATE_FILE] + sorted(f for f in files if f.startswith("averaged.")):  # none left dangling
        target = f"{LATEST}/{link}"
        if not os.path.lexists(root / link):
            os.symlink(target, root / link)
    _prune(root, keep, names)
    return final


def _free_bytes(path: Path) -> int:
    for p in [path, *path.parents]:
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return int(st.f_bavail * st.f_frsize)
    return -1


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, fnames in os.walk(path):
        for f in fnames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _human(n: int, why: str = "") -> str:
    """``"401067 bytes (401.1 kB, why)"``."""
    notes = [f"{n / size:.1f} {unit}" for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if n >= size][:1]
    notes += [why] if why else []
    return f"{n} bytes" + (f" ({', '.join(notes)})" if notes else "")


def _write_failure(root: Path, name: str, exc: BaseException, made: List[Path]) -> Optional[SnapshotWriteError]:
    """Remove the unpublished temporary directory; if the storage refused the write, the one-line error to raise.

    A failure that is not the storage's (a bug in a writer) returns None: the caller re-raises it unchanged."""
    free_before = _free_bytes(root)
    published = [p for p in made if not p.name.startswith(".tmp-")]
    temporary = [p for p in made if p.name.startswith(".tmp-")]
    written = sum(_tree_bytes(p) for p in made)
    for p in temporary:
        shutil.rmtree(p, ignore_errors=True)
    code = exc.errno if isinstance(exc, OSError) else None
    if code not in DISK_ERRNOS and not (0 <= free_before < _LOW_SPACE and not isinstance(exc, CheckpointError)):
        return None
    free = _free_bytes(root)
    latest = _latest_target(root) if root.is_dir() else None
    previous = _tree_bytes(root / latest) if latest and (root / latest).is_dir() else 0
    if code is not None:
        cause = f"{os.strerror(code).lower()} ({errno.errorcode.get(code, code)})"
        if getattr(exc, "filename", None):
            cause += f" at {exc.filename}"
    else:
        last_line = ([ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__])[-1]
        cause = f"the disk is (nearly) full: {' '.join(last_line.split())[:200]}"
    if previous >= written:
        need = f"it needs about {_human(previous, 'the size of the previous snapshot')}" if previous else \
            "it needs a few bytes"
    else:
        need = f"it needs more than {_human(written, 'written before the failure')}"
    if published:
        outcome = (f"snapshot {published[0].name} is complete, but 'latest' could not be switched to it "
                   f"(it names {latest})")
    else:
        kept = f"'latest' still names {latest}" if latest else "no snapshot was published before"
        outcome = f"nothing was published, the temporary files were removed, {kept}"
    return SnapshotWriteError(
        f"cannot write snapshot {name} into checkpoint_dir {str(root)!r}: {cause}; {need}, {_human(max(free, 0))} "
        f"free; {outcome}")


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


def _latest_target(root: Path) -> Optional[str]:
    try:
        return Path(os.readlink(root / LATEST)).name
    except OSError:
        return None


def _latest_name(root: Path) -> Tuple[Optional[str], Optional[str]]:
    """(snapshot name ``latest`` names, problem): ``latest`` must name a snapshot directly inside ``root``."""
    try:
        text = os.readlink(root / LATEST)
    except OSError as exc:
        return None, f"{str(root / LATEST)!r} is not a link to a snapshot ({exc.strerror or exc})"
    if not SNAPSHOT_NAME.match(text):
        return None, (f"{str(root / LATEST)!r} points to {text[:200]!r}, which is not a snapshot inside the "
                      "checkpoint directory")
    return text, None


def list_snapshots(checkpoint_dir: os.PathLike) -> List[Path]:
    """iteravg's own snapshot directories in ``checkpoint_dir``, oldest first (by ``seq``, then name).

    Own = the name matches ``SNAPSHOT_NAME`` and the directory holds an iteravg state record or is in the ledger.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    ledger = {n: s for s, n in _read_ledger(root)}
    found = []
    for p in root.iterdir():
        if p.is_symlink() or not p.is_dir() or not SNAPSHOT_NAME.match(p.name):
            continue
        seq = _seq_of(p)
        if seq == 0 and not _is_iteravg_record(p / STATE_FILE) and p.name not in ledger:
            continue
        found.append((seq or ledger.get(p.name, 0), p.name, p))
    return [p for _, _, p in sorted(found)]


def _is_iteravg_record(path: Path) -> bool:
    record = _peek_record(path)
    return record is not None and record.get("format") == FORMAT


def _prune(root: Path, keep: int, current: Tuple[str, ...]) -> None:
    protected = set(current) | {_latest_target(root)}
    snaps = list_snapshots(root)
    excess = max(0, len(snaps) - max(keep, 1))
    for p in [p for p in snaps if p.name not in protected][:excess]:
        _remove(root, p, current)


def _remove(root: Path, snap: Path, current: Tuple[str, ...] = ()) -> None:
    """Rename a snapshot aside (``.tmp-prune-*``: never read, cleaned by the next writer), then delete it: a crash
    never leaves a half-deleted snapshot under a published name."""
    trash = root / f".tmp-prune-{snap.name}-{os.getpid()}-{time.monotonic_ns()}"
    os.rename(snap, trash)
    _fsync_dir(root)
    if _faults.pruning_fault():
        victims = sorted(trash.iterdir())
        if victims:
            victims[0].unlink()
        _faults.snapshot_stage("pruning", current)
    shutil.rmtree(trash, ignore_errors=True)


def remove_snapshots(checkpoint_dir: os.PathLike, keep_names: Any) -> List[str]:
    """Prune by name: remove every iteravg snapshot in ``checkpoint_dir`` whose name is not in ``keep_names``, except
    the one ``latest`` names (as pruning does, crash-safe). For stores whose owner knows exactly which snapshots it
    still needs (the post-hoc prefixes, ``core.posthoc``). Returns the removed names."""
    root = Path(checkpoint_dir)
    protected = set(keep_names) | {_latest_target(root)}
    removed = []
    for snap in list_snapshots(root):
        if snap.name not in protected:
            _remove(root, snap)
            removed.append(snap.name)
    return removed


# -- reading -------------------------------------------------------------------------------------
#: A state record larger than this is not one iteravg wrote (a layout of 100 000 tensors is about 10 MB).
MAX_RECORD_BYTES = 64 << 20
_HEX = frozenset("0123456789abcdef")


def _read_regular(path: Path, limit: Optional[int] = None) -> bytes:
    """The bytes of a regular file, never through a symbolic link (a snapshot holds none), at most ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        why = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be read: {exc.strerror or exc}"
        raise CheckpointError(f"{path} {why}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path} is not a regular file")
        if limit is not None and st.st_size > limit:
            raise CheckpointError(f"{path} is {st.st_size} bytes, more than the {limit} a state record may have")
        with os.fdopen(os.dup(fd), "rb") as f:  # never ask for more than the file holds (+1 to see it grow):
            data = f.read() if limit is None else f.read(min(limit, st.st_size) + 1)  # read(n) allocates n
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if limit is not None and len(data) > limit:
        raise CheckpointError(f"{path} is larger than the {limit} bytes a state record may have")
    return data


def check_file_name(name: object, where: str) -> str:
    """A file name a record may list: a plain name inside its snapshot (no path, no ``..``, not hidden)."""
    if (not isinstance(name, str) or not name or len(name) > 255 or name in (".", "..") or name.startswith(".")
            or any(c in name for c in "/\\\0")):
        raise CheckpointError(f"{where} lists the file {str(name)[:100]!r}, which is not a plain name inside its "
                              "snapshot")
    return name


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def loads_unique_keys(text: str) -> Any:
    """``json.loads`` that refuses a repeated key (``ValueError``): Python would keep the last one silently, while
    another reader of the same untrusted file may keep the first, so the two would disagree on what it says."""
    return json.loads(text, object_pairs_hook=_no_duplicates)


def parse_record(data: bytes, where: str) -> Dict[str, Any]:
    """A snapshot's state record from its bytes, checked: JSON object, format and version, record checksum, and the
    ``files`` table (plain names -> SHA-256 hex digests). Anything else is a ``CheckpointError``."""
    try:
        state = loads_unique_keys(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError, JSONDecodeError, too many digits
        raise CheckpointError(f"{where} is not valid JSON (truncated or corrupted?): "
                              f"{' '.join(str(exc).split())[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not an iteravg averaging state")
    version = state.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{where} has format version {str(version)[:40]!r}; this iteravg reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if "record_sha256" in state:
        try:
            digest = record_digest(state)
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{where} cannot be checked: {' '.join(str(exc).split())[:200]}") from None
        if state["record_sha256"] != digest:
            raise CheckpointError(f"{where} is corrupted: its record_sha256 does not match its content")
    else:
        logger.warning("iteravg: %s has no record_sha256 (written by an older iteravg); its files are still "
                       "SHA-256 verified", where)
    files = state.get("files", {})
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: 'files' must map file names to SHA-256 digests")
    for fname, digest in files.items():
        check_file_name(fname, where)
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
            raise CheckpointError(f"{where}: the SHA-256 of {fname!r} is not 64 hex digits")
    return state


def _load_record(snap: Path, verify: bool) -> Dict[str, Any]:
    """The snapshot's validated state record; with ``verify`` every file's SHA-256 is checked too."""
    path = snap / STATE_FILE
    state = parse_record(_read_regular(path, MAX_RECORD_BYTES), str(path))
    if verify:
        for fname, digest in state.get("files", {}).items():
            fpath = snap / fname
            if not os.path.lexists(fpath):
                raise CheckpointError(f"checkpoint file {fpath} is missing")
            actual = hashlib.sha256(_read_regular(fpath)).hexdigest()
            if actual != digest:
                raise CheckpointError(f"checkpoint file {fpath} is corrupted (SHA-256 {actual[:12]}..., "
                                      f"state file says {digest[:12]}...)")
    return state


def read_verified(snap: os.PathLike, record: Dict[str, Any], name: str) -> bytes:
    """The bytes of file ``name`` of snapshot ``snap`` -- only if its record lists it, and only once they match the
    recorded SHA-256 (checked on the very bytes returned). ``CheckpointError`` otherwise."""
    files = record.get("files", {})
    if not isinstance(files, dict) or name not in files:
        raise CheckpointError(f"{snap} holds no {name} that its state record lists")
    path = Path(snap) / check_file_name(name, str(snap))
    data = _read_regular(path)
    if hashlib.sha256(data).hexdigest() != files[name]:
        raise CheckpointError(f"checkpoint file {path} is corrupted (its SHA-256 does not match the state record)")
    return data


def _select(checkpoint_dir: os.PathLike, verify: bool) -> Tuple[Path, Dict[str, Any]]:
    root = Path(checkpoint_dir)
    explicit = root / STATE_FILE
    if explicit.is_file() and not explicit.is_symlink():  # a snapshot directory named explicitly
        return root, _load_record(root, verify)
    if not root.exists():
        raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist")
    failure: Optional[str] = None
    tried: Optional[str] = None
    if os.path.lexists(root / LATEST):
        try:
            tried, problem = _latest_name(root)
            if problem:
                raise CheckpointError(problem)
            assert tried is not None
            target = root / tried
            if target.is_symlink() or not target.is_dir():
                raise CheckpointError(f"{str(root / LATEST)!r} names {tried!r}, which does not exist")
            return target.resolve(), _load_record(target, verify)
        except CheckpointError as exc:
            failure = str(exc)
    for snap in reversed(list_snapshots(root)):
        if snap.name == tried:
            continue
        try:
            record = _load_record(snap, verify)
        except CheckpointError:
            continue
        why = f"{LATEST!r} is unusable ({failure})" if failure else f"there is no {LATEST!r} link"
        logger.warning("iteravg: %s; using %s, the newest snapshot that verifies", why, snap)
        return snap, record
    if failure:
        raise CheckpointError(f"{failure}; and no other snapshot in {str(root)!r} verifies")
    raise CheckpointError(f"{str(root)!r} holds no published checkpoint (no {LATEST!r} link and no {STATE_FILE})")


def resolve_snapshot(checkpoint_dir: os.PathLike, *, verify: bool = False) -> Path:
    """The snapshot to read: ``latest``'s target if its record is valid, else the newest snapshot that is (with a
    warning), or the directory itself if it is a snapshot. With ``verify`` every file's SHA-256 counts too."""
    return _select(checkpoint_dir, verify)[0]


def read_snapshot(checkpoint_dir: os.PathLike, verify: bool = True) -> Tuple[Path, Dict[str, Any]]:
    """Read and validate the snapshot ``resolve_snapshot`` picks (with ``verify``, also every file's SHA-256;
    ``latest`` failing that check falls back to the newest snapshot that passes it, with a warning)."""
    return _select(checkpoint_dir, verify)


def latest_epoch(checkpoint_dir: os.PathLike) -> Optional[int]:
    try:
        return int(read_snapshot(checkpoint_dir, verify=False)[1].get("epoch"))
    except (CheckpointError, TypeError, ValueError, OverflowError):
        return None
