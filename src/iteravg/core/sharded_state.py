"""A numpy averaged state that holds only this rank's pieces of the average, in one buffer.

Why: in data-parallel training every replica holds the same iterate, so every rank folding and storing the whole
model is N-fold redundant (ZeRO stage 1's observation about optimizer state). With ``sharded=True`` each rank folds
and keeps an equal slice of every dtype group (``core.partition.equal_slices``): 1/N of the model per rank, and 1/N of
the fold's memory traffic, with no communication per step. Per-rank statistics (BatchNorm's running means) stay whole
and are averaged across ranks at each sync, as without sharding. The whole average exists only when it is needed:
swaps, ``finalize`` and snapshots gather it (``collectives.gather_average``).

One buffer, no back buffer: the fold is in place, so an iterate must be judged before it is written. It is refused
(average and counter unchanged) if any value of *this rank's slice* is NaN, inf, or so large (``|x| >= 2^emax``,
e.g. 2^127 for float32) that ``x - avg`` could overflow -- then no fold can produce a non-finite average. Ranks decide
on their own slices (no per-step collective); a rank that refused an iterate the others folded is reported at the
next sync (``collectives.sync_average``), on every rank.

Same arithmetic as the unsharded state (GluonTS's ``a + alpha * (x - a)``, element by element, same C kernel), so a
sharded data-parallel average has exactly the bits of an unsharded one.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._kernel import KERNELS
from .averaged import Allocator, FoldPlan, FoldResult, HostSyncMixin, Layout, fingerprint, numpy_allocator
from .partition import Partition

__all__ = ["ShardedState", "too_large"]

#: Bit masks of (|x|, 2^emax) per float dtype: |x| >= 2^emax iff (bits & ABS) >= BIG (NaN and inf included).
_LIMITS = {"float16": (np.uint16, 0x7FFF, 0x7800), "float32": (np.uint32, 0x7FFFFFFF, 0x7F000000),
           "float64": (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FE0000000000000)}


def too_large(plan: FoldPlan, g: int) -> bool:
    """Whether dtype group ``g`` of ``plan``'s iterate holds a value with ``|x| >= 2^emax`` (NaN and inf included):
    one read of the iterate, by the C kernel or by numpy with the same verdict. Such an iterate is refused by an
    in-place fold (here) and by the post-hoc sums (``core.posthoc``), which cannot undo a bad write either."""
    dt = plan.layout.groups[g]
    kernel = KERNELS.get(f"inplace_{dt}") if KERNELS else None
    if kernel is not None:
        count, ptrs, sizes = plan.kernel_args[g]
        return bool(kernel(count, ptrs.ctypes.data, sizes.ctypes.data, 0, 0.0, 1))
    uint, absmask, big = _LIMITS[dt]
    tmp = plan.scratch[dt]
    for start, stop, parts in plan.buckets[g]:
        t = tmp[: stop - start]
        np.concatenate(parts, out=t)
        if np.any((t.view(uint) & uint(absmask)) >= uint(big)):
            return True
    return False


class ShardedState(HostSyncMixin):
    """This rank's pieces of the average (``partition``), one flat buffer per dtype group (see the module doc)."""

    partitioned = True
    device = "cpu"

    def __init__(self, layout: Layout, partition: Partition, alloc: Allocator = numpy_allocator) -> None:
        self.layout = layout
        self.partition = partition
        self._alloc = alloc
        self.parts = partition.local_layouts()  # (sharded pieces, replicated pieces), each one run per group
        self._buffers = [alloc(partition.buffer_size(g), np.dtype(dt)) for g, dt in enumerate(layout.groups)]
        self.refused_nonfinite = 0
        self._plan_of: Any = None  # the source plan the piece plans below were built from
        self._plans: List[FoldPlan] = []

    # -- buffers ---------------------------------------------------------------------------------
    def _region(self, buffer: np.ndarray, part: int, g: int) -> np.ndarray:
        """The sharded (part 0) or replicated (part 1) run of group ``g`` in a buffer laid out like the state's."""
        first = 0 if part == 0 else self.partition.replicated_start(g)
        return buffer[first:first + self.parts[part].group_sizes[g]]

    def current(self, g: int) -> np.ndarray:
        """The replicated part of group ``g``: what syncs and fingerprints cover."""
        first = self.partition.replicated_start(g)
        return self._buffers[g][0][first:first + self.partition.replicated_size(g)]

    def sync_view(self, g: int) -> np.ndarray:
        return self._buffers[g][0][self.partition.replicated_start(g):]

    def native(self, g: int) -> Any:
        nd, first = self._buffers[g][1], self.partition.replicated_start(g)
        return nd if nd is None or first == 0 else nd[first:]

    def shard_host(self, g: int) -> np.ndarray:
        return self._buffers[g][0][: self.partition.shard_size(g)]

    def replicated_host(self, g: int) -> np.ndarray:
        return self.current(g)

    # -- the update ------------------------------------------------------------------------------
    def piece_plans(self, source: Any) -> List[FoldPlan]:
        """Fold plans over this rank's sharded and replicated pieces of ``source``'s tensors (rebuilt when the
        source's own plan changes, e.g. MXNet moved a buffer)."""
        plan = source.plan()
        if plan is not self._plan_of or not self._plans:
            pieces = self.partition.pieces
            self._plans = [FoldPlan(part, [plan.views[pieces[k][0]][pieces[k][1]:pieces[k][2]] for k in part.index])
                           for part in self.parts]
            self._plan_of = plan
        return self._plans

    def fold_source(self, source: Any, alpha: float) -> FoldResult:
        """Check this rank's pieces of the iterate (every group), then fold them in place -- or nothing."""
        plans = self.piece_plans(source)
        groups = range(len(self.layout.groups))
        if any(self._too_large(plan, g) for plan in plans for g in groups):
            self.refused_nonfinite += 1
            return FoldResult(folded=False, alpha=alpha)
        for part, plan in enumerate(plans):
            for g in groups:
                self._fold_group(plan, g, alpha, self._region(self._buffers[g][0], part, g))
        return FoldResult(folded=True, alpha=alpha)

    def _too_large(self, plan: FoldPlan, g: int) -> bool:
        return too_large(plan, g)

    @staticmethod
    def _fold_group(plan: FoldPlan, g: int, alpha: float, a: np.ndarray) -> None:
        dt = plan.layout.groups[g]
        if a.size == 0:
            return
        kernel = KERNELS.get(f"inplace_{dt}") if KERNELS else None
        if kernel is not None:
            count, ptrs, sizes = plan.kernel_args[g]
            kernel(count, ptrs.ctypes.data, sizes.ctypes.data, a.ctypes.data, alpha, 0)
            return
        tmp = plan.scratch[dt]
        for start, stop, parts in plan.buckets[g]:
            if alpha == 1.0:
                np.concatenate(parts, out=a[start:stop])
                continue
            t = tmp[: stop - start]
            np.concatenate(parts, out=t)
            np.subtract(t, a[start:stop], out=t)
            np.multiply(t, alpha, out=t)
            np.add(a[start:stop], t, out=a[start:stop])

    # -- loading and reading ---------------------------------------------------------------------
    def load_flat(self, group_arrays: Sequence[np.ndarray]) -> None:
        """Keep this rank's pieces of whole, layout-order group arrays (a checkpoint, a resume at any world size)."""
        if len(group_arrays) != len(self.layout.groups):
            raise ValueError(f"expected {len(self.layout.groups)} dtype groups, got {len(group_arrays)}")
        for k, (_i, a, b, _s) in enumerate(self.partition.pieces):
            g, start, stop = self.partition.local_range(k)
            _g, begin = self.partition.global_range(k)
            np.copyto(self._buffers[g][0][start:stop], group_arrays[g][begin:begin + b - a], casting="no")

    def fingerprint(self, word_sums_of: Optional[Sequence[Optional[tuple]]] = None) -> np.ndarray:
        """Fingerprint of the replicated part (the part every rank holds alike)."""
        return fingerprint([self.current(g) for g in range(len(self.layout.groups))], word_sums_of)

    def host_tensors(self) -> Dict[str, np.ndarray]:
        raise ValueError("a sharded average must be gathered (collectives.gather_average) before it is read")

    def new_buffers(self) -> List[Tuple[np.ndarray, Any]]:
        """Buffers shaped like this rank's (the swap cache of its slice of the training weights)."""
        return [self._alloc(self.partition.buffer_size(g), np.dtype(dt)) for g, dt in enumerate(self.layout.groups)]

    def read_params(self, source: Any, buffers: Sequence[Tuple[np.ndarray, Any]]) -> None:
        """This rank's pieces of the model's parameters into ``buffers`` (from ``new_buffers``)."""
        for part, plan in enumerate(self.piece_plans(source)):
            for g, buf in enumerate(buffers):
                plan.gather(g, self._region(buf[0], part, g))

    def write_params(self, source: Any, buffers: Optional[Sequence[Tuple[np.ndarray, Any]]] = None) -> None:
        """This rank's pieces of ``buffers`` (or of the average) into the model -- only right where the model is
        sharded the same way; a replicated model is written whole with ``write_full`` after a gather."""
        for part, plan in enumerate(self.piece_plans(source)):
            for g in range(len(self.layout.groups)):
                src = self._buffers[g][0] if buffers is None else buffers[g][0]
                plan.scatter(g, self._region(src, part, g))

    @staticmethod
    def write_full(source: Any, groups: Sequence[np.ndarray]) -> None:
        """Whole, layout-order group arrays into the (replicated) model."""
        source.write(list(groups))

    @staticmethod
    def read_full(source: Any, layout: Layout) -> List[np.ndarray]:
        out = [np.empty(n, dtype=np.dtype(dt)) for dt, n in zip(layout.groups, layout.group_sizes)]
        source.read(out)
        return out

    def params_fingerprint(self, source: Any, shardable: Sequence[bool]) -> np.ndarray:
        """Fingerprint of the model's shardable tensors, whole (are the data-parallel replicas identical?)."""
        views = source.plan().views
        return fingerprint([v for v, s in zip(views, shardable) if s])

    def buffer_parts(self, buffers: Sequence[Tuple[np.ndarray, Any]], g: int) -> Tuple[np.ndarray, np.ndarray]:
        """(sharded part, replicated part) of a ``new_buffers`` buffer, for gathering the training weights."""
        first = self.partition.replicated_start(g)
        view = buffers[g][0]
        return view[: self.partition.shard_size(g)], view[first:first + self.partition.replicated_size(g)]

    def replicated_part(self, buffer: Tuple[np.ndarray, Any], g: int) -> Tuple[np.ndarray, Any]:
        first = self.partition.replicated_start(g)
        n = self.partition.replicated_size(g)
        nd = buffer[1]
        return buffer[0][first:first + n], (None if nd is None else nd[first:first + n])

    # -- what ``collectives.sync_average`` asks --------------------------------------------------
    def scale(self, g: int, factor: float) -> None:
        self.scale_range(g, 0, self.partition.replicated_size(g), factor)

    def flip_lowest_bit(self) -> None:
        for g in range(len(self.layout.groups)):
            if self.current(g).size:
                self.current(g)[:1].view(np.uint8)[0] ^= 1
                return
