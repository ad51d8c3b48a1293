"""ctypes loader for the optional C fold kernel (``_foldkernel.c``); ``None`` when it was not built.

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
            fp = lib.iteravg_fingerprint
            fp.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
            fp.restype = None
            funcs["fingerprint"] = fp
            sf = lib.iteravg_scale_fingerprint_f32
            sf.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p]
            sf.restype = None
            funcs["scale_fingerprint_f32"] = sf
            return funcs
    return None


KERNELS = _load()


def scale_and_word_sums(buf: np.ndarray, scale: float) -> Optional[tuple]:
    """``buf *= scale`` (float32, in place) and ``word_sums`` of the result, in one C pass; None without the kernel."""
    if KERNELS is None or buf.dtype != np.float32 or not buf.flags.c_contiguous:
        return None
    out = np.zeros(2, dtype=np.uint64)
    KERNELS["scale_fingerprint_f32"](buf.ctypes.data, buf.size, scale, out.ctypes.data)
    return out[0], out[1]


def word_sums(words: np.ndarray) -> tuple:
    """(wrapping sum, xor) of a uint64 array: one C pass if the kernel is built, else two numpy passes."""
    if KERNELS is not None and words.flags.c_contiguous:
        out = np.zeros(2, dtype=np.uint64)
        KERNELS["fingerprint"](words.ctypes.data, words.size, out.ctypes.data)
        return out[0], out[1]
    if words.size == 0:
        return np.uint64(0), np.uint64(0)
    return np.add.reduce(words, dtype=np.uint64), np.bitwise_xor.reduce(words)


def pointer_table(arrays: list) -> tuple:
    """(count, pointer array, sizes array) for the kernel; keep the returned arrays alive while used."""
    ptrs = np.array([a.ctypes.data for a in arrays], dtype=np.uintp)
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    return len(arrays), ptrs, sizes
