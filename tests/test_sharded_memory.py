"""Memory of ``sharded=True``: a swap or a save gathers the average with one transient copy of the model, not two.

The gather (``collectives.gather_average``) allgathers every rank's slice; when the slices stacked in rank order are
the dtype group itself (``equal_slices`` of a group without per-rank tensors, ``partition.stacked_in_order``), the
allgather's result is returned as it is instead of being assembled into a second buffer, and a save fingerprints
the gathered buffers without flattening them into a third. Measured with tracemalloc (numpy reports its arrays)
in a real ``mpirun`` job; the pure layout logic is checked against ``assemble_group`` on one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "multirank"))
from launch import mpirun, run  # noqa: E402
import worker_sharded_memory as W  # noqa: E402

import iteravg  # noqa: E402
from iteravg.core.averaged import Layout, TensorSpec  # noqa: E402
from iteravg.core.partition import Partition, assemble_group, equal_slices, stacked_in_order  # noqa: E402

WORKER = "tests/multirank/worker_sharded_memory.py"


def gather_like_allgather(layout: Layout, shardable: list, size: int, data: list) -> list:
    """(partitions, tables, rows per group) as ``gather_average`` sees them: every rank's sharded part of each group,
    padded to the longest and stacked in rank order."""
    parts = [Partition(layout, equal_slices(layout, shardable, r, size), model_sharded=False) for r in range(size)]
    tables = [p.table() for p in parts]
    rows = []
    for g in range(len(layout.groups)):
        shards = []
        for p in parts:
            pieces = [p.global_range(k) + (p.pieces[k][2] - p.pieces[k][1],) for k in range(len(p.pieces))
                      if p.pieces[k][3] and p.global_range(k)[0] == g]
            shards.append(np.concatenate([data[g][b:b + n] for _g, b, n in pieces] + [data[g][:0]]))
        width = max(s.size for s in shards)
        stacked = np.zeros((size, width), dtype=data[g].dtype)
        for r, s in enumerate(shards):
            stacked[r, :s.size] = s
        rows.append((shards, width, stacked))
    return parts, tables, rows


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("per_rank", [None, "b1", "h0"])
def test_stacked_slices_are_the_group_exactly_when_no_per_rank_tensor_is_in_it(size, per_rank):
    specs = (TensorSpec("w0", (7, 5), "float32"), TensorSpec("b1", (3,), "float32"),
             TensorSpec("h0", (4, 3), "float16"),
             TensorSpec("w2", (11,), "float32"), TensorSpec("h1", (5,), "float16"), TensorSpec("s", (), "float32"))
    layout = Layout(specs)
    shardable = [s.name != per_rank for s in specs]
    rng = np.random.default_rng(size)
    data = [rng.standard_normal(n).astype(dt) for dt, n in zip(layout.groups, layout.group_sizes)]
    parts, tables, rows = gather_like_allgather(layout, shardable, size, data)
    for g, (shards, width, stacked) in enumerate(rows):
        holds_per_rank = per_rank is not None and layout.offsets[per_rank][0] == g
        for own in parts:
            assert stacked_in_order(own, g, tables, width) == (not holds_per_rank)
            full = np.empty_like(data[g])
            assemble_group(own, g, _replicated(own, g, data[g]), tables, shards, full)
            assert full.tobytes() == data[g].tobytes()
            if not holds_per_rank:
                assert stacked.reshape(-1)[:layout.group_sizes[g]].tobytes() == data[g].tobytes()


def _replicated(own: Partition, g: int, whole: np.ndarray) -> np.ndarray:
    """``own``'s replicated part of group ``g`` (its whole tensors in piece order), taken from the whole buffer."""
    out = [whole[own.global_range(k)[1]:own.global_range(k)[1] + b - a] for k, (_i, a, b, s) in enumerate(own.pieces)
           if not s and own.global_range(k)[0] == g]
    return np.concatenate(out + [whole[:0]])


def test_row_sharded_pieces_are_not_taken_for_layout_order():
    """FSDP2-like pieces (each tensor split by rows over the ranks) interleave the ranks: never stacked in order."""
    layout = Layout((TensorSpec("a", (4, 3), "float32"), TensorSpec("b", (4, 2), "float32")))
    tables = [np.array([(0, 6 * r, 6 * r + 6, True), (1, 4 * r, 4 * r + 4, True)], dtype=np.int64) for r in range(2)]
    own = Partition(layout, [tuple(row) for row in tables[0]])
    assert not stacked_in_order(own, 0, tables, 10)


def reference_digest() -> str:
    """The same iterates averaged on one process (unsharded): what every rank's swap must show, bit for bit."""
    params = W.model()
    schedule = iteravg.Schedule()
    schedule.averaging_started = True
    avg = iteravg.Averager(schedule, comm="local")
    for _ in W.iterates(params):
        avg.step(params)
    avg.epoch_end(params, epoch=1)
    return W.digest(avg.averaged())


@pytest.mark.multirank
@pytest.mark.timeout(600)
@pytest.mark.parametrize("per_rank", [False, True])
def test_swap_and_save_of_a_sharded_average_hold_one_transient_copy(tmp_path, per_rank):
    n = 3
    run(mpirun(n, [WORKER, str(tmp_path)] + (["--per-rank"] if per_rank else [])), env={"ITERAVG_COMM": "mpi"},
        timeout=240)
    res = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(n)]
    assert all(r["partitioned"] and r["restored"] for r in res)
    assert {r["swapped"] for r in res} == {reference_digest()}
    assert res[0]["model"] // 4 % n == 0  # equal slices: no rank pads a copy of its slice for the allgather
    for r in res:
        slack = (4 << 20) / r["model"]  # fixed costs: fold-plan scratch (256 KiB each), 1 MiB reads of the checksum
        assert r["steady"] <= 1 / n + slack, r
        # swap: this rank's slice of the training weights (1/n) + the gathered average (1 copy; with a per-rank tensor
        # in the group, the allgather's rows and the assembled whole: 2). It used to be 2 + 2/n either way.
        copies = 2 if per_rank else 1
        assert r["swap_peak"] <= copies + 1 / n + slack, r
        # save: the gathered average only, fingerprinted in place on rank 0 (it used to be flattened into a copy)
        assert r["save_peak"] <= copies + slack, r
