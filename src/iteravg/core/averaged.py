"""The averaged model as flat buffers, updated in place by a few vectorised calls per step.

Why flat buffers: GluonTS keeps one NDArray per parameter and looks each one up with ``collect_params()``
on every step (O(P^2) in the number of tensors). Here the averaged state of all tensors of one dtype is a
single contiguous buffer, so syncing it across ranks is one collective and folding an iterate into it is
O(P / bucket) vectorised calls, independent of how many tensors the model has.

Why two buffers: the update ``a <- a + alpha * (x - a)`` is computed from buffer ``A`` into buffer ``B`` and
the buffers are swapped only after the whole iterate proved finite. A NaN or inf anywhere in the iterate
therefore never reaches the average (the step is refused, see ``FoldResult``), and the memory traffic is still
the minimum: read ``x``, read ``A``, write ``B`` (12 bytes per float32 parameter).

Why buckets: the iterate lives in many separate framework tensors. Each bucket gathers up to
``BUCKET_ELEMS`` of them with one ``np.concatenate`` into a small cache-resident scratch, then does the
arithmetic there, so the temporaries never touch main memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._kernel import KERNELS, pointer_table, scale_and_word_sums, segment_fingerprints, word_sums

__all__ = ["TensorSpec", "Layout", "AveragedState", "HostSyncMixin", "FoldPlan", "Allocator", "numpy_allocator", "fingerprint",
           "chain_fingerprint"]

#: Elements per bucket: 64 Ki float32 = 256 KiB, comfortably inside L2 with its scratch.
BUCKET_ELEMS = 1 << 16

#: ``alloc(n, dtype) -> (numpy view, native handle or None)``; lets a framework own the memory so its
#: collectives can work on the buffer in place (Horovod needs an NDArray, numpy code needs a view).
Allocator = Callable[[int, np.dtype], Tuple[np.ndarray, Any]]


def numpy_allocator(n: int, dtype: np.dtype) -> Tuple[np.ndarray, Any]:
    return np.zeros(n, dtype=dtype), None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: Tuple[int, ...]
    dtype: str  # numpy dtype name, e.g. "float32"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of the averaged tensors, in the model's order, and where each one lives.

    Tensors are grouped by dtype; each group is one flat buffer. ``offsets[name] = (group, start)``.
    """

    specs: Tuple[TensorSpec, ...]
    groups: Tuple[str, ...] = field(init=False)
    group_sizes: Tuple[int, ...] = field(init=False)
    offsets: Dict[str, Tuple[int, int]] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        groups: List[str] = []
        sizes: List[int] = []
        offsets: Dict[str, Tuple[int, int]] = {}
        for spec in self.specs:
            dt = np.dtype(spec.dtype)
            if dt.kind != "f":
                raise ValueError(
                    f"parameter {spec.name!r} has dtype {spec.dtype}; only floating-point tensors can be averaged"
                )
            if spec.name in offsets:
                raise ValueError(f"duplicate parameter name {spec.name!r}")
            if spec.dtype not in groups:
                groups.append(spec.dtype)
                sizes.append(0)
            g = groups.index(spec.dtype)
            offsets[spec.name] = (g, sizes[g])
            sizes[g] += spec.size
        object.__setattr__(self, "groups", tuple(groups))
        object.__setattr__(self, "group_sizes", tuple(sizes))
        object.__setattr__(self, "offsets", offsets)

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.specs]

    @property
    def num_elements(self) -> int:
        return sum(self.group_sizes)

    def describe(self) -> List[List[Any]]:
        """JSON-able description; equal on two ranks iff their models can be averaged together."""
        return [[s.name, list(s.shape), s.dtype] for s in self.specs]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.describe()).encode()).hexdigest()


@dataclass
class FoldResult:
    """What one ``fold`` did. ``folded`` is False when the iterate held a NaN or inf and was refused."""

    folded: bool
    alpha: float


class FoldPlan:
    """Precomputed buckets that gather a model's tensors (as flat numpy views) into the state's buffers.

    Built once per (state, binding of model tensors); ``views`` must be in ``layout.specs`` order and stay
    valid (the framework adapter keeps the tensors alive and rebuilds the plan if they are replaced).
    """

    def __init__(self, layout: Layout, views: Sequence[np.ndarray], bucket_elems: int = BUCKET_ELEMS) -> None:
        if len(views) != len(layout.specs):
            raise ValueError(f"expected {len(layout.specs)} tensors, got {len(views)}")
        # Per group: list of buckets; a bucket is (start, stop, [source slices]).
        self.buckets: List[List[Tuple[int, int, List[np.ndarray]]]] = [[] for _ in layout.groups]
        current: List[Optional[Tuple[int, List[np.ndarray]]]] = [None] * len(layout.groups)
        for spec, view in zip(layout.specs, views):
            flat = view.reshape(-1)
            if flat.size != spec.size or flat.dtype != np.dtype(spec.dtype):
                raise ValueError(
                    f"tensor {spec.name!r} is {flat.dtype}[{flat.size}] but the averaged state holds "
                    f"{spec.dtype}[{spec.size}]"
                )
            g, pos = layout.offsets[spec.name]
            i = 0
            while i < flat.size:
                if current[g] is None:
                    current[g] = (pos + i, [])
                start, parts = current[g]
                used = pos + i - start
                take = min(bucket_elems - used, flat.size - i)
                parts.append(flat[i : i + take])
                i += take
                if used + take == bucket_elems:
                    self.buckets[g].append((start, start + bucket_elems, parts))
                    current[g] = None
        for g, cur in enumerate(current):
            if cur is not None:
                start, parts = cur
                self.buckets[g].append((start, start + sum(p.size for p in parts), parts))
        #: The flat views in layout order (a sharded state folds slices of them).
        self.views: List[np.ndarray] = [v.reshape(-1) for v in views]
        # Whole tensors per group, for the one-call C kernel (see _kernel.py).
        self.sources: List[List[np.ndarray]] = [[] for _ in layout.groups]
        for spec, view in zip(layout.specs, views):
            self.sources[layout.offsets[spec.name][0]].append(view.reshape(-1))
        self.kernel_args = [pointer_table(srcs) for srcs in self.sources]
        self.scratch = {
            dt: np.empty(min(bucket_elems, max(layout.group_sizes[g], 1)), dtype=dt) for g, dt in enumerate(layout.groups)
        }
        self.layout = layout

    def gather(self, group: int, out: np.ndarray) -> None:
        """Copy the model's tensors of one dtype group into a flat buffer (one concatenate per bucket)."""
        for start, stop, parts in self.buckets[group]:
            np.concatenate(parts, out=out[start:stop])

    def scatter(self, group: int, src: np.ndarray) -> None:
        """Copy a flat buffer back into the model's tensors (used to load the averaged or cached model)."""
        for start, _stop, parts in self.buckets[group]:
            pos = start
            for p in parts:
                np.copyto(p, src[pos : pos + p.size])
                pos += p.size


class HostSyncMixin:
    """What ``collectives.sync_average`` asks of a numpy state (host buffers), shared by the unsharded and the
    sharded one: ``current(g)`` is the part of group ``g`` every rank holds, ``sync_view(g)`` the same plus the
    trailing contributor slot."""

    def mark_contribution(self, g: int, has_data: bool) -> None:
        """Before a sum-allreduce of group ``g``: 1 in the trailing slot if this rank holds an average, else all
        zeros (an empty rank must not pull the mean towards zero)."""
        buf = self.sync_view(g)
        if has_data:
            buf[-1] = 1
        else:
            buf[:] = 0

    def contributors(self, g: int) -> int:
        """After the sum-allreduce: how many ranks contributed (the trailing slot's sum)."""
        return int(round(float(self.sync_view(g)[-1])))

    def tensor_fingerprints(self, g: int, ranges: Sequence[Tuple[int, int]]) -> np.ndarray:
        """``(len(ranges), 2)`` uint64: the 128-bit fingerprint of each range of ``current(g)`` (adjacent ranges)."""
        return segment_fingerprints(self.current(g), range_bounds(ranges))

    def scale_range(self, g: int, a: int, b: int, factor: float) -> None:
        """``current(g)[a:b] *= factor`` with the rounding of ``scale`` (float16 through float32, once)."""
        data = self.current(g)[a:b]
        if data.dtype.itemsize < 4:
            np.multiply(data, np.float32(factor), out=data, dtype=np.float32, casting="unsafe")
        else:
            np.multiply(data, data.dtype.type(factor), out=data)


class AveragedState(HostSyncMixin):
    """The running average of model iterates: one flat buffer per dtype (double-buffered), plus counters.

    ``fold(plan, alpha)`` folds the model's current iterate with weight ``alpha`` (``alpha == 1`` copies it).
    ``current(g)`` is the buffer holding the average of dtype group ``g``. ``sync_view(g)`` is the same buffer
    plus one trailing slot that collectives use to count the ranks contributing to a mean (see
    ``collectives.sync_average``); ``native(g)`` is the framework handle of ``sync_view(g)``'s memory (or
    ``None``), which communicators use for in-place collectives.
    """

    def __init__(self, layout: Layout, alloc: Allocator = numpy_allocator) -> None:
        self.layout = layout
        self._alloc = alloc
        self._buffers: List[List[Tuple[np.ndarray, Any]]] = [
            [alloc(n + 1, np.dtype(dt)), alloc(n + 1, np.dtype(dt))] for dt, n in zip(layout.groups, layout.group_sizes)
        ]
        self._front = [0] * len(layout.groups)
        #: Iterates refused because they held a NaN or inf (documented rule: they never enter the average).
        self.refused_nonfinite = 0

    # -- buffers ---------------------------------------------------------------------------------
    def current(self, g: int) -> np.ndarray:
        return self._buffers[g][self._front[g]][0][: self.layout.group_sizes[g]]

    def sync_view(self, g: int) -> np.ndarray:
        return self._buffers[g][self._front[g]][0]

    def native(self, g: int) -> Any:
        return self._buffers[g][self._front[g]][1]

    def tensor(self, name: str) -> np.ndarray:
        """Zero-copy view of one averaged tensor, valid until the next ``fold``."""
        g, start = self.layout.offsets[name]
        spec = next(s for s in self.layout.specs if s.name == name)
        return self.current(g)[start : start + spec.size].reshape(spec.shape)

    # -- the update ------------------------------------------------------------------------------
    def fold(self, plan: FoldPlan, alpha: float) -> FoldResult:
        """``avg <- avg + alpha * (x - avg)`` for every tensor, or ``avg <- x`` when ``alpha == 1``.

        The arithmetic matches GluonTS's ``param_avg[:] += alpha * (x - param_avg)`` operation by operation
        in the tensors' own dtype. Returns ``FoldResult(folded=False)`` and leaves the average untouched if
        the iterate contains a NaN or inf.
        """
        finite = True
        for g, dt in enumerate(self.layout.groups):
            front = self.current(g)
            back = self._buffers[g][1 - self._front[g]][0]
            kernel = KERNELS.get(dt) if KERNELS else None
            if kernel is not None:  # one C call for the whole group
                count, ptrs, sizes = plan.kernel_args[g]
                if kernel(count, ptrs.ctypes.data, sizes.ctypes.data, front.ctypes.data, back.ctypes.data, alpha):
                    finite = False
                    break
                continue
            tmp = plan.scratch[dt]
            for start, stop, parts in plan.buckets[g]:
                n = stop - start
                t = tmp[:n]
                if alpha == 1.0:
                    np.concatenate(parts, out=back[start:stop])
                    t = back[start:stop]
                else:
                    np.concatenate(parts, out=t)
                    np.subtract(t, front[start:stop], out=t)
                    np.multiply(t, alpha, out=t)
                    np.add(front[start:stop], t, out=back[start:stop])
                # The result is checked, as the C kernel checks it (not the increment ``t``): see _all_finite.
                if finite and not _all_finite(back[start:stop]):
                    finite = False
            if not finite:
                break
        if not finite:
            self.refused_nonfinite += 1
            return FoldResult(folded=False, alpha=alpha)
        self._front = [1 - f for f in self._front]
        return FoldResult(folded=True, alpha=alpha)

    def load_flat(self, group_arrays: Sequence[np.ndarray]) -> None:
        """Replace the average by the given flat arrays (one per dtype group), e.g. from a checkpoint."""
        if len(group_arrays) != len(self.layout.groups):
            raise ValueError(f"expected {len(self.layout.groups)} dtype groups, got {len(group_arrays)}")
        for g, arr in enumerate(group_arrays):
            np.copyto(self.current(g), arr, casting="no")

    def fingerprint(self, word_sums_of: Optional[Sequence[Optional[tuple]]] = None) -> np.ndarray:
        """Cheap 128-bit content fingerprint (see ``fingerprint``) of the current average, as two int64."""
        return fingerprint([self.current(g) for g in range(len(self.layout.groups))], word_sums_of)

    # -- what the engine asks of every kind of averaged state (``core.state.AveragedStateLike``) ------
    device = "cpu"

    def fold_source(self, source: Any, alpha: float) -> FoldResult:
        """Fold ``source``'s current iterate (a ``ParamSource`` over numpy views)."""
        return self.fold(source.plan(), alpha)

    def host_tensors(self) -> Dict[str, np.ndarray]:
        """name -> zero-copy host view of the averaged tensor (valid until the next fold)."""
        return {spec.name: self.tensor(spec.name) for spec in self.layout.specs}

    def new_buffers(self) -> List[Tuple[np.ndarray, Any]]:
        """Fresh ``(flat view, native handle)`` buffers shaped like the state, one per dtype group (the swap cache,
        the final-weights broadcast); made by the state's allocator, so communicators can use them in place."""
        return [self._alloc(n, np.dtype(dt)) for dt, n in zip(self.layout.groups, self.layout.group_sizes)]

    def read_params(self, source: Any, buffers: Sequence[Tuple[np.ndarray, Any]]) -> None:
        """Copy the model's parameters into ``buffers`` (from ``new_buffers``)."""
        source.read([b[0][:n] for b, n in zip(buffers, self.layout.group_sizes)])

    def write_params(self, source: Any, buffers: Optional[Sequence[Tuple[np.ndarray, Any]]] = None) -> None:
        """Set the model's parameters from ``buffers``, or from the average when ``buffers`` is None."""
        if buffers is None:
            source.write([self.current(g) for g in range(len(self.layout.groups))])
        else:
            source.write([b[0][:n] for b, n in zip(buffers, self.layout.group_sizes)])

    partitioned = False  # every rank holds the whole average (sharding: ``core.partition``)

    @property
    def partition(self) -> Any:
        """Every tensor whole and replicated (``core.partition``), for code that handles sharded states too."""
        part = getattr(self, "_partition", None)
        if part is None:
            from .partition import Partition, full_pieces  # noqa: WPS433 -- partition imports this module

            part = self._partition = Partition(self.layout, full_pieces(self.layout))
        return part

    def replicated_part(self, buffer: Tuple[np.ndarray, Any], g: int) -> Tuple[np.ndarray, Any]:
        return buffer

    # -- what ``collectives.sync_average`` asks of a state ---------------------------------------
    def scale(self, g: int, factor: float) -> Optional[tuple]:
        """``avg *= factor`` for group ``g`` (the mean's division). float32: one pass that also returns the word
        sums of the result for ``fingerprint`` (C kernel, or numpy with the same bits); float16 is scaled in
        float32 and rounded once; other dtypes in their own precision (returns ``None``)."""
        data = self.current(g)
        if data.dtype == np.float32:
            return scale_and_word_sums(data, factor)
        if data.dtype.itemsize < 4:
            np.multiply(data, np.float32(factor), out=data, dtype=np.float32, casting="unsafe")
        else:
            np.multiply(data, data.dtype.type(factor), out=data)
        return None

    def flip_lowest_bit(self) -> None:
        """Testing only (``ITERAVG_FAULT=diverge-after-allreduce``): corrupt the first element's lowest bit."""
        self.current(0)[:1].view(np.uint8)[0] ^= 1


def _all_finite(result: np.ndarray) -> bool:
    """Whether every element of a fold's *result* is finite -- what the C kernel checks (a finite increment can still
    overflow the sum: float16 -19312 + -46208 rounds to -inf). A float64 sum of float16/float32 values cannot
    overflow, so it is finite iff every element is (one cheap pass); float64 values are tested one by one."""
    if result.dtype.kind != "f":
        return True
    if result.dtype.itemsize < 8:
        return bool(np.isfinite(result.sum(dtype=np.float64)))
    return bool(np.isfinite(result).all())


def fingerprint(arrays: Sequence[np.ndarray], word_sums_of: Optional[Sequence[Optional[tuple]]] = None) -> np.ndarray:
    """128-bit content fingerprint of a list of buffers, as two int64: sensitive to every bit and to position.

    Per buffer, each 8-byte word ``w_i`` is mixed with its position (``h_i = m ^ (m >> 32)``,
    ``m = (w_i ^ i*G) * M``, see ``_foldkernel.c``) and the wrapping sum and xor of the ``h_i`` are taken: flipping
    any bit changes the sum (the mix is a bijection), swapping two words changes it too (the position enters before
    the multiply). A trailing partial word (float16/float32 buffers of odd size) is one more word, zero-padded.
    Buffers are chained in order (``sum = sum * M + buffer_sum + byte_size``, ``xor = rotl(xor, 1) ^ buffer_xor``).
    Memory-bandwidth cheap (one pass, one multiply per 8 bytes), computed bit for bit the same by the C kernel and by
    numpy. It is not a cryptographic hash: checkpoint files are additionally protected by SHA-256.
    ``word_sums_of[i]``, if given, is buffer i's word sums already computed by a pass that read it anyway.
    """
    parts = []
    for i, arr in enumerate(arrays):
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        n8 = raw.size // 8 * 8
        known = word_sums_of[i] if word_sums_of is not None else None
        s, x = known if known is not None else word_sums(raw[:n8].view(np.uint64))
        s, x = int(s), int(x)
        if raw.size > n8:
            tail = np.frombuffer(raw[n8:].tobytes().ljust(8, b"\0"), dtype=np.uint64)
            ts, tx = word_sums(tail, start=n8 // 8)
            s, x = (s + int(ts)) & _MASK64, x ^ int(tx)
        parts.append((s, x, raw.size))
    return chain_fingerprint(parts)


_MASK64 = (1 << 64) - 1


def range_bounds(ranges: Sequence[Tuple[int, int]]) -> np.ndarray:
    """Adjacent ``(start, stop)`` ranges as segment bounds ``[start_0, stop_0 = start_1, ..., stop_last]``."""
    if not ranges:
        return np.zeros(1, dtype=np.int64)
    return np.array([ranges[0][0]] + [b for _a, b in ranges], dtype=np.int64)


def chain_fingerprint(parts: Sequence[Tuple[int, int, int]]) -> np.ndarray:
    """Chain per-buffer ``(word sum, word xor, byte size)`` into the 128-bit fingerprint, as two int64.

    Shared by every kind of averaged state, so a fingerprint computed where the tensors live (torch on a GPU) has
    the same bits as the numpy one a checkpoint reader recomputes."""
    mult = 0xD6E8FEB86659FD93
    total = 0
    xor = 0
    for s, x, nbytes in parts:
        total = (total * mult + int(s) + int(nbytes)) & _MASK64
        xor = (((xor << 1) | (xor >> 63)) & _MASK64) ^ int(x)
    return np.array([total, xor], dtype=np.uint64).view(np.int64)
