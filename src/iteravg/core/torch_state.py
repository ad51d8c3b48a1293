"""The averaged state as torch tensors on the parameters' device (CPU or CUDA), folded with ``_foreach`` ops.

Why a second kind of state: the numpy state (``core.averaged``) lives on the host, so a CUDA model would pay a
device-to-host copy of the whole model every step. Here the average of each dtype group is one flat tensor on the
parameters' device, and one fold is a couple of fused ``torch._foreach_*`` calls over all tensors: O(1) Python calls
per step, no host copy, no communication.

The fold is ``torch._foreach_lerp_(avg, x, alpha)``: ``avg + alpha * (x - avg)``, the very op
``torch.optim.swa_utils.get_swa_multi_avg_fn`` / ``get_ema_multi_avg_fn`` use, so the average matches
``AveragedModel(multi_avg_fn=...)`` on the same iterates bit for bit. The update is in place on the one buffer
(memory traffic at the bandwidth bound: read x, read avg, write avg); an iterate holding a NaN or inf is refused
*before* it touches the average, from a ``_foreach_norm`` of the iterate (``_all_finite``: one more read of x and one
small device-to-host copy of a flag per step; ``check_finite=False`` drops both). Unlike the numpy state, an overflow
inside the fold itself (``|x - avg|`` beyond the dtype's range, i.e. a model already at ~1e38) is not caught here.

Everything the engine and ``collectives.sync_average`` ask (``fold_source``, swaps, the contributor count, the
scale, the fingerprint) runs where the tensors live. The fingerprint has the same bits as the numpy one
(``averaged.fingerprint``), so a checkpoint written from a GPU verifies on any host.

This module imports torch; ``import iteravg`` never imports it (only ``iteravg.torch`` does).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._kernel import segment_fingerprints
from .averaged import FoldResult, Layout, chain_fingerprint, fingerprint, range_bounds
from .partition import Partition, Piece, full_pieces

__all__ = ["TorchAveragedState", "torch_word_sums", "torch_fingerprint", "TORCH_DTYPES"]

#: numpy dtype name <-> torch dtype, for the dtypes a Layout can hold.
TORCH_DTYPES: Dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}

#: The fingerprint's constants (``_foldkernel.c``) as signed int64: torch has no uint64 arithmetic, and two's
#: complement wrapping gives the same bits.
_G = 0x9E3779B97F4A7C15 - (1 << 64)
_M = 0xD6E8FEB86659FD93 - (1 << 64)
_MASK64 = (1 << 64) - 1
#: Words per fingerprint chunk: bounds the temporaries (3 int64 per word) to ~100 MB whatever the model size.
_CHUNK_WORDS = 1 << 22


def torch_word_sums(words: torch.Tensor, start: int = 0) -> Tuple[int, int]:
    """(wrapping sum, xor) of the position-mixed 8-byte words of ``words`` (int64, 1-D), positions from ``start``:
    ``h_i = m ^ (m >>> 32)``, ``m = (w_i ^ (i * G)) * M`` -- ``core._kernel.word_sums`` computed on the device."""
    total, xor = 0, 0
    for lo in range(0, words.numel(), _CHUNK_WORDS):
        w = words[lo:lo + _CHUNK_WORDS]
        h = torch.arange(start + lo, start + lo + w.numel(), dtype=torch.int64, device=w.device)
        h.mul_(_G).bitwise_xor_(w).mul_(_M)
        h.bitwise_xor_(h.bitwise_right_shift(32).bitwise_and_(0xFFFFFFFF))  # logical shift: mask the sign bits
        total = (total + int(h.sum())) & _MASK64
        xor ^= _xor_reduce(h) & _MASK64
    return total, xor


def _xor_reduce(h: torch.Tensor) -> int:
    """XOR of all elements (torch has no xor reduction): halve the tensor until one element is left."""
    acc = 0
    while h.numel() > 1:
        if h.numel() % 2:
            acc ^= int(h[-1])
            h = h[:-1]
        half = h.numel() // 2
        h = h[:half] ^ h[half:]
    if h.numel():
        acc ^= int(h[0])
    return acc


def _buffer_sums(flat: torch.Tensor) -> Tuple[int, int, int]:
    """(sum, xor, byte size) of one contiguous 1-D float buffer, the numpy fingerprint's per-buffer part."""
    nbytes = flat.numel() * flat.element_size()
    if (flat.storage_offset() * flat.element_size()) % 8:  # not on a word boundary: read a copy
        flat = flat.clone()
    per_word = 8 // flat.element_size()
    n8 = flat.numel() // per_word * per_word
    s, x = torch_word_sums(flat[:n8].view(torch.int64)) if n8 else (0, 0)
    if n8 < flat.numel():  # a trailing partial word, zero-padded (little-endian)
        raw = flat[n8:].cpu().numpy().tobytes().ljust(8, b"\0")
        tail = torch.tensor([int.from_bytes(raw, "little") - ((1 << 64) if raw[7] & 0x80 else 0)], dtype=torch.int64)
        ts, tx = torch_word_sums(tail, start=n8 // per_word)
        s, x = (s + ts) & _MASK64, x ^ tx
    return s, x, nbytes


def torch_segment_fingerprints(flat: torch.Tensor, bounds: np.ndarray) -> np.ndarray:
    """``core._kernel.segment_fingerprints`` on the device, with the same bits: per segment ``bounds[j]:bounds[j+1]``
    of a 1-D float tensor, the sums of ``h = mix(e_i, i*G)`` and ``h2 = mix(h, ~(i*G))`` over its elements (element
    bits zero-extended to 64)."""
    nseg = len(bounds) - 1
    out = torch.zeros(max(nseg, 0), 2, dtype=torch.int64, device=flat.device)
    if nseg <= 0 or bounds[-1] == bounds[0]:
        return out.cpu().numpy().view(np.uint64)
    bits = {2: (torch.int16, 0xFFFF), 4: (torch.int32, 0xFFFFFFFF), 8: (torch.int64, None)}[flat.element_size()]
    edges = torch.as_tensor(np.asarray(bounds[1:], dtype=np.int64), device=flat.device)
    lo0, hi0 = int(bounds[0]), int(bounds[-1])
    for lo in range(lo0, hi0, _CHUNK_WORDS):
        hi = min(lo + _CHUNK_WORDS, hi0)
        e = flat[lo:hi].view(bits[0]).to(torch.int64)
        if bits[1] is not None:
            e.bitwise_and_(bits[1])
        c = torch.arange(lo, hi, dtype=torch.int64, device=flat.device).mul_(_G)
        h = _mix(e, c)
        h2 = _mix(h, c.bitwise_not_())
        seg = torch.searchsorted(edges, torch.arange(lo, hi, dtype=torch.int64, device=flat.device), right=True)
        out[:, 0].index_add_(0, seg, h)
        out[:, 1].index_add_(0, seg, h2)
    return out.cpu().numpy().view(np.uint64)


def _mix(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    x = (w ^ c).mul_(_M)
    return x.bitwise_xor_(x.bitwise_right_shift(32).bitwise_and_(0xFFFFFFFF))


def torch_fingerprint(buffers: Sequence[torch.Tensor]) -> np.ndarray:
    """``averaged.fingerprint`` of 1-D contiguous tensors, computed where they live, with the same bits."""
    return chain_fingerprint([_buffer_sums(b) for b in buffers])


class TorchAveragedState:
    """Running average of a torch model's iterates: one flat tensor per dtype group on the parameters' device.

    ``pieces`` (from the torch source) say which part of each layout tensor this rank holds: the whole tensor
    (replicated: DDP, plain modules, FSDP2's buffers), or -- ``sharded`` -- this rank's slice of it: the rows of its
    FSDP2 shard, or an equal slice of a replicated model's state (``sharded=True``; ``core.partition``). Per group the
    buffer is ``[sharded pieces | replicated pieces | contributor slot]``: the shards belong to this rank alone and never
    move until they are gathered; the replicated part is what ``collectives.sync_average`` reduces and fingerprints,
    with the trailing slot that counts contributing ranks (``mark_contribution``). ``source.tensors()`` lists the
    local tensors (or slices) in ``pieces`` order.
    """

    def __init__(self, layout: Layout, device: torch.device, *, pieces: Optional[Sequence[Piece]] = None,
                 partition: Optional[Partition] = None, shapes: Optional[Sequence[Tuple[int, ...]]] = None,
                 check_finite: bool = True) -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.check_finite = bool(check_finite)
        self.refused_nonfinite = 0
        self.partition = partition if partition is not None else \
            Partition(layout, pieces if pieces is not None else full_pieces(layout))
        part = self.partition
        shapes = list(shapes) if shapes is not None else [layout.specs[p[0]].shape for p in part.pieces]
        self._buffers = [torch.zeros(part.buffer_size(g), dtype=TORCH_DTYPES[dt], device=self.device)
                         for g, dt in enumerate(layout.groups)]
        self._views = self._split(self._buffers, shapes)  # per-piece views, shaped like the source's tensors
        self._shapes = shapes
        self._numpy: Optional[List[Optional[np.ndarray]]] = None
        self._checked_from: Optional[Sequence[torch.Tensor]] = None
        self._checked: List[torch.Tensor] = []

    @property
    def partitioned(self) -> bool:
        """Whether this rank holds only shards of some tensors (FSDP2): then snapshots gather them."""
        return self.partition.sharded

    # -- buffers ---------------------------------------------------------------------------------
    def _split(self, buffers: Sequence[torch.Tensor], shapes: Sequence[Tuple[int, ...]]) -> List[torch.Tensor]:
        """Views of flat group buffers, one per piece (pieces order), shaped like the source's tensors."""
        views = []
        for k, shape in enumerate(shapes):
            g, start, stop = self.partition.local_range(k)
            views.append(buffers[g][start:stop].view(shape))
        return views

    def current(self, g: int) -> torch.Tensor:
        """The replicated part of group ``g`` (all of it without sharding): what syncs and fingerprints cover."""
        first = self.partition.replicated_start(g)
        return self._buffers[g][first:first + self.partition.replicated_size(g)]

    def shard(self, g: int) -> torch.Tensor:
        """This rank's sharded part of group ``g`` (empty without sharding)."""
        return self._buffers[g][: self.partition.shard_size(g)]

    def sync_view(self, g: int) -> Optional[np.ndarray]:
        """The replicated part with its trailing slot as a numpy view on CPU -- what numpy communicators (mpi4py,
        Horovod's MXNet binding) move; ``None`` on a GPU, where only a torch communicator moves ``native(g)``."""
        if self.device.type != "cpu":
            return None
        if self._numpy is None:
            self._numpy = [b.numpy() for b in self._buffers]
        return self._numpy[g][self.partition.replicated_start(g):]

    def native(self, g: int) -> torch.Tensor:
        return self._buffers[g][self.partition.replicated_start(g):]

    def named_tensors(self) -> Dict[str, torch.Tensor]:
        """name -> averaged tensor on the device (a view), for replicated states (whole tensors)."""
        if self.partitioned:
            raise ValueError("a sharded average has no whole tensors on one rank; gather it first")
        return {self.layout.specs[p[0]].name: v for p, v in zip(self.partition.pieces, self._views)}

    # -- the update ------------------------------------------------------------------------------
    def fold_source(self, source: Any, alpha: float) -> FoldResult:
        """``avg <- avg + alpha * (x - avg)`` over all tensors in one ``_foreach_lerp_`` (``avg <- x`` when
        ``alpha == 1``); an iterate holding a NaN or inf is refused and leaves the average untouched."""
        xs = source.tensors()
        with torch.no_grad():
            if self.check_finite and not self._all_finite(xs):
                self.refused_nonfinite += 1
                return FoldResult(folded=False, alpha=alpha)
            if alpha == 1.0:
                torch._foreach_copy_(self._views, xs)
            else:
                torch._foreach_lerp_(self._views, xs, float(alpha))
        return FoldResult(folded=True, alpha=alpha)

    def _all_finite(self, xs: Sequence[torch.Tensor]) -> bool:
        """One fused 2-norm per tensor (NaN and inf propagate through it), then a single flag to the host: finite
        norms prove every element finite. Only when a norm is not finite -- a NaN or inf, or a huge finite tensor
        whose sum of squares overflows -- does the exact max-abs decide. (The 2-norm first because PyTorch's CPU
        max-abs norm is ~10x slower than its 2-norm; on CUDA both are one fused kernel.) Empty local shards (FSDP2
        rows that fall on other ranks) are skipped; the filtered list is kept for as long as the source hands over
        the same list."""
        if xs is not self._checked_from:
            self._checked_from = xs
            self._checked = [x for x in xs if x.numel()]
        if not self._checked:
            return True
        if bool(torch.stack(torch._foreach_norm(self._checked, 2)).isfinite().all()):
            return True
        norms = torch._foreach_norm(self._checked, float("inf"))
        return bool(torch.stack(norms).isfinite().all())

    def load_flat(self, group_arrays: Sequence[np.ndarray]) -> None:
        """Replace the average by whole layout-order host arrays (one per dtype group, e.g. from a checkpoint);
        a sharded state keeps its own pieces of them."""
        if len(group_arrays) != len(self.layout.groups):
            raise ValueError(f"expected {len(self.layout.groups)} dtype groups, got {len(group_arrays)}")
        if not self.partitioned:
            for g, arr in enumerate(group_arrays):
                self.current(g).copy_(torch.from_numpy(np.ascontiguousarray(arr)))
            return
        for k, (view, piece) in enumerate(zip(self._views, self.partition.pieces)):
            g, begin = self.partition.global_range(k)
            part = np.ascontiguousarray(group_arrays[g][begin:begin + piece[2] - piece[1]])
            view.copy_(torch.from_numpy(part).view(view.shape))

    def fingerprint(self, word_sums_of: Optional[Sequence[Optional[tuple]]] = None) -> np.ndarray:
        """The 128-bit fingerprint of the average, computed where it lives, with the numpy state's bits. On the CPU
        the buffers are viewed as numpy arrays (no copy) and fingerprinted by the C kernel, ~25x faster than the
        int64 torch ops ``torch_fingerprint`` needs on a device."""
        buffers = [self.current(g) for g in range(len(self.layout.groups))]
        if self.device.type == "cpu":
            return fingerprint([b.detach().numpy() for b in buffers])
        return torch_fingerprint(buffers)

    # -- what the engine asks (swaps, snapshots) -------------------------------------------------
    def host_tensors(self) -> Dict[str, np.ndarray]:
        """name -> host copy of each averaged tensor (one device-to-host copy per dtype group); replicated only."""
        if self.partitioned:
            raise ValueError("a sharded average must be gathered (collectives.gather_average) before it is read")
        hosts = [self.current(g).detach().cpu().numpy() for g in range(len(self.layout.groups))]
        out = {}
        for spec in self.layout.specs:
            g, start = self.layout.offsets[spec.name]
            out[spec.name] = hosts[g][start:start + spec.size].reshape(spec.shape)
        return out

    def replicated_host(self, g: int) -> np.ndarray:
        """The replicated part of group ``g`` on the host (placed into the whole by a gather)."""
        return self.current(g).detach().cpu().numpy()

    def replicated_part(self, buffer: Tuple[Optional[np.ndarray], torch.Tensor], g: int) -> Tuple[Any, torch.Tensor]:
        """The replicated part of a ``new_buffers`` buffer: what is the same model on every rank (a broadcast of
        rank 0's weights must not overwrite other ranks' shards)."""
        a = self.partition.replicated_start(g)
        b = a + self.partition.replicated_size(g)
        return (None if buffer[0] is None else buffer[0][a:b]), buffer[1][a:b]

    def write_full(self, source: Any, groups: Sequence[np.ndarray]) -> None:
        """Whole, layout-order host arrays (a gathered average or training weights) into the replicated model."""
        whole = source.whole_tensors()
        with torch.no_grad():
            for spec, t in zip(self.layout.specs, whole):
                g, start = self.layout.offsets[spec.name]
                t.copy_(torch.from_numpy(np.ascontiguousarray(groups[g][start:start + spec.size])).view(t.shape))

    def read_full(self, source: Any, layout: Layout) -> List[np.ndarray]:
        out = [np.empty(n, dtype=np.dtype(dt)) for dt, n in zip(layout.groups, layout.group_sizes)]
        for spec, t in zip(layout.specs, source.whole_tensors()):
            g, start = layout.offsets[spec.name]
            out[g][start:start + spec.size] = t.detach().reshape(-1).cpu().numpy()
        return out

    def buffer_parts(self, buffers: Sequence[Tuple[Any, torch.Tensor]], g: int) -> Tuple[np.ndarray, np.ndarray]:
        """(sharded part, replicated part) of a ``new_buffers`` buffer on the host, for gathering it."""
        t = buffers[g][1]
        first = self.partition.replicated_start(g)
        return (t[: self.partition.shard_size(g)].detach().cpu().numpy(),
                t[first:first + self.partition.replicated_size(g)].detach().cpu().numpy())

    def params_fingerprint(self, source: Any, shardable: Sequence[bool]) -> np.ndarray:
        """Fingerprint of the model's shardable tensors, whole (are the data-parallel replicas identical?)."""
        return torch_fingerprint([t.detach().reshape(-1) for t, s in zip(source.whole_tensors(), shardable) if s])

    def shard_host(self, g: int) -> np.ndarray:
        """This rank's sharded part of group ``g`` on the host (what a gather sends)."""
        return self.shard(g).detach().cpu().numpy()

    def new_buffers(self) -> List[Tuple[Optional[np.ndarray], torch.Tensor]]:
        """Fresh ``(numpy view or None, tensor)`` buffers shaped like the local groups, on the device."""
        out = []
        for g, dt in enumerate(self.layout.groups):
            t = torch.empty(self.partition.buffer_size(g), dtype=TORCH_DTYPES[dt], device=self.device)
            out.append((t.numpy() if self.device.type == "cpu" else None, t))
        return out

    def read_params(self, source: Any, buffers: Sequence[Tuple[Any, torch.Tensor]]) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self._split([b[1] for b in buffers], self._shapes), source.tensors())

    def write_params(self, source: Any, buffers: Optional[Sequence[Tuple[Any, torch.Tensor]]] = None) -> None:
        views = self._views if buffers is None else self._split([b[1] for b in buffers], self._shapes)
        with torch.no_grad():
            torch._foreach_copy_(source.writable_tensors(), views)

    # -- what ``collectives.sync_average`` asks --------------------------------------------------
    def mark_contribution(self, g: int, has_data: bool) -> None:
        buf = self.native(g)
        if has_data:
            buf[-1] = 1
        else:
            buf.zero_()

    def contributors(self, g: int) -> int:
        return int(round(float(self.native(g)[-1])))

    def scale(self, g: int, factor: float) -> None:
        """``avg *= factor`` (half precision is computed in float32 and rounded once, as the numpy state does)."""
        self.current(g).mul_(factor)
        return None

    def tensor_fingerprints(self, g: int, ranges: Sequence[Tuple[int, int]]) -> np.ndarray:
        """``(len(ranges), 2)`` uint64 fingerprints of adjacent ranges of ``current(g)``, computed where it lives: on
        the CPU by the C kernel on a zero-copy numpy view (the int64 torch ops cost ~30x a raw allreduce there)."""
        if self.device.type == "cpu":
            return segment_fingerprints(self.current(g).detach().numpy(), range_bounds(ranges))
        return torch_segment_fingerprints(self.current(g), range_bounds(ranges))

    def scale_range(self, g: int, a: int, b: int, factor: float) -> None:
        self.current(g)[a:b].mul_(factor)

    def flip_lowest_bit(self) -> None:
        """Testing only (``ITERAVG_FAULT=diverge-after-allreduce``)."""
        flat = self.current(0)
        flat[:1].view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]).bitwise_xor_(1)
