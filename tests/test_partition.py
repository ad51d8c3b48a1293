"""``core.partition``: equal slices cover every shardable element exactly once, and the pieces of all ranks
assemble back into the whole; the sharded numpy state folds like the unsharded one, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import iteravg
from iteravg.core.averaged import Layout, TensorSpec
from iteravg.core.partition import Partition, assemble_group, equal_slices
from iteravg.core.sharded_state import ShardedState


def layout(rng: np.random.Generator) -> Layout:
    dts = ["float32", "float16", "float64"]
    specs = [TensorSpec(f"t{i}", tuple(int(d) for d in rng.integers(0, 6, size=rng.integers(0, 3))),
                        dts[int(rng.integers(0, 3))]) for i in range(int(rng.integers(1, 12)))]
    return Layout(tuple(specs))


@pytest.mark.parametrize("seed", range(40))
def test_equal_slices_cover_every_element_once_and_assemble(seed):
    rng = np.random.default_rng(seed)
    lay = layout(rng)
    shardable = [bool(rng.integers(0, 2)) for _ in lay.specs]
    world = int(rng.integers(1, 6))
    parts = [Partition(lay, equal_slices(lay, shardable, r, world), model_sharded=False) for r in range(world)]
    for g, (dt, n) in enumerate(zip(lay.groups, lay.group_sizes)):
        hits = np.zeros(n, dtype=np.int64)
        total = 0
        for part in parts:
            for k, (i, a, b, sharded) in enumerate(part.pieces):
                if lay.offsets[lay.specs[i].name][0] != g or not sharded:
                    continue
                _g, begin = part.global_range(k)
                hits[begin:begin + b - a] += 1
                total += b - a
        flags = np.zeros(n, dtype=bool)
        for spec, s in zip(lay.specs, shardable):
            gg, start = lay.offsets[spec.name]
            if gg == g and s:
                flags[start:start + spec.size] = True
        assert (hits[flags] == 1).all() and (hits[~flags] == 0).all()
        chunk = -(-int(flags.sum()) // world)  # equal, padded slices: ceil(S / N) each, the tail ones shorter
        assert [part.shard_size(g) for part in parts] == \
            [max(0, min(chunk, int(flags.sum()) - r * chunk)) for r in range(world)]
        assert total == int(flags.sum())
        # every rank's buffers laid out by its partition -> the whole again
        whole = np.arange(n, dtype=np.float64).astype(dt)
        shards, tables = [], []
        for part in parts:
            buf = np.zeros(part.buffer_size(g), dtype=dt)
            for k, (i, a, b, sharded) in enumerate(part.pieces):
                gg, start, stop = part.local_range(k)
                if gg == g:
                    _g, begin = part.global_range(k)
                    buf[start:stop] = whole[begin:begin + b - a]
            first = part.replicated_start(g)
            shards.append(buf[:part.shard_size(g)])
            tables.append(part.table())
        out = np.full(n, -1, dtype=dt)
        mine = parts[0]
        rep = np.zeros(mine.buffer_size(g), dtype=dt)
        for k, (i, a, b, sharded) in enumerate(mine.pieces):
            gg, start, stop = mine.local_range(k)
            if gg == g and not sharded:
                rep[start:stop] = whole[lay.offsets[lay.specs[i].name][1]:][:b - a]
        first = mine.replicated_start(g)
        assemble_group(mine, g, rep[first:first + mine.replicated_size(g)], tables, shards, out)
        assert out.tobytes() == whole.tobytes()


def test_sharded_state_folds_its_slice_with_the_unsharded_bits():
    """Every rank's slice of a ShardedState, folded from the same iterates, equals the same elements of an
    unsharded AveragedState's average; an iterate with an overflowing value is refused before anything moves."""
    rng = np.random.default_rng(3)
    params = {"w": np.zeros((7, 5), np.float32), "b": np.zeros(5, np.float32), "h": np.zeros((3, 3), np.float16),
              "d": np.zeros(4, np.float64)}
    src = iteravg.ArraySource(params, per_rank=["b"])
    whole = iteravg.Averager(iteravg.Schedule(eta=1.5), comm="local")
    whole.schedule.averaging_started = True
    states = [ShardedState(src.layout, Partition(src.layout, equal_slices(src.layout, src.shardable, r, 3),
                                                 model_sharded=False)) for r in range(3)]
    for k in range(6):
        for v in params.values():
            v[...] = (rng.standard_normal(v.shape) + k).astype(v.dtype)
        alpha = 1.0 if k == 0 else (1.5 + 1) / (1.5 + k + 1)  # the schedule's weight of the (k+1)-th iterate
        whole.fold(src)
        for st in states:
            assert st.fold_source(src, alpha).folded
    ref = np.concatenate([v.astype(np.float64).ravel() for v in whole.averaged().values()])
    for st in states:
        shards = [st.shard_host(g) for g in range(3)]
        for k, (i, a, b, sharded) in enumerate(st.partition.pieces):
            g, start, stop = st.partition.local_range(k)
            name = src.layout.specs[i].name
            expect = whole.averaged()[name].reshape(-1)[a:b]
            got = st._buffers[g][0][start:stop]  # noqa: SLF001 -- the test reads the raw buffer
            assert got.tobytes() == expect.tobytes(), name
    params["h"][0, 0] = np.float16(40000.0)  # finite, but |x| >= 2^15: x - avg could overflow in float16
    refused = [st.fold_source(src, 0.5).folded for st in states]
    assert refused.count(False) == 1 and sum(st.refused_nonfinite for st in states) == 1
    assert ref.size
