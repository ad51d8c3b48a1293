"""The report a user sees: the plot's data (two curves, the averaged one from the trigger on, in the table's MSE
units), its CSV, integer epoch ticks, the legend outside the data, trigger and resume marked; the table's units,
counter, trigger epoch and hint. One real (single-process, tiny) ``iteravg train`` checks the numbers end to end
against an independent evaluation of the saved models."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from iteravg.mx import report

pytestmark = pytest.mark.filterwarnings("ignore")


def history(n: int = 8, trigger: int = 3, resumed_after: int = 0) -> list:
    rows = []
    for e in range(1, n + 1):
        row = {"epoch": e, "train_loss": 0.5 / e, "val_loss": 0.4, "val_on_average": e > trigger,
               "val_mse_last": 1.0 + 0.1 * e, "val_mse_avg": 0.9 - 0.01 * e if e >= trigger else None,
               "iterates_averaged": max(0, e - trigger + 1) * 10}
        if resumed_after and e == resumed_after + 1:
            row["resumed"] = {"after_epoch": resumed_after, "world_size": 3, "was_world_size": 2,
                              "val_mse_last": 7.0, "val_mse_avg": 6.0 if resumed_after >= trigger else None}
        rows.append(row)
    if resumed_after:  # the resumed epoch's snapshot was written before its values were computed
        for key in ("val_mse_last", "val_mse_avg", "iterates_averaged"):
            rows[resumed_after - 1].pop(key)
    return rows


def test_curves_from_history_fill_the_resumed_epoch_and_fall_back_for_old_rows():
    c = report.curves(history(8, trigger=3, resumed_after=5), trigger_epoch=3)
    assert c.epochs == list(range(1, 9))
    assert c.train_mse == pytest.approx([1.0 / e for e in range(1, 9)])  # 2 * L2Loss = MSE
    assert [math.isnan(v) for v in c.averaged] == [True, True] + [False] * 6
    assert c.last[4] == 7.0 and c.averaged[4] == 6.0  # re-evaluated at the resume
    assert [(r.after_epoch, r.label()) for r in c.resumes] == [(5, "resumed after epoch 5 (2 \u2192 3 ranks)")]
    old = [{"epoch": 1, "train_loss": 0.3, "val_loss": 0.25, "val_on_average": False},
           {"epoch": 2, "train_loss": 0.3, "val_loss": 0.2, "val_on_average": True}]
    c = report.curves(old, trigger_epoch=1)
    assert c.last[0] == 0.5 and math.isnan(c.last[1]) and math.isnan(c.averaged[0]) and c.averaged[1] == 0.4


def test_csv_holds_the_plot_data(tmp_path):
    c = report.curves(history(6, trigger=4, resumed_after=2), trigger_epoch=4)
    with open(report.write_csv(tmp_path, c), newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(report.CSV_COLUMNS) and len(got) == 6
    assert [float(r["val_mse_last_iterate"]) for r in got] == c.last
    assert [r["val_mse_averaged"] for r in got][:3] == ["", "", ""]
    assert [float(r["val_mse_averaged"]) for r in got[3:]] == c.averaged[3:]
    assert "averaging starts (epoch 4)" in got[3]["note"] and "resumed after epoch 2" in got[1]["note"]


def _lines(fig) -> dict:
    return {line.get_gid(): line for line in fig.axes[0].get_lines() if line.get_gid()}


@pytest.mark.parametrize("n,trigger", [(5, 5), (40, 7), (3, 0)])
def test_figure_two_curves_integer_ticks_legend_outside(n, trigger):
    import matplotlib.pyplot as plt

    c = report.curves(history(n, trigger=max(trigger, 1)), trigger_epoch=trigger)
    fig = report.figure(c, "t")
    try:
        lines = _lines(fig)
        assert set(lines) == {"last", "averaged"}
        np.testing.assert_array_equal(lines["last"].get_xdata(), range(1, n + 1))
        np.testing.assert_array_equal(lines["last"].get_ydata(), c.last)
        avg_y = np.asarray(lines["averaged"].get_ydata(), float)
        first = int(np.flatnonzero(~np.isnan(avg_y))[0]) + 1
        assert first == max(trigger, 1)  # the averaged curve starts at the trigger
        fig.canvas.draw()
        ax = fig.axes[0]
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        renderer = fig.canvas.get_renderer()
        legend_box = fig.legends[0].get_window_extent(renderer)
        assert not legend_box.overlaps(ax.get_window_extent(renderer))  # outside the data
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert any(lbl.startswith("averaging starts") or "first batch" in lbl for lbl in labels)
        assert "MSE" in ax.get_ylabel() and "standardised" in ax.get_ylabel()
    finally:
        plt.close(fig)


def test_figure_marks_resume_and_a_run_that_never_averaged(tmp_path):
    import matplotlib.pyplot as plt

    c = report.curves(history(8, trigger=3, resumed_after=5), trigger_epoch=3)
    fig = report.figure(c, "t")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    resume = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("resumed")]
    assert len(resume) == 1 and list(resume[0].get_xdata()) == [5, 5] and "2 \u2192 3 ranks" in resume[0].get_label()
    plt.close(fig)
    rows = [{"epoch": e, "train_loss": 0.5, "val_mse_last": 1.0, "val_mse_avg": None} for e in (1, 2)]
    fig = report.figure(report.curves(rows, None), "t")
    assert set(_lines(fig)) == {"last"}
    assert "averaging never started" in [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)
    assert report.plot_losses(tmp_path, c, "t").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert labels


def test_table_states_units_counter_trigger_and_hints():
    same = {"test_mse": 0.5, "val_mse": 0.6}
    text = report.table({"last iterate": same, "averaged": dict(same)}, trigger_epoch=5, average_counter=1,
                        epochs_done=5, more_averaging="use --fallback-alpha 0.5")
    assert "MSE on standardised targets" in text and "after epoch 5 of 5" in text and "1 iterate averaged" in text
    assert text.splitlines()[-1].startswith("hint: the average holds only the last iterate")
    assert "--fallback-alpha 0.5" in text
    text = report.table({"last iterate": same, "averaged": {"test_mse": 0.4, "val_mse": 0.5}}, trigger_epoch=7,
                        average_counter=1123, epochs_done=40, more_averaging="x")
    assert "1123 iterates averaged" in text and "after epoch 7 of 40" in text and "hint" not in text
    rows = [ln.split() for ln in text.splitlines()[2:4]]
    assert rows == [["last", "iterate", "0.50000", "0.60000"], ["averaged", "0.40000", "0.50000"]]
    text = report.table({"last iterate": same}, trigger_epoch=None, epochs_done=3, more_averaging="train longer")
    assert "averaging never started" in text and "hint: to average, train longer" in text
    assert "from the first batch" in report.table({"last iterate": same, "averaged": same}, trigger_epoch=0,
                                                  average_counter=50, epochs_done=2)


def test_cli_plot_data_equals_the_table_and_an_independent_evaluation(tmp_path, capsys):
    """A real run: the CSV (the plot's data) ends on the table's MSEs, which match the saved models."""
    import matplotlib.pyplot as plt
    import mxnet as mx

    from iteravg.mx.cli import _make_net, main
    from iteravg.mx.data import load

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "6", "--nta-n", "1", "--batch-size", "32", "--hidden", "16",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    with open(out / "val_loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    trigger = rep["trigger_epoch"]
    assert 1 <= trigger <= 6
    assert [r["val_mse_averaged"] == "" for r in rows] == [e < trigger for e in range(1, 7)]
    assert float(rows[trigger - 1]["val_mse_averaged"]) == float(rows[trigger - 1]["val_mse_last_iterate"])
    assert int(rows[-1]["iterates_averaged"]) == rep["average_counter"]
    m = rep["metrics"]
    assert float(rows[-1]["val_mse_last_iterate"]) == m["last iterate"]["val_mse"]  # same number, same units
    assert float(rows[-1]["val_mse_averaged"]) == m["averaged"]["val_mse"]
    assert f"{m['averaged']['val_mse']:.5f}" in printed and "MSE on standardised targets" in printed
    assert f"after epoch {trigger} of 6" in printed
    # Independently: the saved averaged model's validation MSE (plain numpy, full squared error).
    ds = load()
    net = _make_net(ds.num_features, 16, seed=99)
    net.load_parameters(str(out / "checkpoints" / "averaged.params"))
    pred = net(mx.nd.array(ds.val[0])).asnumpy()
    assert float(np.mean((pred - ds.val[1]) ** 2)) == pytest.approx(m["averaged"]["val_mse"], rel=1e-5)
    # The figure drawn from the report's history carries exactly the CSV's numbers.
    fig = report.figure(report.curves(rep["history"], trigger), "t")
    lines = _lines(fig)
    np.testing.assert_array_equal(lines["last"].get_ydata(), [float(r["val_mse_last_iterate"]) for r in rows])
    avg = np.asarray(lines["averaged"].get_ydata(), float)
    np.testing.assert_array_equal(avg[trigger - 1:], [float(r["val_mse_averaged"]) for r in rows[trigger - 1:]])
    plt.close(fig)
    assert (out / "val_loss.png").stat().st_size > 10000
