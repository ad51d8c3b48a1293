"""Tensors on disk in the safetensors format, with numpy only (no pickle, no extra dependency).

Why safetensors: it is the no-pickle tensor format the rest of the ecosystem reads (PyTorch, JAX, Hugging Face
``safetensors.numpy.load_file``), so an averaged model written by iteravg is usable outside MXNet. The format is
small enough to implement here: an 8-byte little-endian header length, a JSON header mapping each name to its
dtype, shape and byte range, then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, Mapping, Optional

import numpy as np

__all__ = ["save_tensors", "load_tensors", "TensorFileError"]

_TO_ST = {"float16": "F16", "float32": "F32", "float64": "F64", "int32": "I32", "int64": "I64", "uint8": "U8"}
_FROM_ST = {v: k for k, v in _TO_ST.items()}
#: A header larger than this is not a tensor file we wrote (guards against reading garbage lengths).
_MAX_HEADER = 100 << 20


class TensorFileError(ValueError):
    """The file is not a readable safetensors file."""


def save_tensors(path: os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` (name -> array) to ``path``. The caller makes it atomic (iteravg writes into a temp dir)."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        a = np.asarray(arr)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt.name not in _TO_ST:
            raise TensorFileError(f"tensor {name!r} has dtype {a.dtype}, which iteravg does not store")
        a = np.require(a, dtype=dt, requirements="C")  # keeps 0-d scalars 0-d (ascontiguousarray would not)
        header[name] = {"dtype": _TO_ST[dt.name], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(memoryview(a.reshape(-1).view(np.uint8)))


def load_tensors(path: os.PathLike) -> Dict[str, np.ndarray]:
    """Read a safetensors file into name -> numpy array (copies, in the file's order)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TensorFileError(f"cannot read {path}: {exc}") from exc
    if len(data) < 8:
        raise TensorFileError(f"{path} is truncated (no header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise TensorFileError(f"{path} is truncated or not a safetensors file (header length {n})")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"{path} has a corrupted header: {exc}") from exc
    body = memoryview(data)[8 + n :]
    out: Dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_FROM_ST[info["dtype"]]).newbyteorder("<")
            start, stop = (int(v) for v in info["data_offsets"])
            shape = tuple(int(v) for v in info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TensorFileError(f"{path}: bad header entry for {name!r}: {exc}") from exc
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not 0 <= start <= stop <= len(body) or stop - start != count * dtype.itemsize:
            raise TensorFileError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
        out[name] = np.frombuffer(body[start:stop], dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)
    return out
