"""The study's report: statistics across seeds, the markdown page (docs/results.md), a CSV of every cell and plots.

Everything in the page is computed from the cell results; nothing is typed in except the setup description and
PR #901's published figures, which are quoted for comparison.
"""

from __future__ import annotations

import csv
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .data import SPECS
from .grid import METHOD_LABELS, Profile

METRICS = ("MASE", "RMSE", "mean_wQuantileLoss")
METRIC_LABELS = {"MASE": "MASE", "RMSE": "RMSE", "mean_wQuantileLoss": "mean wQL"}
ROW_METHODS = ("none", "last", "nta", "alpha_suffix", "ema")
BOOTSTRAP = 2000

#: GluonTS PR #901 (DeepAR, electricity; the author's tables): the across-seed variance of the point forecast,
#: per time step and averaged, for the default SelectNBestMean(num_models=1) and for NTA (n=5, eta=0).
PR901 = {"baseline_var": 9552.24, "nta_var": 5458.46, "baseline_rmse": 414.924, "nta_rmse": 413.327}
PR901_VAR_RATIO = PR901["nta_var"] / PR901["baseline_var"]


@dataclass
class Row:
    pair: Tuple[str, str, str]  # (data set, family, estimator)
    ranks: int
    method: str
    seeds: List[int]
    metrics: Dict[str, np.ndarray]  # metric -> per-seed values (seed order)
    forecasts: np.ndarray  # seeds x windows x prediction_length: the mean forecasts
    records: List[Dict[str, Any]]

    def mean(self, m: str) -> float:
        return float(np.mean(self.metrics[m]))

    def std(self, m: str) -> float:
        return float(np.std(self.metrics[m], ddof=1)) if len(self.seeds) > 1 else math.nan


def forecast_variance(forecasts: np.ndarray) -> float:
    """PR #901's measure: variance across seeds of the point forecast at each time step, averaged."""
    return float(np.var(forecasts, axis=0).mean()) if len(forecasts) > 1 else math.nan


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else math.nan


def build_rows(records: Sequence[Dict[str, Any]]) -> "OrderedDict[Tuple, Row]":
    """Rows keyed (pair, ranks, method); "last" comes from the "none" runs' last iterate."""
    grouped: "OrderedDict[Tuple, List[Dict[str, Any]]]" = OrderedDict()
    for r in sorted(records, key=lambda r: (r["cell"]["seed"])):
        c = r["cell"]
        pair = (c["dataset"], c["family"], c["estimator"])
        grouped.setdefault((pair, c["ranks"], c["method"]), []).append(r)
        if c["method"] == "none" and "last_iterate" in r:
            grouped.setdefault((pair, c["ranks"], "last"), []).append(dict(r, **r["last_iterate"]))
    rows: "OrderedDict[Tuple, Row]" = OrderedDict()
    for key, recs in grouped.items():
        rows[key] = Row(pair=key[0], ranks=key[1], method=key[2], seeds=[r["cell"]["seed"] for r in recs],
                        metrics={m: np.array([r["metrics"][m] for r in recs], dtype=np.float64) for m in METRICS},
                        forecasts=np.array([r["mean_forecast"] for r in recs], dtype=np.float64), records=recs)
    return rows


def paired_bootstrap(row: Row, base: Row, stat, seed: int = 0) -> Tuple[float, float]:
    """90% percentile interval of stat(row)/stat(base) over seeds resampled with replacement (paired)."""
    common = [s for s in row.seeds if s in base.seeds]
    if len(common) < 3:
        return math.nan, math.nan
    ia = np.array([row.seeds.index(s) for s in common])
    ib = np.array([base.seeds.index(s) for s in common])
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, len(common), len(common))
        r = ratio(stat(row, ia[pick]), stat(base, ib[pick]))
        if math.isfinite(r):
            out.append(r)
    if not out:
        return math.nan, math.nan
    lo, hi = np.percentile(out, [5, 95])
    return float(lo), float(hi)


def _fvar(row: Row, idx: np.ndarray) -> float:
    return forecast_variance(row.forecasts[idx])


def _std_of(metric: str):
    def stat(row: Row, idx: np.ndarray) -> float:
        v = row.metrics[metric][idx]
        return float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
    return stat


@dataclass
class Comparison:
    """One row against the no-averaging baseline of the same pair and ranks."""

    row: Row
    std_ratio: Dict[str, float]
    std_ratio_ci: Dict[str, Tuple[float, float]]
    mean_ratio: Dict[str, float]
    fvar: float
    fvar_ratio: float
    fvar_ratio_ci: Tuple[float, float]


def compare(rows: "OrderedDict[Tuple, Row]") -> "OrderedDict[Tuple, Comparison]":
    out: "OrderedDict[Tuple, Comparison]" = OrderedDict()
    for key, row in rows.items():
        base = rows.get((row.pair, row.ranks, "none"))
        if base is None:
            continue
        out[key] = Comparison(
            row=row,
            std_ratio={m: ratio(row.std(m), base.std(m)) for m in METRICS},
            std_ratio_ci={m: paired_bootstrap(row, base, _std_of(m)) for m in METRICS},
            mean_ratio={m: ratio(row.mean(m), base.mean(m)) for m in METRICS},
            fvar=forecast_variance(row.forecasts),
            fvar_ratio=ratio(forecast_variance(row.forecasts), forecast_variance(base.forecasts)),
            fvar_ratio_ci=paired_bootstrap(row, base, _fvar),
        )
    return out


def trajectory_check(records: Sequence[Dict[str, Any]]) -> Tuple[int, int, List[str]]:
    """Within (pair, ranks, seed), did every method train the same iterates (same last-iterate hash)?"""
    groups: Dict[Tuple, set] = {}
    for r in records:
        c = r["cell"]
        groups.setdefault((c["dataset"], c["family"], c["estimator"], c["ranks"], c["seed"]), set()).add(
            r["info"]["last_iterate_sha256"])
    bad = [f"{k}" for k, hashes in groups.items() if len(hashes) != 1]
    return len(groups) - len(bad), len(groups), bad


# -- formatting ----------------------------------------------------------------------------------------------
def fmt(x: float, digits: int = 3) -> str:
    if not math.isfinite(x):
        return "n/a"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:,.{decimals}f}" if abs(x) >= 1000 else f"{x:.{decimals}f}"


def fmt_ci(ci: Tuple[float, float]) -> str:
    return f"[{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]" if all(math.isfinite(c) for c in ci) else ""


ESTIMATOR_NAMES = {"sff": "SimpleFeedForward", "deepar": "DeepAR"}
PLOT_NAMES = {"sff": "SFF", "deepar": "DeepAR"}  # short, for the plots' axes
#: What trains each family's runs, for the page.
FAMILY_TRAINERS = {"mx": "`iteravg.gluonts.Trainer` under `mpirun`",
                   "torch": "Lightning's DDP (`strategy=\"ddp\"`) under `torchrun`, with `iteravg.lightning`"}


def pair_name(pair: Tuple[str, str, str]) -> str:
    return f"{pair[0]} / {ESTIMATOR_NAMES.get(pair[2], pair[2])} (gluonts.{pair[1]})"


def short_name(pair: Tuple[str, str, str]) -> str:
    return f"{pair[0]} / {ESTIMATOR_NAMES.get(pair[2], pair[2])} ({pair[1]})"


def families_of(pairs: Sequence[Tuple]) -> List[str]:
    return list(OrderedDict.fromkeys(p[1] for p in pairs))


def ranks_label(ranks: int) -> str:
    return "1 process" if ranks == 1 else f"{ranks} ranks"


def pair_table(pair: Tuple, comps: "OrderedDict[Tuple, Comparison]", ranks: Sequence[int]) -> List[str]:
    lines = [
        "| method | ranks | MASE | RMSE | mean wQL | std ratio MASE | std ratio RMSE [90% CI] | std ratio mean wQL "
        "| forecast variance ratio [90% CI] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ranks:
        for method in ROW_METHODS:
            comp = comps.get((pair, r, method))
            if comp is None:
                continue
            row = comp.row
            cells = [f"{fmt(row.mean(m))} ± {fmt(row.std(m), 2)}" for m in METRICS]
            if method == "none":
                ratios = ["1 (baseline)"] * 3 + [f"1 (baseline: {fmt(comp.fvar)})"]
            else:
                ratios = [fmt(comp.std_ratio["MASE"], 2),
                          f"{fmt(comp.std_ratio['RMSE'], 2)} {fmt_ci(comp.std_ratio_ci['RMSE'])}",
                          fmt(comp.std_ratio["mean_wQuantileLoss"], 2),
                          f"{fmt(comp.fvar_ratio, 2)} {fmt_ci(comp.fvar_ratio_ci)}"]
            lines.append(f"| {METHOD_LABELS[method]} | {ranks_label(r)} | " + " | ".join(cells + ratios) + " |")
    return lines


def summary_table(comps: "OrderedDict[Tuple, Comparison]", pairs: Sequence[Tuple], ranks: Sequence[int]) -> List[str]:
    lines = ["| method | family | ranks | forecast variance ratio (median over estimators x data) | lower in | "
             "std ratio RMSE (median) | lower in | mean RMSE ratio (median) | mean wQL ratio (median) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for family in families_of(pairs):
        for method in ROW_METHODS[1:]:
            for r in ranks:
                cs = [comps[(p, r, method)] for p in pairs if p[1] == family and (p, r, method) in comps]
                if cs:
                    lines.append(summary_row(method, family, r, cs))
    lines.append(f"| PR #901: NTA (n=5), DeepAR on electricity | gluonts.mx | 1 process | {fmt(PR901_VAR_RATIO, 2)} "
                 f"({fmt(PR901['baseline_var'])} to {fmt(PR901['nta_var'])}) | | | | "
                 f"{fmt(PR901['nta_rmse'] / PR901['baseline_rmse'], 3)} | |")
    return lines


def summary_row(method: str, family: str, r: int, cs: Sequence[Comparison]) -> str:
    fv = [c.fvar_ratio for c in cs]
    sr = [c.std_ratio["RMSE"] for c in cs]
    return (f"| {METHOD_LABELS[method]} | gluonts.{family} | {ranks_label(r)} | {fmt(float(np.nanmedian(fv)), 2)} | "
            f"{sum(v < 1 for v in fv)} of {len(cs)} | {fmt(float(np.nanmedian(sr)), 2)} | "
            f"{sum(v < 1 for v in sr)} of {len(cs)} | "
            f"{fmt(float(np.nanmedian([c.mean_ratio['RMSE'] for c in cs])), 3)} | "
            f"{fmt(float(np.nanmedian([c.mean_ratio['mean_wQuantileLoss'] for c in cs])), 3)} |")


def distribution_table(rows: "OrderedDict[Tuple, Row]", pairs: Sequence[Tuple], ranks: Sequence[int]) -> List[str]:
    many = [r for r in ranks if r > 1]
    if 1 not in ranks or not many:
        return []
    lines = ["| data / estimator | method | " + " | ".join(f"{METRIC_LABELS[m]}, ratio of means" for m in METRICS)
             + " | RMSE, ratio of stds |", "| --- | --- | --- | --- | --- | --- |"]
    for p in pairs:
        for method in ROW_METHODS:
            one, dist = rows.get((p, 1, method)), rows.get((p, many[0], method))
            if one is None or dist is None:
                continue
            vals = [fmt(ratio(dist.mean(m), one.mean(m)), 3) for m in METRICS]
            lines.append(f"| {pair_name(p)} | {METHOD_LABELS[method]} | " + " | ".join(vals)
                         + f" | {fmt(ratio(dist.std('RMSE'), one.std('RMSE')), 2)} |")
    return lines


# -- plots ---------------------------------------------------------------------------------------------------
def plot_metrics(rows: "OrderedDict[Tuple, Row]", pairs: Sequence[Tuple], ranks: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pairs), len(METRICS), figsize=(11, 2.6 * len(pairs)), squeeze=False)
    colors = {1: "tab:blue", 2: "tab:orange"}
    for i, p in enumerate(pairs):
        for j, m in enumerate(METRICS):
            ax = axes[i][j]
            for k, r in enumerate(ranks):
                for x, method in enumerate(ROW_METHODS):
                    row = rows.get((p, r, method))
                    if row is None:
                        continue
                    xs = x + (k - (len(ranks) - 1) / 2) * 0.25
                    vals = row.metrics[m]
                    ax.scatter(np.full(len(vals), xs), vals, s=8, color=colors.get(r, "gray"), alpha=0.35)
                    ax.errorbar([xs], [vals.mean()], yerr=[row.std(m) if len(vals) > 1 else 0], fmt="o",
                                color=colors.get(r, "gray"), capsize=3, ms=4,
                                label=ranks_label(r) if x == 0 else None)
            ax.set_xticks(range(len(ROW_METHODS)))
            ax.set_xticklabels(["best ep.", "last", "NTA", "Alpha_S.", "EMA"], fontsize=8)
            ax.set_title(f"{pair_name(p)}: {METRIC_LABELS[m]}", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Test metrics per seed (dots), mean ± std across seeds", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title above the first row
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_ratios(comps: "OrderedDict[Tuple, Comparison]", pairs: Sequence[Tuple], ranks: Sequence[int],
                path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    methods = ROW_METHODS[1:]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    markers = {1: "o", 2: "s"}
    for ax, what in zip(axes, ("fvar", "std")):
        for pi, p in enumerate(pairs):
            for k, r in enumerate(ranks):
                for mi, method in enumerate(methods):
                    comp = comps.get((p, r, method))
                    if comp is None:
                        continue
                    val = comp.fvar_ratio if what == "fvar" else comp.std_ratio["RMSE"]
                    ci = comp.fvar_ratio_ci if what == "fvar" else comp.std_ratio_ci["RMSE"]
                    x = pi + (mi - (len(methods) - 1) / 2) * 0.18 + (k - 0.5) * 0.07
                    color = f"C{mi}"
                    if all(math.isfinite(c) for c in ci):
                        ax.plot([x, x], ci, color=color, alpha=0.4, lw=1)
                    ax.scatter([x], [val], color=color, marker=markers.get(r, "^"), s=22,
                               label=f"{METHOD_LABELS[method]}, {ranks_label(r)}" if pi == 0 else None)
        ax.axhline(1.0, color="gray", lw=0.8)
        if what == "fvar":
            ax.axhline(PR901_VAR_RATIO, color="black", ls="--", lw=0.8, label="PR #901 (NTA, DeepAR, electricity)")
            ax.set_title("forecast variance across seeds, ratio to no averaging (PR #901's measure)", fontsize=8)
        else:
            ax.set_title("std of RMSE across seeds, ratio to no averaging", fontsize=8)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(pairs)))
        ax.set_xticklabels([f"{p[0]}\n{PLOT_NAMES.get(p[2], p[2])} ({p[1]})" for p in pairs], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=72)
    plt.close(fig)


def write_csv(records: Sequence[Dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "family", "estimator", "method", "ranks", "seed", *METRICS, "trigger_epoch",
                    "average_counter", "train_seconds"])
        for r in sorted(records, key=lambda r: r["key"]):
            c = r["cell"]
            variants = [(c["method"], r)]
            if "last_iterate" in r:
                variants.append(("last", r["last_iterate"]))
            for method, src in variants:
                w.writerow([c["dataset"], c["family"], c["estimator"], method, c["ranks"], c["seed"],
                            *[f"{src['metrics'][m]:.6g}" for m in METRICS], r["info"].get("trigger_epoch"),
                            r["info"].get("average_counter"), r["train_seconds"]])


# -- the page ------------------------------------------------------------------------------------------------
def render(profile: Profile, records: Sequence[Dict[str, Any]], out_md: Path, assets: Path,
           command: str, elapsed_note: str = "", cache: str = "runs/study") -> Dict[str, Any]:
    """Write the page, the CSV and the plots. Returns the computed rows and comparisons (for tests)."""
    assets.mkdir(parents=True, exist_ok=True)
    rows = build_rows(records)
    comps = compare(rows)
    pairs = list(OrderedDict.fromkeys(r.pair for r in rows.values()))
    ranks = sorted({r.ranks for r in rows.values()})
    ok, total, bad = trajectory_check(records)
    plot_metrics(rows, pairs, ranks, assets / "metrics.png")
    plot_ratios(comps, pairs, ranks, assets / "variance-ratios.png")
    write_csv(records, assets / "cells.csv")
    rel = Path(assets.resolve()).relative_to(out_md.resolve().parent) if str(assets.resolve()).startswith(
        str(out_md.resolve().parent)) else assets

    L: List[str] = []
    L += ["# What averaging buys: a study on real series across seeds", "",
          f"Generated by `{command}` from {len(records)} training runs (profile `{profile.name}`); every number below "
          "is computed from the runs' results, which are cached per run under `" + cache + "/cells/` (a rerun "
          f"computes only missing runs). Per-run metrics: [{rel}/cells.csv]({rel}/cells.csv).{elapsed_note}", ""]
    L += ["## Question", "",
          "GluonTS PR #901 (which added `NTA` and `Alpha_Suffix` to GluonTS) trained DeepAR on the electricity data "
          "set with many seeds and reported that NTA averaging lowered the variance of the point forecast across seeds "
          f"from {fmt(PR901['baseline_var'])} to {fmt(PR901['nta_var'])} (ratio {fmt(PR901_VAR_RATIO, 2)}, i.e. "
          f"{100 * (1 - PR901_VAR_RATIO):.0f}% lower) at about equal RMSE ({fmt(PR901['baseline_rmse'])} vs "
          f"{fmt(PR901['nta_rmse'])}), against GluonTS's default of keeping the best epoch. This study asks the same "
          "of iteravg on data nobody here made, and what training data-parallel on 2 ranks costs in quality.", ""]
    L += setup_section(profile, pairs, records)
    L += ["## Summary against PR #901", "",
          "Ratios to no averaging (GluonTS's default, best epoch) of the same estimator, data and ranks; the median "
          "over the estimator x data combinations of each family, and in how many of them the ratio is below 1. "
          "*Forecast variance* is PR #901's measure: the variance across seeds of the mean forecast at each "
          "time step of the test windows, averaged. A ratio of PR #901's size (0.57) is a 43% reduction of the "
          "variance, i.e. a standard deviation about 0.76 times as large.", ""]
    L += summary_table(comps, pairs, ranks) + [""]
    L += reading(comps, rows, pairs, ranks)
    L += ["## Per data set and estimator", "",
          "Mean ± standard deviation across seeds of GluonTS's `Evaluator` metrics on the test windows (MASE with "
          "GluonTS's seasonality for the frequency, RMSE in the series' units, mean weighted quantile loss over "
          "the quantiles 0.1, ..., 0.9). *std ratio*: the standard deviation across seeds divided by no "
          "averaging's (same ranks); *forecast variance ratio*: PR #901's measure, likewise. Intervals: 90% "
          f"paired bootstrap over seeds ({BOOTSTRAP} resamples); with this few seeds they are wide, and a ratio "
          "whose interval contains 1 is not a measured effect.", ""]
    for p in pairs:
        seeds = sorted({s for r in rows.values() if r.pair == p for s in r.seeds})
        L += [f"### {pair_name(p)}", "", f"Seeds: {len(seeds)} ({', '.join(map(str, seeds))}). "
              + trigger_note(rows, p, ranks), ""]
        L += pair_table(p, comps, ranks) + [""]
    dist = distribution_table(rows, pairs, ranks)
    if dist:
        L += ["## What distributing costs", "",
              "The same runs, 2 ranks against 1 process: each rank takes half the batch, each step averages the "
              "ranks' gradients, so both arms take the same steps over the same number of windows per step (they "
              "draw different windows, so they are different runs of the same recipe). Each ratio is "
              "2 ranks / 1 process across the same seeds; above 1 is worse on 2 ranks.", ""]
        L += dist + [""]
    L += ["## Plots", "", f"![test metrics per seed]({rel}/metrics.png)", "",
          f"![variance ratios]({rel}/variance-ratios.png)", ""]
    L += ["## Checks", "",
          f"* Same training trajectory for every method of a seed: {ok} of {total} (data, estimator, ranks, seed) "
          "groups trained bitwise-identical last iterates whatever the method (no validation data is passed, so "
          "averaging never feeds back into training). The methods' differences within a seed are therefore only "
          "what each does with the same iterates." + (f" Differing groups: {', '.join(bad)}." if bad else ""),
          ranks_note(records), ""]
    seeds = sorted({len(r.seeds) for r in rows.values()})
    L += limits_section(seeds, families_of(pairs))
    out_md.write_text("\n".join(L).rstrip() + "\n")
    return {"rows": rows, "comparisons": comps, "pairs": pairs, "ranks": ranks, "trajectory": (ok, total, bad)}


def setup_section(profile: Profile, pairs: Sequence[Tuple], records: Sequence[Dict[str, Any]] = ()) -> List[str]:
    L = ["## Setup", "", "| data set | source (shipped in the wheel) | frequency | training points | test windows "
         "x prediction length |", "| --- | --- | --- | --- | --- |"]
    for name in OrderedDict.fromkeys(p[0] for p in pairs):
        spec = SPECS[name]
        values, _ = spec.load()
        L.append(f"| {name} | {spec.source} | {spec.freq} | {len(values) - spec.windows * spec.prediction_length} "
                 f"| {spec.windows} x {spec.prediction_length} |")
    L += ["", "| estimator | model | epochs x batches per epoch | batch per step (1 process; 2 ranks: half each) | "
          "learning rate | sample paths |", "| --- | --- | --- | --- | --- | --- |"]
    for (fam, est), b in profile.budgets.items():
        if not any(p[1] == fam and p[2] == est for p in pairs):
            continue
        model = ", ".join(f"{k}={v}" for k, v in b.model.items())
        generators = {r["info"].get("forecast_generator") for r in records
                      if (r["cell"]["family"], r["cell"]["estimator"]) == (fam, est)}
        samples = ("none: the forecast distribution's mean and quantiles"
                   if generators == {"DistributionForecastGenerator"} else str(b.num_samples))
        L.append(f"| gluonts.{fam} {est} | {model} | {b.epochs} x {b.batches_per_epoch} | {b.batch_size} | "
                 f"{b.learning_rate:g} | {samples} |")
    L += ["", "`context_multiple` is the context length in prediction lengths. No run gets validation data, and "
          "each trains with one averaging method."]
    families = families_of(pairs)
    if "mx" in families:
        L += mx_methods()
    if "torch" in families:
        L += torch_methods()
    L += ["", "The seed sets the framework's (MXNet's or torch's), numpy's and Python's generators before training "
          "(initialisation and the training windows) and before forecasting (the sample paths, the same stream for "
          "every method of a seed). Defaults were taken as GluonTS ships them; nothing was tuned on the test "
          "windows.", ""]
    return L


def mx_methods() -> List[str]:
    from .families import EMA_DECAY

    return ["", "**gluonts.mx**: each training run uses `iteravg.gluonts.Trainer` (GluonTS's MXNet Trainer on one "
            "process; data-parallel under `mpirun -np 2 --bind-to none` with mpi4py, one thread per rank) with "
            "GluonTS's `LearningRateReduction` and:", "",
            "* **no averaging**: GluonTS's default `ModelAveraging(SelectNBestMean(num_models=1))` keeps the epoch "
            "with the lowest training loss (PR #901's baseline). The same runs also report their **last iterate**.",
            "* **NTA**: `ModelIterationAveraging(NTA(epochs))`, GluonTS's defaults (`n=5`, `eta=0`; fallback "
            "start at 95% of the epochs).",
            "* **Alpha_Suffix**: `ModelIterationAveraging(Alpha_Suffix(epochs))`, GluonTS's default `alpha=0.75` "
            "(averages every iterate of the last 75% of the epochs).",
            f"* **EMA**: `ModelIterationAveraging(EMA(decay={EMA_DECAY}), recount_epoch_end=False)` "
            "(`iteravg.mx.EMA`, timm's warmup: the decay rises as 1 - (1+k)^(-2/3) and is capped at "
            f"{EMA_DECAY})."]


def torch_methods() -> List[str]:
    from .families import EMA_DECAY

    return ["", "**gluonts.torch**: each training run is GluonTS's own `estimator.train_model` (Lightning, "
            "`accelerator=\"cpu\"`, `torch.set_num_threads(1)`); on 2 ranks `torchrun --standalone "
            "--nproc_per_node=2` starts both processes and the estimator's `trainer_kwargs` add "
            "`strategy=\"ddp\", devices=2` and `iteravg.lightning.RankSeeding()` (each rank draws its own training "
            "windows). The averaging methods add one `iteravg.lightning.IterationAveraging(schedule, monitor=None)` "
            "callback (the trigger reads the epoch's mean training loss, reduced across ranks):", "",
            "* **no averaging**: GluonTS's default: `train_model`'s `ModelCheckpoint(monitor=\"train_loss\")` "
            "reloads the epoch with the lowest training loss. The same runs also report their **last iterate**.",
            "* **NTA**: `iteravg.NTASchedule(epochs)` (`n=5`, `eta=0`, fallback start at 95% of the epochs).",
            "* **Alpha_Suffix**: `iteravg.AlphaSuffixSchedule(epochs)` (`alpha=0.75`).",
            f"* **EMA**: `iteravg.EMASchedule(decay={EMA_DECAY})` (timm's warmup, as the mx EMA).",
            "",
            "With averaging, the model evaluated is the final average, what `IterationAveraging` leaves in the model "
            "when `fit` ends (as the mx runs evaluate the average, not a best epoch); `train_model` itself would "
            "reload its best-training-loss checkpoint, which holds the average as of that epoch once averaging has "
            "started (see the reading below and [Lightning](lightning.md)). The callback folds one iterate per "
            "optimizer step (`recount_epoch_end=False`, its default: no extra fold of each epoch's last iterate)."]


def trigger_note(rows: "OrderedDict[Tuple, Row]", pair: Tuple, ranks: Sequence[int]) -> str:
    parts = []
    for r in ranks:
        row = rows.get((pair, r, "nta"))
        if row is None:
            continue
        epochs = [rec["info"].get("trigger_epoch") for rec in row.records]
        folds = [rec["info"].get("average_counter") or 0 for rec in row.records]
        budget = row.records[0]["settings"]["budget"]
        fallback = math.ceil(budget["epochs"] * 0.95)  # NTA's default fallback_alpha=0.05
        on_metric = sum(e is not None and e < fallback for e in epochs)
        parts.append(f"{ranks_label(r)}: NTA started averaging at epoch {', '.join(str(e) for e in epochs)} of "
                     f"{budget['epochs']} ({on_metric} of {len(epochs)} seeds on its metric trigger, the others at "
                     f"the fallback epoch {fallback}) and averaged a median of {int(np.median(folds))} iterates "
                     f"(of {budget['epochs'] * budget['batches_per_epoch']} steps)")
    return "; ".join(parts) + "." if parts else ""


def reading(comps: "OrderedDict[Tuple, Comparison]", rows: "OrderedDict[Tuple, Row]", pairs: Sequence[Tuple],
            ranks: Sequence[int]) -> List[str]:
    """Plain statements computed from the comparisons (which method lowered what, where intervals exclude 1), for
    each family."""
    L = ["### Reading", ""]
    for family in families_of(pairs):
        fam_pairs = [p for p in pairs if p[1] == family]
        L += reading_family(comps, rows, fam_pairs, ranks, f"gluonts.{family}" if len(families_of(pairs)) > 1 else "")
    L.append("")
    return L


def reading_family(comps: "OrderedDict[Tuple, Comparison]", rows: "OrderedDict[Tuple, Row]", pairs: Sequence[Tuple],
                   ranks: Sequence[int], family: str) -> List[str]:
    L = []
    tag = f" ({family})" if family else ""
    for method in ("nta", "alpha_suffix", "ema"):
        cs = [(p, r, comps[(p, r, method)]) for p in pairs for r in ranks if (p, r, method) in comps]
        if not cs:
            continue
        lower = [f"{short_name(p)}, {ranks_label(r)}" for p, r, c in cs
                 if math.isfinite(c.fvar_ratio_ci[1]) and c.fvar_ratio_ci[1] < 1]
        higher = [f"{short_name(p)}, {ranks_label(r)}" for p, r, c in cs
                  if math.isfinite(c.fvar_ratio_ci[0]) and c.fvar_ratio_ci[0] > 1]
        worse_mean = [f"{short_name(p)}, {ranks_label(r)} ({fmt(c.mean_ratio['RMSE'], 3)})"
                      for p, r, c in cs if c.mean_ratio["RMSE"] > 1.02]
        better_mean = [f"{short_name(p)}, {ranks_label(r)} ({fmt(c.mean_ratio['RMSE'], 3)})"
                       for p, r, c in cs if c.mean_ratio["RMSE"] < 0.98]
        text = (f"* **{METHOD_LABELS[method]}**{tag}: forecast variance lower than without averaging, with the whole "
                f"90% interval below 1, in {len(lower)} of {len(cs)} cases"
                + (f" ({'; '.join(lower)})" if lower else "")
                + f"; higher with the interval above 1 in {len(higher)}"
                + (f" ({'; '.join(higher)})" if higher else "") + ". Mean RMSE more than 2% better in "
                + (f"{len(better_mean)} ({'; '.join(better_mean)})" if better_mean else "none")
                + ", more than 2% worse in " + (f"{len(worse_mean)} ({'; '.join(worse_mean)})" if worse_mean
                                                 else "none") + ".")
        L.append(text)
    dist = [ratio(rows[(p, r, m)].mean("RMSE"), rows[(p, 1, m)].mean("RMSE"))
            for p in pairs for r in ranks if r > 1 for m in ROW_METHODS if (p, r, m) in rows and (p, 1, m) in rows]
    if dist:
        within = sum(abs(d - 1) <= 0.03 for d in dist)
        L.append(f"* 2 ranks against 1 process{tag}: the mean RMSE ratio has median {fmt(float(np.median(dist)), 3)} "
                 f"(from {fmt(min(dist), 3)} to {fmt(max(dist), 3)}) over the {len(dist)} (data, estimator, method) "
                 f"rows; {within} of them within ±3%.")
    nta = [rec for row in rows.values() if row.pair in pairs and row.method == "nta" for rec in row.records]
    if nta:
        fallback = [math.ceil(rec["settings"]["budget"]["epochs"] * 0.95) for rec in nta]
        on_metric = sum(rec["info"].get("trigger_epoch") is not None and rec["info"]["trigger_epoch"] < fb
                        for rec, fb in zip(nta, fallback))
        L.append(f"* NTA{tag} started on its metric trigger (an epoch's training loss worse than the best before the "
                 f"last 5 epochs) in {on_metric} of {len(nta)} runs; the others started at GluonTS's fallback, 95% "
                 "of the way through training, so NTA here mostly averages the last epoch's iterates. Where that "
                 "is the very last epoch it averages a single iterate and equals the last iterate.")
    chosen = [rec for row in rows.values() if row.pair in pairs for rec in row.records
              if "gluonts_checkpoint_averaged" in rec["info"]]
    if chosen:
        averaged = sum(bool(rec["info"]["gluonts_checkpoint_averaged"]) for rec in chosen)
        last = sum(bool(rec["info"]["gluonts_checkpoint_averaged"])
                   and rec["info"].get("gluonts_best_epoch") == rec["settings"]["budget"]["epochs"] for rec in chosen)
        L.append(f"* GluonTS's own choice{tag}: `estimator.train` returns the checkpoint of the epoch with the lowest "
                 f"training loss. Of the {len(chosen)} averaging runs, it would have returned the final average "
                 f"evaluated here in {last} (the best epoch was the last), an earlier epoch's average in "
                 f"{averaged - last}, and a training iterate (averaging had not started by the best epoch) in "
                 f"{len(chosen) - averaged}.")
    return L


def ranks_note(records: Sequence[Dict[str, Any]]) -> str:
    multi = [r for r in records if r["cell"]["ranks"] > 1]
    if not multi:
        return "* No multi-rank runs in this selection."
    checked = [r for r in multi if "ranks_identical" in r["info"]]
    same = sum(bool(r["info"]["ranks_identical"]) for r in checked)
    families = list(OrderedDict.fromkeys(r["cell"]["family"] for r in multi))
    counts = {f: sum(r["cell"]["family"] == f for r in multi) for f in families}
    how = "; ".join(f"gluonts.{f}: {n} run{'' if n == 1 else 's'} with {FAMILY_TRAINERS.get(f, f)}"
                    for f, n in counts.items())
    return (f"* Same network on every rank: in {same} of {len(checked)} multi-rank runs that recorded it (of "
            f"{len(multi)}), every rank's final network had the same SHA-256 (each run trained data-parallel; "
            f"{how}).")


def limits_section(seed_counts: Sequence[int], families: Sequence[str] = ("mx",)) -> List[str]:
    lo, hi = min(seed_counts), max(seed_counts)
    rel = 1 / math.sqrt(2 * (lo - 1)) if lo > 1 else math.inf
    seeds = f"{lo}" if lo == hi else f"{lo} to {hi}"
    L = ["## Limits", "",
         f"* Few seeds: a standard deviation from {seeds} seeds has a relative standard error of about "
         f"{100 * rel:.0f}% or less (1/sqrt(2(n-1))), so a ratio of two of them needs to be far from 1 to mean "
         "anything; read the intervals and the counts, not single ratios.",
         "* Small budgets, chosen to fit about an hour per family on 2 CPU cores (see the timing at the top): short "
         "training runs of small models on one series each, so the models are further from convergence than PR "
         "#901's (DeepAR trained to its defaults on 370 series); averaging over a short run includes early, worse "
         "iterates.",
         "* GluonTS's defaults for the averaging parameters, untuned: `Alpha_Suffix`'s `alpha=0.75` in "
         "particular averages from a quarter of the way into training."]
    if "torch" in families:
        L.append("* gluonts.torch: one estimator (SimpleFeedForward). Its network has the mx one's shape and budget "
                 "but is another implementation (other initialisation, window sampling, scaling and forecasts), so "
                 "the two families' rows are not a comparison of the frameworks.")
    else:
        L.append("* No gluonts.torch estimators in this selection (`studies/averaging/torch_family.py` trains "
                 "them with `iteravg.lightning`).")
    return L + [""]
