"""ctypes loader for the optional C fold kernel (``_foldkernel.c``); ``None`` when it was not built.

Every function here gives the same bits with or without the kernel, so no decision (and no collective op) ever
depends on whether it compiled on a host.

``ITERAVG_NO_KERNEL=1`` forces the numpy fallback (used by tests to check both paths agree bitwise).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np

_SIGNATURE = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double]


def _load() -> Optional[Dict[str, ctypes._CFuncPtr]]:
    if os.environ.get("ITERAVG_NO_KERNEL", "0").strip() not in ("", "0"):
        return None
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_foldkernel{suffix}"
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                return None
            funcs = {}
            for dtype, sym in (("float32", "iteravg_fold_f32"), ("float64", "iteravg_fold_f64")):
                fn = getattr(lib, sym)
                fn.argtypes = _SIGNATURE
                fn.restype = ctypes.c_int64
                funcs[dtype] = fn
            try:  # a stale build without these symbols falls back to numpy (same bits)
                fp = lib.iteravg_fp_mix
                sf = lib.iteravg_scale_fp_mix_f32
                seg = lib.iteravg_segment_fp
                inplace = {"float32": lib.iteravg_fold_inplace_f32, "float64": lib.iteravg_fold_inplace_f64}
            except AttributeError:
                return None
            for dtype, fn in inplace.items():
                fn.argtypes = _SIGNATURE[:4] + [ctypes.c_double, ctypes.c_int64]
                fn.restype = ctypes.c_int64
                funcs[f"inplace_{dtype}"] = fn
            seg.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
            seg.restype = None
            funcs["segment_fp"] = seg
            fp.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p]
            fp.restype = None
            funcs["fingerprint"] = fp
            sf.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p]
            sf.restype = None
            funcs["scale_fingerprint_f32"] = sf
            return funcs
    return None


KERNELS = _load()


#: The fingerprint's constants (``_foldkernel.c``): position step and odd multiplier.
FP_G = np.uint64(0x9E3779B97F4A7C15)
FP_M = np.uint64(0xD6E8FEB86659FD93)
_CHUNK = 1 << 16


def scale_and_word_sums(buf: np.ndarray, scale: float) -> tuple:
    """``buf *= float32(scale)`` in place and ``word_sums`` of the result (the 8-byte words of the first
    ``len // 2 * 2`` floats): one C pass with the kernel, the same bits from numpy without it."""
    if buf.dtype != np.float32 or not buf.flags.c_contiguous:
        raise ValueError("scale_and_word_sums needs a contiguous float32 buffer")
    if KERNELS is not None:
        out = np.zeros(2, dtype=np.uint64)
        KERNELS["scale_fingerprint_f32"](buf.ctypes.data, buf.size, scale, out.ctypes.data)
        return out[0], out[1]
    np.multiply(buf, np.float32(scale), out=buf)
    n8 = buf.size // 2 * 2
    return word_sums(buf[:n8].view(np.uint64))


def word_sums(words: np.ndarray, start: int = 0) -> tuple:
    """(wrapping sum, xor) of the position-mixed words ``h_i = m ^ (m >> 32)``, ``m = (w_i ^ (i * G)) * M``,
    positions counted from ``start``: one C pass if the kernel is built, else chunked numpy with the same bits."""
    if KERNELS is not None and words.flags.c_contiguous:
        out = np.zeros(2, dtype=np.uint64)
        KERNELS["fingerprint"](words.ctypes.data, words.size, start, out.ctypes.data)
        return out[0], out[1]
    total, xor = np.uint64(0), np.uint64(0)
    with np.errstate(over="ignore"):
        for lo in range(0, words.size, _CHUNK):
            w = words[lo:lo + _CHUNK]
            h = np.arange(start + lo, start + lo + w.size, dtype=np.uint64)
            np.multiply(h, FP_G, out=h)
            np.bitwise_xor(h, w, out=h)
            np.multiply(h, FP_M, out=h)
            np.bitwise_xor(h, h >> np.uint64(32), out=h)
            total = np.uint64(total + np.add.reduce(h, dtype=np.uint64))
            xor = np.uint64(xor ^ np.bitwise_xor.reduce(h))
    return total, xor


def pointer_table(arrays: list) -> tuple:
    """(count, pointer array, sizes array) for the kernel; keep the returned arrays alive while used."""
    ptrs = np.array([a.ctypes.data for a in arrays], dtype=np.uintp)
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    return len(arrays), ptrs, sizes


def segment_fingerprints(buf: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per-segment 128-bit fingerprints of a contiguous 1-D float buffer (``_foldkernel.c``'s
    ``iteravg_segment_fp``): ``(k, 2)`` uint64 for the ``k`` segments ``bounds[j]:bounds[j+1]``. One C pass with the
    kernel; chunked numpy with the same bits without it."""
    bounds = np.ascontiguousarray(bounds, dtype=np.int64)
    nseg = bounds.size - 1
    out = np.zeros((max(nseg, 0), 2), dtype=np.uint64)
    if nseg <= 0:
        return out
    if KERNELS is not None and buf.flags.c_contiguous:
        KERNELS["segment_fp"](buf.ctypes.data, buf.dtype.itemsize, nseg, bounds.ctypes.data, out.ctypes.data)
        return out
    raw = buf.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[buf.dtype.itemsize])
    with np.errstate(over="ignore"):
        for k in range(nseg):
            for lo in range(int(bounds[k]), int(bounds[k + 1]), _CHUNK):
                hi = min(lo + _CHUNK, int(bounds[k + 1]))
                c = np.arange(lo, hi, dtype=np.uint64) * FP_G
                h = _mix(raw[lo:hi].astype(np.uint64), c)
                h2 = _mix(h, ~c)
                out[k, 0] = np.uint64(out[k, 0] + np.add.reduce(h, dtype=np.uint64))
                out[k, 1] = np.uint64(out[k, 1] + np.add.reduce(h2, dtype=np.uint64))
    return out


def _mix(w: np.ndarray, c: np.ndarray) -> np.ndarray:
    x = (w ^ c) * FP_M
    return x ^ (x >> np.uint64(32))
