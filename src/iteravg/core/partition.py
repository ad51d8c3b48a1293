"""Which part of the averaged model one rank holds, and how the parts of all ranks make the whole again.

A layout (``core.averaged.Layout``) names every averaged tensor and gives each a place in its dtype group's flat
buffer. A *piece* is the part of one tensor a rank holds: ``(layout index, first element, end element, sharded)``,
elements counted in the tensor's flattened global data. A *replicated* piece is a whole tensor every rank holds (and
that syncs across ranks); a *sharded* piece is this rank's own slice (FSDP2's rows of a parameter), held by no other
rank, that never moves until it is gathered.

Per dtype group a rank's buffer is laid out as ``[replicated pieces | 1 slot | sharded pieces]``: the replicated part
and the slot are what ``collectives.sync_average`` reduces (the slot counts the contributing ranks), so a model without
sharded tensors has exactly the classic layout-order buffer plus its slot.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from .averaged import Layout

__all__ = ["Piece", "Partition", "full_pieces", "assemble_group"]

#: (layout index, first element, end element, sharded) -- see the module docstring.
Piece = Tuple[int, int, int, bool]


def full_pieces(layout: Layout) -> List[Piece]:
    """Every tensor whole and replicated: the partition of a model that is not sharded."""
    return [(i, 0, spec.size, False) for i, spec in enumerate(layout.specs)]


class Partition:
    """Where each of one rank's pieces lives in its local buffers and in the layout (see the module docstring)."""

    def __init__(self, layout: Layout, pieces: Sequence[Piece]) -> None:
        self.layout = layout
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
        self.sharded = any(p[3] for p in self.pieces)
        self._local: List[Tuple[int, int, int]] = []
        fill_rep, fill_shard = [0] * groups, [0] * groups
        for i, a, b, sharded in self.pieces:
            g = layout.offsets[layout.specs[i].name][0]
            if sharded:
                start = rep[g] + 1 + fill_shard[g]
                fill_shard[g] += b - a
            else:
                start = fill_rep[g]
                fill_rep[g] += b - a
            self._local.append((g, start, start + b - a))

    def replicated_size(self, g: int) -> int:
        return self._rep[g]

    def shard_size(self, g: int) -> int:
        return self._shard[g]

    def buffer_size(self, g: int) -> int:
        return self._rep[g] + 1 + self._shard[g]

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


def assemble_group(own: Partition, g: int, replicated: np.ndarray, tables: Sequence[np.ndarray],
                   shards: Sequence[np.ndarray], out: np.ndarray) -> None:
    """Write the whole, layout-order buffer of group ``g`` into ``out``: the replicated tensors from ``replicated``
    (``own``'s replicated part, identical on every rank after a sync) and every rank's sharded pieces from
    ``shards[r]`` (rank r's sharded part, in its pieces' order, as ``tables[r]`` lists them)."""
    layout = own.layout
    for k, (i, a, b, sharded) in enumerate(own.pieces):
        if sharded or layout.offsets[layout.specs[i].name][0] != g:
            continue
        _g, start, stop = own.local_range(k)
        begin = layout.offsets[layout.specs[i].name][1]
        out[begin:begin + stop - start] = replicated[start:stop]
    for table, shard in zip(tables, shards):
        pos = 0
        for i, a, b, sharded in (tuple(int(v) for v in row) for row in table):
            if not sharded or layout.offsets[layout.specs[i].name][0] != g:
                continue
            begin = layout.offsets[layout.specs[i].name][1] + a
            out[begin:begin + b - a] = shard[pos:pos + b - a]
            pos += b - a
