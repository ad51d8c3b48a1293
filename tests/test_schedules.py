"""Schedules: argument validation (ValueError naming the argument), metric rules, state round trips."""

import math

import pytest

import iteravg.mx as im
from iteravg.core.schedules import AlphaSuffixSchedule, NTASchedule, Schedule


@pytest.mark.parametrize("make,arg", [
    (lambda: AlphaSuffixSchedule(10, alpha=1.5), "alpha"),
    (lambda: AlphaSuffixSchedule(10, alpha=-0.1), "alpha"),
    (lambda: NTASchedule(10, fallback_alpha=2), "fallback_alpha"),
    (lambda: NTASchedule(-1), "epochs"),
    (lambda: AlphaSuffixSchedule(3.5), "epochs"),
    (lambda: Schedule(eta=-1), "eta"),
    (lambda: Schedule(eta=float("nan")), "eta"),
    (lambda: NTASchedule(10, n=2.5), "n"),
    (lambda: im.NTA(epochs=10, fallback_alpha=-0.5), "fallback_alpha"),
    (lambda: im.Alpha_Suffix(epochs=10, alpha=7), "alpha"),
    (lambda: im.IterationAveragingStrategy(eta=-3), "eta"),
    (lambda: im.NTA(epochs=-5), "epochs"),
    (lambda: im.NTA(epochs=5, metric_reduce="median"), "metric_reduce"),
    (lambda: im.NTA(epochs=5, sync="gossip"), "sync"),
    (lambda: im.NTA(epochs=5, sync_every_batches=-1), "sync_every_batches"),
    (lambda: im.ModelIterationAveraging(object()), "avg_strategy"),
    (lambda: im.ModelIterationAveraging(im.NTA(epochs=3), resume=True), "checkpoint_dir"),
])
def test_invalid_arguments_raise_value_error_naming_them(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "x"])
def test_non_finite_metric_is_refused_when_the_decision_needs_it(bad):
    s = NTASchedule(10, n=2)
    with pytest.raises(ValueError, match="metric"):
        s.update_trigger(bad, epoch=1)
    with pytest.raises(ValueError, match="metric"):
        im.NTA(epochs=10).update_average_trigger(metric=bad, epoch=1)


def test_metric_not_needed_is_not_checked():
    NTASchedule(10, n=0).update_trigger(float("nan"), epoch=1)  # n <= 0: no metric trigger
    s = NTASchedule(10, n=1, fallback_alpha=0.5)
    s.update_trigger(None, epoch=5)  # fallback epoch: started before the metric is looked at
    assert s.averaging_started and s.trigger_epoch == 5
    s.update_trigger(float("nan"), epoch=6)  # already started


def drive(s, metrics, start=0):
    out = []
    for e, m in enumerate(metrics[start:], start=start):
        s.update_trigger(m, epoch=e + 1)
        if s.averaging_started:
            s.next_weight()
        out.append((s.averaging_started, s.average_counter))
    return out


@pytest.mark.parametrize("make", [lambda: NTASchedule(12, n=2, eta=0.5), lambda: AlphaSuffixSchedule(12, 0.4, eta=2)])
def test_state_dict_round_trip_continues_like_an_uninterrupted_run(make):
    metrics = [5, 4, 3.5, 3.2, 3.3, 3.1, 3.4, 3.0, 2.9, 3.5, 2.8, 2.7]
    full = drive(make(), metrics)
    first = make()
    head = drive(first, metrics[:6])
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert head + drive(resumed, metrics, start=6) == full


def test_loading_another_kind_of_state_is_refused():
    with pytest.raises(ValueError, match="nta"):
        AlphaSuffixSchedule(10).load_state_dict(NTASchedule(10).state_dict())


def test_weights_are_polynomial_decay():
    s = Schedule(eta=2.0)
    assert [s.next_weight() for _ in range(4)] == [1.0, 3 / 4, 3 / 5, 3 / 6]
    assert math.isclose(Schedule(0).peek_weight(), 1.0)
