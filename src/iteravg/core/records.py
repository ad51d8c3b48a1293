"""Snapshot records of the engine: how its state is written, read back (also from iteravg 0.1's format) and
verified without any framework (``describe_snapshot``, behind ``iteravg inspect``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .. import checkpoint
from .averaged import Layout, TensorSpec
from .tensorfile import TensorFileError, load_tensors

__all__ = ["AVERAGED_FILE", "LegacyReader", "fingerprint_hex", "averager_record", "flatten_tensors", "unflatten_groups",
           "first_layout_difference", "describe_snapshot"]

#: The averaged model in every snapshot, by layout name, in the safetensors format.
AVERAGED_FILE = "averaged.safetensors"
#: A reader for snapshots older than ``AVERAGED_FILE``: (snapshot dir, state record) -> layout name -> array.
LegacyReader = Callable[[Path, Dict[str, Any]], Dict[str, np.ndarray]]


def fingerprint_hex(fp: np.ndarray) -> str:
    return "".join(format(int(v) & (2**64 - 1), "016x") for v in fp)


def averager_record(record: Dict[str, Any]) -> Dict[str, Any]:
    """The averager's part of a snapshot record; snapshots of iteravg 0.1 (format 1) kept it flat."""
    if "averager" in record:
        return record["averager"]
    structural = record.get("structural_names", {})
    layout = record.get("layout")
    if layout is not None:
        layout = [[structural.get(n, n), shape, dt] for n, shape, dt in layout]
    return {"schedule": record.get("strategy", {}), "refused_nonfinite": record.get("strategy", {}).get(
        "refused_nonfinite", 0), "has_average": record.get("has_average", False), "layout": layout,
        "fingerprint": None, "epochs_done": record.get("epoch", 0)}


def flatten_tensors(layout: Layout, tensors: Mapping[str, np.ndarray], where: str) -> List[np.ndarray]:
    """Named tensors -> flat per-dtype arrays in ``layout``'s order, checking names, shapes and dtypes."""
    missing = [s.name for s in layout.specs if s.name not in tensors]
    extra = sorted(set(tensors) - set(layout.names))
    if missing or extra:
        raise checkpoint.CheckpointError(f"{where} is for another model: missing {missing[:3]}, unexpected {extra[:3]}")
    groups = [np.empty(n, dtype=dt) for dt, n in zip(layout.groups, layout.group_sizes)]
    for spec in layout.specs:
        arr = np.asarray(tensors[spec.name])
        if tuple(arr.shape) != spec.shape or arr.dtype.name != spec.dtype:
            raise checkpoint.CheckpointError(f"{where}: {spec.name!r} is {arr.dtype.name}{tuple(arr.shape)}, the "
                                             f"model has {spec.dtype}{spec.shape}")
        g, start = layout.offsets[spec.name]
        groups[g][start : start + spec.size] = arr.reshape(-1)
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
    state = averager_record(record)
    sched = state.get("schedule", {})
    layout_desc = state.get("layout") or []
    summary: Dict[str, Any] = {
        "snapshot": str(snap), "epoch": record.get("epoch"), "stage": record.get("stage"),
        "world_size": record.get("world_size"), "comm": record.get("comm"),
        "format_version": record.get("format_version"), "strategy": sched.get("kind"),
        "averaging_started": sched.get("averaging_started"), "trigger_epoch": sched.get("trigger_epoch"),
        "average_counter": sched.get("average_counter"), "fingerprint": state.get("fingerprint"),
        "files": sorted(record.get("files", {})), "tensors": len(layout_desc),
        "parameters": int(sum(int(np.prod(s[1], dtype=np.int64)) for s in layout_desc)),
        "parameter_bytes": int(sum(int(np.prod(s[1], dtype=np.int64)) * np.dtype(s[2]).itemsize for s in layout_desc)),
    }
    problems: List[str] = []
    latest = Path(checkpoint_dir) / checkpoint.LATEST
    if os.path.lexists(latest) and (not latest.exists() or latest.resolve() != snap.resolve()):
        problems.append(f"{latest} ({os.readlink(latest)}) is missing or corrupted; the newest snapshot that "
                        f"verifies is {snap.name} (a resume would use it)")
    if state.get("has_average"):
        try:
            layout = Layout(tuple(TensorSpec(n, tuple(shape), dt) for n, shape, dt in layout_desc))
            if (snap / AVERAGED_FILE).is_file():
                tensors = load_tensors(snap / AVERAGED_FILE)
            elif legacy_reader is not None:
                tensors = legacy_reader(snap, record)
            else:
                raise checkpoint.CheckpointError(f"{snap} holds no {AVERAGED_FILE}")
            for name in state.get("carried", ()):  # non-averaged entries written for strict loads
                tensors.pop(name, None)
            actual = fingerprint_hex(fingerprint(flatten_tensors(layout, tensors, str(snap))))
            if state.get("fingerprint") and actual != state["fingerprint"]:
                problems.append(f"the averaged model's fingerprint {actual} != recorded {state['fingerprint']}")
        except (checkpoint.CheckpointError, TensorFileError, ValueError) as exc:
            problems.append(str(exc))
    if state.get("posthoc"):  # posthoc=True: the starts it names, and that their prefix snapshots verify
        from .posthoc import describe  # noqa: WPS433 -- posthoc builds on this module

        more, trouble = describe(snap, state)
        summary.update(more)
        problems.extend(trouble)
    return summary, problems
