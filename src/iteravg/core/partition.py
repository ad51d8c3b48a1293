"""Which part of the averaged model one rank holds, and how the parts of all ranks make the whole again.

A layout (``core.averaged.Layout``) names every averaged tensor and gives each a place in its dtype group's flat
buffer. A *piece* is the part of one tensor a rank holds: ``(layout index, first element, end element, sharded)``,
elements counted in the tensor's flattened global data. A *replicated* piece is a whole tensor every rank holds (and
that syncs across ranks); a *sharded* piece is this rank's own slice (FSDP2's rows of a parameter), held by no other
rank, that never moves until it is gathered.

Per dtype group a rank's buffer is laid out as ``[sharded pieces | replicated pieces | 1 slot]``: the replicated part
and the slot after it are what ``collectives.sync_average`` reduces (the slot counts the contributing ranks), so a model
without sharded tensors has exactly the classic layout-order buffer plus its slot.

Two ways a rank comes to hold shards: the model itself is sharded (FSDP2: ``Piece`` s from the parameters'
``DTensor`` placements), or the model is replicated and the *state* is sharded (``sharded=True``, ZeRO-1's idea):
``equal_slices`` gives each rank an equal, padded range of every dtype group's shardable tensors.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from .averaged import Layout

__all__ = ["Piece", "Partition", "PieceLayout", "full_pieces", "equal_slices", "assemble_group", "stacked_in_order"]

#: (layout index, first element, end element, sharded) -- see the module docstring.
Piece = Tuple[int, int, int, bool]


def full_pieces(layout: Layout) -> List[Piece]:
    """Every tensor whole and replicated: the partition of a model that is not sharded."""
    return [(i, 0, spec.size, False) for i, spec in enumerate(layout.specs)]


def equal_slices(layout: Layout, shardable: Sequence[bool], rank: int, size: int) -> List[Piece]:
    """Rank ``rank``'s pieces when the state of a replicated model is sharded over ``size`` ranks: per dtype group,
    the shardable tensors (layout order) form one range of ``S`` elements and each rank owns the equal, padded slice
    ``[r*c, min((r+1)*c, S))``, ``c = ceil(S / size)``; the others (per-rank statistics such as BatchNorm's running
    means) stay whole and replicated. Empty pieces are left out."""
    if len(shardable) != len(layout.specs):
        raise ValueError(f"expected {len(layout.specs)} shardable flags, got {len(shardable)}")
    totals = [0] * len(layout.groups)
    for spec, flag in zip(layout.specs, shardable):
        if flag:
            totals[layout.offsets[spec.name][0]] += spec.size
    chunk = [-(-t // size) for t in totals]
    seen = [0] * len(layout.groups)
    pieces: List[Piece] = []
    for i, (spec, flag) in enumerate(zip(layout.specs, shardable)):
        if not flag:
            pieces.append((i, 0, spec.size, False))
            continue
        g = layout.offsets[spec.name][0]
        lo, hi = rank * chunk[g], min((rank + 1) * chunk[g], totals[g])
        a, b = max(lo - seen[g], 0), min(hi - seen[g], spec.size)
        if a < b:
            pieces.append((i, a, b, True))
        seen[g] += spec.size
    return pieces


class Partition:
    """Where each of one rank's pieces lives in its local buffers and in the layout (see the module docstring)."""

    def __init__(self, layout: Layout, pieces: Sequence[Piece], *, model_sharded: bool = True) -> None:
        self.layout = layout
        #: Whether the model's parameters are sharded like the state (FSDP2: swaps are local), or replicated with
        #: only the state sharded (``sharded=True``: swaps gather the average).
        self.model_sharded = bool(model_sharded)
        self.pieces: Tuple[Piece, ...] = tuple((int(i), int(a), int(b), bool(s)) for i, a, b, s in pieces)
        groups = len(layout.groups)
        rep = [0] * groups
        shard = [0] * groups
        for i, a, b, sharded in self.pieces:
            spec = layout.specs[i]
            if not 0 <= a <= b <= spec.size or (not sharded and (a, b) != (0, spec.size)):
                raise ValueError(f"piece ({i}, {a}, {b}) does not fit tensor {spec.name!r} of {spec.size} elements")
            g = layout.offsets[spec.name][0]
            if sharded:
                shard[g] += b - a
            else:
                rep[g] += b - a
        self._rep, self._shard = rep, shard
        # The replicated part starts on an 8-byte boundary (the fingerprint reads it as 8-byte words): the shards'
        # area is padded up to a whole number of words.
        per_word = [max(1, 8 // np.dtype(dt).itemsize) for dt in layout.groups]
        self._shard_area = [-(-n // w) * w for n, w in zip(shard, per_word)]
        self.sharded = any(p[3] for p in self.pieces)
        self._local: List[Tuple[int, int, int]] = []
        fill_rep, fill_shard = [0] * groups, [0] * groups
        for i, a, b, sharded in self.pieces:
            g = layout.offsets[layout.specs[i].name][0]
            if sharded:
                start = fill_shard[g]
                fill_shard[g] += b - a
            else:
                start = self._shard_area[g] + fill_rep[g]
                fill_rep[g] += b - a
            self._local.append((g, start, start + b - a))

    def replicated_size(self, g: int) -> int:
        return self._rep[g]

    def shard_size(self, g: int) -> int:
        return self._shard[g]

    def replicated_start(self, g: int) -> int:
        """Where the replicated part begins in this rank's group-``g`` buffer (after the shards, word-aligned)."""
        return self._shard_area[g]

    def buffer_size(self, g: int) -> int:
        """Elements of this rank's group-``g`` buffer: its shards (padded to a word), its replicated tensors, the
        contributor slot."""
        return self._shard_area[g] + self._rep[g] + 1

    def local_layouts(self) -> Tuple["PieceLayout", "PieceLayout"]:
        """(sharded part, replicated part) as layouts of their own, for folding each part as one run."""
        return PieceLayout(self, sharded=True), PieceLayout(self, sharded=False)

    def local_range(self, k: int) -> Tuple[int, int, int]:
        """(group, start, stop) of piece ``k`` in this rank's buffer of that group."""
        return self._local[k]

    def global_range(self, k: int) -> Tuple[int, int]:
        """(group, start) of piece ``k`` in the whole, layout-order group buffer."""
        i, a, _b, _s = self.pieces[k]
        g, start = self.layout.offsets[self.layout.specs[i].name]
        return g, start + a

    def table(self) -> np.ndarray:
        """The pieces as an ``(n, 4)`` int64 table, to exchange with the other ranks."""
        return np.array(self.pieces, dtype=np.int64).reshape(-1, 4)


class PieceLayout:
    """One part of this rank's pieces -- the sharded ones, or the replicated ones -- as a layout of their own (what
    ``FoldPlan`` folds): one pseudo-tensor per piece, named ``"<name>[a:b]"``, at its offset *within that part*, so
    each part is one contiguous run per group (the fold kernels walk their sources back to back). Groups and dtypes
    as in the global layout (a group this rank holds nothing of keeps its index, with size 0). ``index[j]`` is the
    position in ``partition.pieces`` of pseudo-tensor j."""

    def __init__(self, partition: Partition, sharded: bool) -> None:
        from .averaged import TensorSpec  # noqa: WPS433

        layout = partition.layout
        self.groups = layout.groups
        sizes = [0] * len(layout.groups)
        specs, offsets, index = [], {}, []
        for k, (i, a, b, is_sharded) in enumerate(partition.pieces):
            if is_sharded != sharded:
                continue
            spec = layout.specs[i]
            name = f"{spec.name}[{a}:{b}]"
            g, start, _stop = partition.local_range(k)
            offsets[name] = (g, start - (0 if sharded else partition.replicated_start(g)))
            specs.append(TensorSpec(name, (b - a,), spec.dtype))
            index.append(k)
            sizes[g] += b - a
        self.specs = tuple(specs)
        self.offsets = offsets
        self.group_sizes = tuple(sizes)
        self.index = index


def assemble_group(own: Partition, g: int, replicated: np.ndarray, tables: Sequence[np.ndarray],
                   shards: Sequence[np.ndarray], out: np.ndarray) -> None:
    """Write the whole, layout-order buffer of group ``g`` into ``out``: the replicated tensors from ``replicated``
    (``own``'s replicated part, identical on every rank after a sync) and every rank's sharded pieces from
    ``shards[r]`` (rank r's sharded part, in its pieces' order, as ``tables[r]`` lists them)."""
    layout = own.layout
    first = own.replicated_start(g)  # the replicated part starts after this rank's shards
    for k, (i, a, b, sharded) in enumerate(own.pieces):
        if sharded or layout.offsets[layout.specs[i].name][0] != g:
            continue
        _g, start, stop = own.local_range(k)
        begin = layout.offsets[layout.specs[i].name][1]
        out[begin:begin + stop - start] = replicated[start - first:stop - first]
    for table, shard in zip(tables, shards):
        pos = 0
        for i, a, b, sharded in (tuple(int(v) for v in row) for row in table):
            if not sharded or layout.offsets[layout.specs[i].name][0] != g:
                continue
            begin = layout.offsets[layout.specs[i].name][1] + a
            out[begin:begin + b - a] = shard[pos:pos + b - a]
            pos += b - a


def stacked_in_order(own: Partition, g: int, tables: Sequence[np.ndarray], width: int) -> bool:
    """Whether every rank's sharded part of group ``g`` (its pieces in ``tables[r]`` order), padded to ``width``
    elements and stacked in rank order -- what an allgather returns -- *is* the whole layout-order buffer of the group
    followed by padding. True for ``equal_slices`` of a group without per-rank tensors (the usual ``sharded=True``
    case): the gather then needs no second, assembled copy of the model. Rank r's part must start at ``r * width``
    and run contiguously in layout order, and the parts must add up to the group (they then tile it exactly)."""
    layout = own.layout
    if own.replicated_size(g):
        return False
    covered = 0
    for r, table in enumerate(tables):
        pos = r * width
        for i, a, b, sharded in (tuple(int(v) for v in row) for row in table):
            name = layout.specs[i].name
            if layout.offsets[name][0] != g:
                continue
            if not sharded or layout.offsets[name][1] + a != pos:
                return False
            pos += b - a
        covered += pos - r * width
    return covered == layout.group_sizes[g]
