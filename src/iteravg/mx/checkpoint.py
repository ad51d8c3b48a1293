"""MXNet file I/O around the engine's snapshots: ``averaged.params`` (what ``net.load_parameters`` reads) next to
the engine's ``averaged.safetensors``, and the one-call save / load of a strategy.

See ``iteravg.checkpoint`` for the directory layout and atomicity, ``iteravg.core.engine`` for what a snapshot
records and how every rank loads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import mxnet as mx
import numpy as np
from mxnet import gluon

from ..checkpoint import PARAMS_FILE, CheckpointError, read_verified
from ..core.engine import fingerprint_hex
from .strategies import IterationAveragingStrategy

__all__ = ["save_checkpoint", "load_checkpoint", "params_writer", "read_params_file", "fingerprint_hex", "PARAMS_FILE"]

Writer = Callable[[Path], None]


def params_writer(tensors: Mapping[str, np.ndarray]) -> Writer:
    """A writer of ``tensors`` (structural names) in MXNet's parameter format, for ``net.load_parameters``."""
    return lambda path: mx.nd.save(str(path), {k: mx.nd.array(v, dtype=v.dtype) for k, v in tensors.items()})


def read_params_file(path: Path) -> Dict[str, np.ndarray]:
    """name -> numpy array from an MXNet parameter file, with a clear error if it is not one."""
    try:
        loaded = mx.nd.load(str(path))
    except mx.base.MXNetError as exc:
        raise CheckpointError(f"{path} is not a readable MXNet parameter file: {str(exc).splitlines()[0]}") from exc
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a list of arrays, expected named parameters")
    return {k: v.asnumpy() for k, v in loaded.items()}


def legacy_reader(snap: Path, record: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Snapshots of iteravg 0.1 hold only ``averaged.params`` (structural names): the engine reads it with this --
    only if the record lists it, from the very bytes whose SHA-256 was checked."""
    data = read_verified(snap, record, PARAMS_FILE)
    try:
        loaded = mx.nd.load_frombuffer(data)
    except mx.base.MXNetError as exc:
        raise CheckpointError(f"{snap / PARAMS_FILE} is not a readable MXNet parameter file: "
                              f"{str(exc).splitlines()[0]}") from exc
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{snap / PARAMS_FILE} holds a list of arrays, expected named parameters")
    return {k: v.asnumpy() for k, v in loaded.items()}


def save_checkpoint(
    strategy: IterationAveragingStrategy,
    checkpoint_dir: os.PathLike,
    epoch: int,
    stage: str = "epoch_end",
    extra_files: Optional[Dict[str, Writer]] = None,
    extra_state: Optional[Dict[str, Any]] = None,
    keep: int = 2,
) -> Optional[Path]:
    """Sync and write a snapshot of ``strategy`` (collective: call on every rank; rank 0 writes, a failure is
    raised on every rank). Returns the snapshot path on rank 0."""
    files = dict(extra_files or {})
    strategy.sync_average()  # first: a gathered (sharded) average must be the synced one
    averaged = strategy.averager.averaged()  # collective when sharded: every rank calls save_checkpoint
    if averaged is not None:
        files[PARAMS_FILE] = params_writer(averaged)
    partitioned = strategy.averager.state is not None and strategy.averager.state.partitioned
    return strategy.averager.save(checkpoint_dir, epoch=epoch, stage=stage, extra_files=files,
                                  extra_state=extra_state, keep=keep, averaged=averaged if partitioned else None)


def load_checkpoint(strategy: IterationAveragingStrategy, net: gluon.Block, checkpoint_dir: os.PathLike) -> Dict[str, Any]:
    """Restore averaged model and strategy progress on every rank (collective; any number of ranks).

    Raises ``CheckpointError`` (a ``ValueError``) on every rank if the checkpoint is missing, corrupted, of another
    format version or strategy kind, or for another model. Returns the snapshot's state record.
    """
    return strategy.averager.load(checkpoint_dir, strategy.bind(net), legacy_reader=legacy_reader)
