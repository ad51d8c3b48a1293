"""Snapshot records of the engine: how its state is written, read back (also from iteravg 0.1's format) and
verified without any framework (``describe_snapshot``, behind ``iteravg inspect``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .. import checkpoint
from .averaged import Layout, TensorSpec
from .tensorfile import parse_tensors

__all__ = ["AVERAGED_FILE", "LegacyReader", "fingerprint_hex", "averager_record", "check_averager_record",
           "flatten_tensors", "unflatten_groups", "first_layout_difference", "describe_snapshot", "read_averaged"]

#: The averaged model in every snapshot, by layout name, in the safetensors format.
AVERAGED_FILE = "averaged.safetensors"
#: A reader for snapshots older than ``AVERAGED_FILE``: (snapshot dir, state record) -> layout name -> array.
LegacyReader = Callable[[Path, Dict[str, Any]], Dict[str, np.ndarray]]


def fingerprint_hex(fp: np.ndarray) -> str:
    return "".join(format(int(v) & (2**64 - 1), "016x") for v in fp)


def averager_record(record: Dict[str, Any], where: str = "the state record") -> Dict[str, Any]:
    """The averager's part of a snapshot record (snapshots of iteravg 0.1, format 1, kept it flat), checked field by
    field (``check_averager_record``): a record from disk is untrusted, and a ``CheckpointError`` is the only way it
    can fail."""
    if "averager" in record:
        return check_averager_record(record["averager"], where)
    try:
        structural = record.get("structural_names") or {}
        strategy = record.get("strategy") or {}
        layout = record.get("layout")
        if layout is not None:
            layout = [[structural.get(n, n) if isinstance(n, str) else n, shape, dt] for n, shape, dt in layout]
        state = {"schedule": strategy, "refused_nonfinite": strategy.get("refused_nonfinite", 0),
                 "has_average": record.get("has_average", False), "layout": layout, "fingerprint": None,
                 "epochs_done": record.get("epoch", 0)}
    except (AttributeError, TypeError, ValueError) as exc:
        raise checkpoint.CheckpointError(f"{where} (format 1) is malformed: {' '.join(str(exc).split())[:200]}") \
            from None
    return check_averager_record(state, where)


def _dtype_ok(name: Any) -> bool:
    """A numeric numpy dtype, by its canonical name (as ``Layout.describe`` writes it)."""
    try:
        return isinstance(name, str) and len(name) <= 16 and np.dtype(name).name == name \
            and np.dtype(name).kind in "fiub"
    except TypeError:
        return False


#: A tensor larger than this many elements is not one a snapshot holds (guards sizes computed from the record).
MAX_ELEMENTS = 1 << 48
_SCHEDULE_INTS = ("average_counter", "steps_seen", "step_count", "n", "n_steps", "epochs")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_averager_record(state: Any, where: str = "the state record") -> Dict[str, Any]:
    """``state`` if it is a well-formed averager record, else ``CheckpointError`` naming the first bad field."""
    def bad(what: str) -> checkpoint.CheckpointError:
        return checkpoint.CheckpointError(f"{where}: {what}")

    if not isinstance(state, dict):
        raise bad("the averager's state is not a JSON object")
    schedule = state.get("schedule")
    if not isinstance(schedule, dict) or not isinstance(schedule.get("kind"), str):
        raise bad("'schedule' must be an object with a 'kind'")
    for key in _SCHEDULE_INTS:
        if key in schedule and not (_is_int(schedule[key]) and 0 <= schedule[key] < 2**62):
            raise bad(f"schedule {key!r} must be an integer >= 0, got {str(schedule[key])[:40]}")
    for key in ("averaging_started",):
        if key in schedule and not isinstance(schedule[key], bool):
            raise bad(f"schedule {key!r} must be true or false")
    te = schedule.get("trigger_epoch")
    if te is not None and not (_is_int(te) and abs(te) < 2**62):
        raise bad("schedule 'trigger_epoch' must be an integer or null")
    logs = schedule.get("val_logs", [])
    if not isinstance(logs, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in logs):
        raise bad("schedule 'val_logs' must be a list of numbers")
    for key in ("refused_nonfinite", "epochs_done"):
        if key in state and not (_is_int(state[key]) and 0 <= state[key] < 2**62):
            raise bad(f"{key!r} must be an integer >= 0")
    if not isinstance(state.get("has_average", False), bool):
        raise bad("'has_average' must be true or false")
    fp = state.get("fingerprint")
    if fp is not None and not (isinstance(fp, str) and len(fp) == 32 and all(c in "0123456789abcdef" for c in fp)):
        raise bad("'fingerprint' must be 32 hex digits or null")
    layout = state.get("layout")
    if layout is not None:
        if not isinstance(layout, list):
            raise bad("'layout' must be a list of [name, shape, dtype]")
        names = set()
        for entry in layout:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], list) and all(_is_int(d) and d >= 0 for d in entry[1])
                    and len(entry[1]) <= 64 and _dtype_ok(entry[2])):
                raise bad(f"layout entry {str(entry)[:80]} is not [name, shape, dtype]")
            if entry[0] in names:
                raise bad(f"layout names {entry[0][:80]!r} twice")
            names.add(entry[0])
            if math.prod(entry[1]) > MAX_ELEMENTS:
                raise bad(f"layout entry {entry[0][:80]!r} has an implausible shape {str(entry[1])[:80]}")
    if state.get("has_average") and layout is None:
        raise bad("'has_average' without a 'layout'")
    return state


def flatten_tensors(layout: Layout, tensors: Mapping[str, np.ndarray], where: str) -> List[np.ndarray]:
    """Named tensors -> flat per-dtype arrays in ``layout``'s order, checking names, shapes and dtypes."""
    missing = [s.name for s in layout.specs if s.name not in tensors]
    extra = sorted(set(tensors) - set(layout.names))
    if missing or extra:
        raise checkpoint.CheckpointError(f"{where} is for another model: missing {missing[:3]}, unexpected {extra[:3]}")
    for spec in layout.specs:  # every shape checked before anything is allocated from the layout's sizes
        arr = np.asarray(tensors[spec.name])
        if tuple(arr.shape) != spec.shape or arr.dtype.name != spec.dtype:
            raise checkpoint.CheckpointError(f"{where}: {spec.name!r} is {arr.dtype.name}{tuple(arr.shape)}, the "
                                             f"model has {spec.dtype}{spec.shape}")
    groups = [np.empty(n, dtype=dt) for dt, n in zip(layout.groups, layout.group_sizes)]
    for spec in layout.specs:
        g, start = layout.offsets[spec.name]
        groups[g][start : start + spec.size] = np.asarray(tensors[spec.name]).reshape(-1)
    return groups


def unflatten_groups(layout: Layout, groups: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
    """Flat per-dtype arrays in ``layout``'s order -> name -> array (views into ``groups``)."""
    out = {}
    for spec in layout.specs:
        g, start = layout.offsets[spec.name]
        out[spec.name] = groups[g][start:start + spec.size].reshape(spec.shape)
    return out


def first_layout_difference(a: list, b: list) -> str:
    for x, y in zip(a, b):
        if list(x) != list(y):
            return f"checkpoint has {x[0]!r} {tuple(x[1])} {x[2]}, the model has {y[0]!r} {tuple(y[1])} {y[2]}"
    return f"checkpoint has {len(a)} tensors, the model has {len(b)}"


def describe_snapshot(checkpoint_dir: os.PathLike,
                      legacy_reader: Optional[LegacyReader] = None) -> Tuple[Dict[str, Any], List[str]]:
    """(summary, problems) of the snapshot a directory names: every file's SHA-256 is verified (a mismatch raises
    ``CheckpointError``), then the averaged model is read and checked against the recorded fingerprint.
    ``iteravg inspect`` prints this; no model or framework is needed."""
    from .averaged import fingerprint  # noqa: WPS433

    snap, record = checkpoint.read_snapshot(checkpoint_dir)
    state = averager_record(record, str(snap))
    sched = state.get("schedule", {})
    layout_desc = state.get("layout") or []
    summary: Dict[str, Any] = {
        "snapshot": str(snap), "epoch": record.get("epoch"), "stage": record.get("stage"),
        "world_size": record.get("world_size"), "comm": record.get("comm"),
        "format_version": record.get("format_version"), "strategy": sched.get("kind"),
        "averaging_started": sched.get("averaging_started"), "trigger_epoch": sched.get("trigger_epoch"),
        "average_counter": sched.get("average_counter"), "fingerprint": state.get("fingerprint"),
        "files": sorted(record.get("files", {})), "tensors": len(layout_desc),
        "parameters": sum(math.prod(s[1]) for s in layout_desc),
        "parameter_bytes": sum(math.prod(s[1]) * _itemsize(s[2]) for s in layout_desc),
    }
    problems: List[str] = []
    latest = Path(checkpoint_dir) / checkpoint.LATEST
    if os.path.lexists(latest) and (not latest.exists() or latest.resolve() != snap.resolve()):
        problems.append(f"{latest} ({os.readlink(latest)[:200]!r}) is missing, corrupted or points outside the "
                        f"checkpoint directory; the newest snapshot that verifies is {snap.name} (a resume would "
                        "use it)")
    if state.get("has_average"):
        try:
            tensors = read_averaged(snap, record, legacy_reader)
            layout = Layout(tuple(TensorSpec(n, tuple(shape), dt) for n, shape, dt in layout_desc))
            tensors = read_averaged(snap, record, legacy_reader)
            for name in state.get("carried", ()):  # non-averaged entries written for strict loads
                tensors.pop(name, None)
            actual = fingerprint_hex(fingerprint(flatten_tensors(layout, tensors, str(snap))))
            if state.get("fingerprint") and actual != state["fingerprint"]:
                problems.append(f"the averaged model's fingerprint {actual} != recorded {state['fingerprint']}")
        except (checkpoint.CheckpointError, ValueError) as exc:
            problems.append(" ".join(str(exc).split()))
    if state.get("posthoc"):  # posthoc=True: the starts it names, and that their prefix snapshots verify
        from .posthoc import describe  # noqa: WPS433 -- posthoc builds on this module

        more, trouble = describe(snap, state)
        summary.update(more)
        problems.extend(trouble)
    return summary, problems


def _itemsize(dtype: str) -> int:
    try:
        return int(np.dtype(dtype).itemsize)
    except TypeError:
        return 0


def read_averaged(snap: Path, record: Dict[str, Any], legacy_reader: Optional[LegacyReader] = None
                  ) -> Dict[str, np.ndarray]:
    """The averaged model of a snapshot, layout name -> array: ``averaged.safetensors`` if the record lists it (read
    once, its SHA-256 checked on those bytes), else a format-1 snapshot's file through ``legacy_reader``. Never a file
    the record does not list."""
    files = record.get("files", {})
    if AVERAGED_FILE in files:
        return parse_tensors(checkpoint.read_verified(snap, record, AVERAGED_FILE), str(snap / AVERAGED_FILE))
    if legacy_reader is not None and record.get("format_version") == 1:
        return legacy_reader(snap, record)
    raise checkpoint.CheckpointError(f"{snap} holds no {AVERAGED_FILE} that its state record lists")
