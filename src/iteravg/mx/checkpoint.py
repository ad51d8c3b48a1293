"""Save and restore a strategy's averaged model and state: rank 0 writes, rank 0 reads and broadcasts.

See ``iteravg.checkpoint`` for the directory layout and the atomicity guarantees.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import mxnet as mx
import numpy as np
from mxnet import gluon

from .. import __version__, collectives
from ..checkpoint import PARAMS_FILE, CheckpointError, read_snapshot, write_snapshot
from ..core.averaged import Layout, TensorSpec
from .strategies import IterationAveragingStrategy

__all__ = ["save_checkpoint", "load_checkpoint", "load_params_file", "fingerprint_hex"]

Writer = Callable[[Path], None]


def fingerprint_hex(fp: np.ndarray) -> str:
    return "".join(format(int(v) & (2**64 - 1), "016x") for v in fp)


def save_checkpoint(
    strategy: IterationAveragingStrategy,
    checkpoint_dir: os.PathLike,
    epoch: int,
    stage: str = "epoch_end",
    extra_files: Optional[Dict[str, Writer]] = None,
    extra_state: Optional[Dict[str, Any]] = None,
    keep: int = 2,
) -> Optional[Path]:
    """Call on every rank at the same point; rank 0 writes, the others return at once (no collective).

    The strategy must be synced (``sync_average``) first, so that rank 0's average is everybody's.
    """
    if strategy.comm.rank != 0:
        return None
    st = strategy.averaged_state
    binding = strategy.binding
    has_average = st is not None and strategy.average_counter > 0
    files: Dict[str, Writer] = dict(extra_files or {})
    state: Dict[str, Any] = {
        "epoch": int(epoch),
        "stage": stage,
        "world_size": strategy.comm.size,
        "comm": strategy.comm.name,
        "strategy": strategy.state_dict(),
        "has_average": has_average,
        "iteravg_version": __version__,
        "extra": dict(extra_state or {}),
    }
    if binding is not None:
        state["layout"] = binding.layout.describe()
        state["structural_names"] = binding.structural
    if has_average:
        assert st is not None and binding is not None
        state["fingerprint"] = fingerprint_hex(st.fingerprint())
        arrays = {binding.structural[k]: v for k, v in strategy.averaged_model.items()}  # zero-copy views
        files[PARAMS_FILE] = lambda path: mx.nd.save(str(path), arrays)
    return write_snapshot(checkpoint_dir, f"epoch-{int(epoch):06d}", state, files, keep=keep)


def load_params_file(path: Path, layout: Layout, structural: Dict[str, str]) -> list:
    """Read ``averaged.params`` into flat per-dtype arrays, checking it holds exactly ``layout``'s tensors."""
    try:
        loaded = mx.nd.load(str(path))
    except mx.base.MXNetError as exc:
        raise CheckpointError(f"{path} is not a readable MXNet parameter file: {str(exc).splitlines()[0]}") from exc
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a list of arrays, expected named parameters")
    groups = [np.empty(n, dtype=dt) for dt, n in zip(layout.groups, layout.group_sizes)]
    expected = {structural.get(s.name, s.name): s for s in layout.specs}
    if set(loaded) != set(expected):
        missing = sorted(set(expected) - set(loaded))[:3]
        extra = sorted(set(loaded) - set(expected))[:3]
        raise CheckpointError(f"{path} is for another model: missing {missing}, unexpected {extra}")
    for key, spec in expected.items():
        arr = loaded[key]
        if tuple(arr.shape) != spec.shape or np.dtype(arr.dtype).name != spec.dtype:
            raise CheckpointError(f"{path}: {key!r} is {np.dtype(arr.dtype).name}{tuple(arr.shape)}, the model has "
                                  f"{spec.dtype}{spec.shape}")
        g, start = layout.offsets[spec.name]
        groups[g][start : start + spec.size] = arr.asnumpy().reshape(-1)
    return groups


def load_checkpoint(strategy: IterationAveragingStrategy, net: gluon.Block, checkpoint_dir: os.PathLike) -> Dict[str, Any]:
    """Restore averaged model and strategy state on every rank (collective): rank 0 reads, then broadcasts.

    Works on any number of ranks. Raises ``CheckpointError`` (a ``ValueError``) on every rank if the
    checkpoint is missing, corrupted, of another format version or strategy, or for another model.
    Returns the checkpoint's state record (epoch, extra, ...).
    """
    comm = strategy.comm
    loaded: Dict[str, Any] = {}

    def read() -> Dict[str, Any]:
        snap, state = read_snapshot(checkpoint_dir)
        loaded["snap"] = snap
        return state

    state = collectives.run_on_root(comm, read, "reading the checkpoint")
    state = collectives.broadcast_json(comm, state)
    binding = strategy._bind(net, full_check=True)  # collective layout check on first bind
    if "layout" in state and state["layout"] != binding.layout.describe():
        raise CheckpointError(f"checkpoint {checkpoint_dir} is for another model: "
                              f"{_first_diff(state['layout'], binding.layout.describe())}")
    try:
        strategy.load_state_dict(state["strategy"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint_dir}: {exc}") from exc
    if state.get("has_average"):
        st = strategy.averaged_state
        assert st is not None

        def read_params() -> None:
            groups = load_params_file(loaded["snap"] / PARAMS_FILE, binding.layout, state.get("structural_names", {}))
            st.load_flat(groups)
            if fingerprint_hex(st.fingerprint()) != state.get("fingerprint"):
                raise CheckpointError(f"{loaded['snap'] / PARAMS_FILE} does not match the fingerprint in its state file")

        collectives.run_on_root(comm, read_params, "loading the averaged model")
        collectives.broadcast_average(comm, st)
    strategy._dirty = False
    return state


def _first_diff(a: list, b: list) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"checkpoint has {x[0]!r} {tuple(x[1])} {x[2]}, the model has {y[0]!r} {tuple(y[1])} {y[2]}"
    return f"checkpoint has {len(a)} tensors, the model has {len(b)}"
