"""Tensors on disk in the safetensors format, with numpy only (no pickle, no extra dependency).

Why safetensors: it is the no-pickle tensor format the rest of the ecosystem reads (PyTorch, JAX, Hugging Face
``safetensors.numpy.load_file``), so an averaged model written by iteravg is usable outside MXNet. The format is
small enough to implement here: an 8-byte little-endian header length, a JSON header mapping each name to its
dtype, shape and byte range, then the raw little-endian bytes.

Reading trusts nothing in the file (it may be damaged, or written to harm): the header must be one JSON object with
no duplicate names; every entry exactly ``dtype`` (one iteravg stores), ``shape`` (non-negative integers) and
``data_offsets`` (integers inside the data); the byte ranges must tile the data exactly -- no overlap, no hole, no
trailing bytes, as the safetensors specification requires; every size is computed with exact integers (no int64
wrap-around). Anything else is a ``TensorFileError`` (a ``CheckpointError``) with a one-line message. Nothing is
allocated beyond the file's own size.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ..checkpoint import CheckpointError, loads_unique_keys

__all__ = ["save_tensors", "load_tensors", "parse_tensors", "TensorFileError", "MAX_HEADER", "MAX_DIMS"]

_TO_ST = {"float16": "F16", "float32": "F32", "float64": "F64", "int32": "I32", "int64": "I64", "uint8": "U8"}
_FROM_ST = {v: k for k, v in _TO_ST.items()}
#: A header larger than this is not a tensor file we wrote (guards against reading garbage lengths).
MAX_HEADER = 100 << 20
MAX_DIMS = 64
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


class TensorFileError(CheckpointError):
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
        raise TensorFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return parse_tensors(data, str(path))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(text: object) -> str:
    return repr(text)[:80]


def parse_tensors(data: bytes, where: str = "tensor file") -> Dict[str, np.ndarray]:
    """name -> numpy array (copies) from the bytes of a safetensors file; ``TensorFileError`` if they are not one."""
    if len(data) < 8:
        raise TensorFileError(f"{where} is truncated (no header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER, len(data) - 8):
        raise TensorFileError(f"{where} is truncated or not a safetensors file (header length {n})")
    try:
        text = bytes(data[8 : 8 + n]).decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("the header is not a JSON object")
        header = loads_unique_keys(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TensorFileError(f"{where} has a corrupted header: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{where} has a corrupted header: not a JSON object")
    body = memoryview(data)[8 + n :]
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise TensorFileError(f"{where}: __metadata__ must map names to strings")
            continue
        entries.append(_entry(name, info, len(body), where))
    position = 0
    for start, stop, name, _dtype, _shape in sorted(entries, key=lambda e: (e[0], e[1])):
        if start != position:
            what = "overlaps another tensor's bytes" if start < position else "leaves a gap before it"
            raise TensorFileError(f"{where}: tensor {_short(name)} {what} (its data starts at {start}, not {position})")
        position = stop
    if position != len(body):
        raise TensorFileError(f"{where}: {len(body) - position} bytes after the last tensor belong to no tensor")
    out: Dict[str, np.ndarray] = {}
    for start, stop, name, dtype, shape in entries:
        raw = np.frombuffer(body[start:stop], dtype=dtype)
        out[name] = raw.astype(dtype.newbyteorder("="), copy=True).reshape(shape)
    return out


def _entry(name: str, info: Any, size: int, where: str) -> Tuple[int, int, str, np.dtype, Tuple[int, ...]]:
    """(start, stop, name, dtype, shape) of one header entry, every field checked."""
    if not isinstance(info, dict) or set(info) != _ENTRY_KEYS:
        raise TensorFileError(f"{where}: bad header entry for {_short(name)}: needs exactly dtype, shape and "
                              "data_offsets")
    st_dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(st_dtype, str) or st_dtype not in _FROM_ST:
        raise TensorFileError(f"{where}: tensor {_short(name)} has dtype {_short(st_dtype)}; iteravg reads "
                              f"{', '.join(sorted(_FROM_ST))}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise TensorFileError(f"{where}: tensor {_short(name)} has shape {_short(shape)}; a shape is a list of at "
                              f"most {MAX_DIMS} integers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(v) for v in offsets):
        raise TensorFileError(f"{where}: tensor {_short(name)} has data_offsets {_short(offsets)}; expected "
                              "[start, stop]")
    start, stop = offsets
    if not 0 <= start <= stop <= size:
        raise TensorFileError(f"{where}: tensor {_short(name)} lies outside the file (truncated?)")
    dtype = np.dtype(_FROM_ST[st_dtype]).newbyteorder("<")
    count = 1
    for d in shape:  # exact integers: [2**62, 4] must not wrap around to 0
        count *= d
    if count * dtype.itemsize != stop - start:
        raise TensorFileError(f"{where}: tensor {_short(name)} of shape {_short(shape)} ({st_dtype}) needs "
                              f"{count * dtype.itemsize} bytes, its data_offsets give {stop - start}")
    return start, stop, name, dtype, tuple(shape)
