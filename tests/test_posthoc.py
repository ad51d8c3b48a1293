"""Post-hoc averaging windows (``Averager(..., posthoc=True)``) on one process: the average rebuilt from any start
equals a real run of the schedule whose trigger fired there (``AlphaSuffixSchedule`` with the matching alpha, NTA on a
metric sequence, ``Schedule`` started up front), for each way epoch ends fold; the schedule's own start gives its
own average; the sums and prefixes survive snapshots and resumes bit for bit; ``posthoc_keep`` bounds the store;
bad arguments name themselves. The 2-rank form: ``tests/test_posthoc_multirank.py``."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import iteravg
from iteravg import checkpoint
from iteravg.core import posthoc as ph
from iteravg.core.records import describe_snapshot
from iteravg.core.tensorfile import load_tensors

EPOCHS, STEPS = 8, 5
SHAPES = {"w": ((30, 7), np.float32), "b": ((7,), np.float32), "h": ((5,), np.float64), "e": ((4, 3), np.float16)}
TOL = {np.float32: 1e-5, np.float64: 1e-12, np.float16: 1e-2}  # a float16 running mean drifts by ~k ulps


def model() -> dict:
    return {k: np.zeros(shape, dtype=dt) for k, (shape, dt) in SHAPES.items()}


def set_iterate(params: dict, epoch: int, step: int) -> None:
    rng = np.random.default_rng([epoch, step])
    for v in params.values():
        v[...] = (rng.standard_normal(v.shape) * 0.3 + np.sin(epoch + step / 7.0)).astype(v.dtype)


def train(avg: iteravg.Averager, epochs=range(EPOCHS), metrics=None, fold=True, ckpt=None, params=None) -> dict:
    """The engine's loop (``step`` per batch, ``epoch_end`` per epoch), with a snapshot per epoch into ``ckpt``."""
    params = model() if params is None else params
    for epoch in epochs:
        for step in range(STEPS):
            set_iterate(params, epoch, step)
            avg.step(params)
        avg.epoch_end(params, metric=None if metrics is None else metrics[epoch], epoch=epoch + 1, fold=fold)
        if ckpt is not None:
            avg.save(ckpt, epoch=epoch + 1)
    return params


def suffix_started_at(e: int) -> iteravg.Schedule:
    """A schedule whose trigger fires at epoch ``e``'s end (``e = 0``: averaging from the first batch)."""
    if e == 0:
        s = iteravg.Schedule()
        s.start(0)
        return s
    return iteravg.AlphaSuffixSchedule(epochs=EPOCHS, alpha=1 - e / EPOCHS)


def assert_close(got: dict, want: dict) -> None:
    """Within the reference run's own rounding: relative to each tensor's scale, by dtype."""
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        scale = float(np.max(np.abs(v.astype(np.float64))))
        err = float(np.max(np.abs(got[k].astype(np.float64) - v.astype(np.float64))))
        assert err <= TOL[v.dtype.type] * scale, (k, err, scale)


@pytest.mark.parametrize("fold", [True, False], ids=["epoch-end-recount", "no-epoch-end-fold"])
def test_every_start_equals_a_run_started_there(fold):
    metrics = [5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 3.0, 2.9]  # NTA(n=1): 3.2 > min(5, 4, 3) starts it at 5
    avg = iteravg.Averager(iteravg.NTASchedule(epochs=EPOCHS, n=1), comm="local", posthoc=True)
    train(avg, metrics=metrics, fold=fold)
    assert avg.schedule.trigger_epoch == 5
    starts = dict(avg.posthoc_starts())
    assert sorted(starts) == list(range(EPOCHS + (1 if fold else 0)))  # "none": the last epoch holds no iterate
    for e in sorted(starts):
        ref = iteravg.Averager(suffix_started_at(e), comm="local")
        train(ref, fold=fold)
        assert ref.schedule.trigger_epoch == e and ref.average_counter == starts[e], e
        assert_close(avg.posthoc_average(e), ref.averaged())
    assert_close(avg.posthoc_average(5), avg.averaged())  # the schedule's own start: its own average


def test_callback_style_epoch_ends_without_recount():
    """``recount_epoch_end=False`` (the MXNet callback): only the start epoch's end is folded -- ``"first"``."""
    def loop(avg, posthoc):
        params = model()
        for epoch in range(EPOCHS):
            for step in range(STEPS):
                set_iterate(params, epoch, step)
                avg.step(params)
            started_before = avg.averaging_started
            avg.update_trigger(None, epoch + 1)
            if avg.averaging_started and not started_before:
                avg.fold(params)
            if posthoc:
                avg.posthoc_epoch_end(params, epoch + 1, epoch_end_folds="first")
            avg.sync()

    avg = iteravg.Averager(iteravg.AlphaSuffixSchedule(epochs=EPOCHS, alpha=0.5), comm="local", posthoc=True)
    loop(avg, True)
    for e, k in avg.posthoc_starts():
        ref = iteravg.Averager(suffix_started_at(e), comm="local")
        loop(ref, False)
        assert ref.average_counter == k, e
        assert_close(avg.posthoc_average(e), ref.averaged())
    assert_close(avg.posthoc_average(avg.schedule.trigger_epoch), avg.averaged())


def test_snapshots_resume_bit_for_bit_and_keep_bounds_the_store(tmp_path):
    full = iteravg.Averager(iteravg.AlphaSuffixSchedule(epochs=EPOCHS, alpha=0.5), comm="local", posthoc=True)
    train(full, ckpt=tmp_path / "full")
    first = iteravg.Averager(iteravg.AlphaSuffixSchedule(epochs=EPOCHS, alpha=0.5), comm="local", posthoc=True)
    train(first, epochs=range(3), ckpt=tmp_path / "part")
    resumed = iteravg.Averager(iteravg.AlphaSuffixSchedule(epochs=EPOCHS, alpha=0.5), comm="local", posthoc=True)
    resumed.load(tmp_path / "part", model())
    train(resumed, epochs=range(3, EPOCHS), ckpt=tmp_path / "part")
    assert resumed.posthoc_starts() == full.posthoc_starts()
    for e, _ in full.posthoc_starts():
        a, b = full.posthoc_average(e), resumed.posthoc_average(e)
        assert all(a[k].tobytes() == b[k].tobytes() for k in a), e
    sums = [load_tensors(checkpoint.resolve_snapshot(tmp_path / d) / ph.POSTHOC_FILE) for d in ("full", "part")]
    assert all(sums[0][k].tobytes() == sums[1][k].tobytes() for k in sums[0])
    # The framework-free reader (behind `iteravg posthoc`) rebuilds the same bits from disk alone.
    run = ph.read_run(tmp_path / "full")
    assert run.candidates() == full.posthoc_starts() and run.schedule_start == 4
    for e, _ in run.candidates():
        a, b = full.posthoc_average(e), run.average(e)
        assert all(a[k].tobytes() == b[k].tobytes() for k in a), e
    # Disk per epoch: one prefix snapshot of 8 bytes per parameter (+ its JSON record).
    params = sum(int(np.prod(s)) for s, _ in SHAPES.values())
    size = (tmp_path / "full" / "posthoc" / "prefix-000005" / ph.PREFIX_FILE).stat().st_size
    assert 8 * params <= size <= 8 * params + 1024
    # posthoc_keep=3: the newest 3 prefixes, on disk and in memory; start 0 needs none.
    kept = iteravg.Averager(iteravg.AlphaSuffixSchedule(epochs=EPOCHS, alpha=0.5), comm="local", posthoc=True,
                            posthoc_keep=3)
    train(kept, ckpt=tmp_path / "kept")
    assert [e for e, _ in kept.posthoc_starts()] == [0, 6, 7, 8]
    assert sorted(p.name for p in checkpoint.list_snapshots(tmp_path / "kept" / "posthoc")) == \
        ["prefix-000006", "prefix-000007", "prefix-000008"]
    with pytest.raises(ValueError, match=r"start_epoch 3 has no post-hoc prefix; the starts kept are \[0, 6, 7, 8\]"):
        kept.posthoc_average(3)
    # A fresh run into the same directory: the store then holds its prefixes only (names are never reused, and the
    # earlier run's prefix-000006..8 are gone).
    again = iteravg.Averager(iteravg.AlphaSuffixSchedule(epochs=EPOCHS, alpha=0.5), comm="local", posthoc=True)
    train(again, epochs=range(2), ckpt=tmp_path / "kept")
    assert sorted(p.name for p in checkpoint.list_snapshots(tmp_path / "kept" / "posthoc")) == \
        ["prefix-000001.1", "prefix-000002.1"]


def test_saving_elsewhere_copies_the_prefixes_and_inspect_verifies_them(tmp_path):
    avg = iteravg.Averager(iteravg.AlphaSuffixSchedule(epochs=EPOCHS, alpha=0.5), comm="local", posthoc=True)
    params = train(avg, epochs=range(4), ckpt=tmp_path / "a")
    train(avg, epochs=range(4, EPOCHS), params=params)
    avg.save(tmp_path / "b", epoch=EPOCHS)  # prefixes 1-4 live in a/posthoc: copied into b/posthoc
    run = ph.read_run(tmp_path / "b")
    assert [e for e, _ in run.candidates()] == list(range(EPOCHS + 1))
    for e in (2, 6):
        a, b = avg.posthoc_average(e), run.average(e)
        assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    summary, problems = describe_snapshot(tmp_path / "b")
    assert not problems and summary["posthoc_starts"] == list(range(EPOCHS + 1))
    damaged = tmp_path / "b" / "posthoc" / "prefix-000003" / ph.PREFIX_FILE
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"\0" * 8)
    summary, problems = describe_snapshot(tmp_path / "b")
    assert len(problems) == 1 and "epoch 3" in problems[0] and "corrupted" in problems[0]
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        ph.read_run(tmp_path / "b").average(3)


def test_nonfinite_iterates_are_left_out_like_the_fold_does(caplog):
    avg = iteravg.Averager(iteravg.AlphaSuffixSchedule(epochs=4, alpha=0.5), comm="local", posthoc=True)
    params = model()
    with caplog.at_level(logging.WARNING, logger="iteravg"):
        for epoch in range(4):
            for step in range(STEPS):
                set_iterate(params, epoch, step)
                if step == 1:
                    params["w"][0, 0] = np.inf if epoch < 2 else np.nan  # before and after the start
                avg.step(params)
            avg.epoch_end(params, epoch=epoch + 1)
    assert "left out of the post-hoc sums" in caplog.text
    starts = dict(avg.posthoc_starts())
    assert starts[0] == 4 * (STEPS - 1) + 4 and starts[2] == avg.average_counter
    assert all(np.isfinite(v).all() for v in avg.posthoc_average(0).values())


def test_bad_arguments_name_themselves(tmp_path):
    for kwargs, needle in [(dict(posthoc="yes"), "posthoc must be True or False"),
                           (dict(posthoc=True, posthoc_keep=0), "posthoc_keep must be None"),
                           (dict(posthoc=True, sharded=True), "posthoc=True does not support sharded=True")]:
        with pytest.raises(ValueError, match=needle):
            iteravg.Averager(iteravg.NTASchedule(epochs=3), comm="local", **kwargs)
    for schedule in (iteravg.EMASchedule(0.9), iteravg.EveryNSteps(iteravg.NTASchedule(epochs=3), 2)):
        with pytest.raises(ValueError, match="posthoc=True rebuilds suffix averages"):
            iteravg.Averager(schedule, comm="local", posthoc=True)
    plain = iteravg.Averager(iteravg.NTASchedule(epochs=3), comm="local")
    with pytest.raises(ValueError, match="posthoc_average needs Averager"):
        plain.posthoc_average(0)
    avg = iteravg.Averager(iteravg.NTASchedule(epochs=3), comm="local", posthoc=True)
    params = model()
    avg.step(params)
    with pytest.raises(ValueError, match="needs its checkpoint directory"):
        avg.snapshot_contents()
    with pytest.raises(ValueError, match="epoch_end_folds must be one of"):
        avg.posthoc_epoch_end(params, 1, epoch_end_folds="sometimes")
    plain.save(tmp_path / "plain", epoch=1)
    with pytest.raises(checkpoint.CheckpointError, match="trained without posthoc=True"):
        ph.read_run(tmp_path / "plain")


def test_resuming_a_checkpoint_without_sums_starts_them_at_its_epoch(tmp_path, caplog):
    plain = iteravg.Averager(iteravg.AlphaSuffixSchedule(epochs=EPOCHS, alpha=0.5), comm="local")
    train(plain, epochs=range(3), ckpt=tmp_path / "ck")
    avg = iteravg.Averager(iteravg.AlphaSuffixSchedule(epochs=EPOCHS, alpha=0.5), comm="local", posthoc=True)
    with caplog.at_level(logging.WARNING, logger="iteravg"):
        avg.load(tmp_path / "ck", model())
    assert "post-hoc averages start at epoch 3 at the earliest" in caplog.text
    train(avg, epochs=range(3, EPOCHS))
    assert [e for e, _ in avg.posthoc_starts()] == list(range(3, EPOCHS + 1))
    ref = iteravg.Averager(suffix_started_at(4), comm="local")
    train(ref)
    assert_close(avg.posthoc_average(4), ref.averaged())
