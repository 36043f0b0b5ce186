"""Claim (a): at the terminal phase of training, the PFC metrics decrease monotonically with depth.

    python -m experiments.pfc_depth [--presets embedded digits] [--seeds 0 1 2]
                                    [--runs runs/pfc_depth] [--out docs/reproduction/pfc_depth]
                                    [--device auto] [--data-dir DIR]

Trains every preset of :mod:`experiments.runs` once per seed with ``pfc-fast train --seed SEED``
into ``RUNS/PRESET-sSEED`` (or reuses the finished run there, resumes an interrupted one), which
measures PFC1 = ``nc1``, PFC2 = ``nc2_etf`` and PFC3 = ``nc4`` (against the network's own
predictions) at the stem and every residual block after every epoch (``docs/spec.md`` section 2),
and their permutation null (``pfc-fast train``'s default ``--null-permutations``): the mean
``null_mean`` and standard deviation ``null_std`` of each metric over shuffles of the probe labels.
The terminal phase of a run is the epochs whose training accuracy (running over the epoch) is at
least ``TERMINAL_ACCURACY``. Everything is at the last epoch unless said otherwise; "over the
seeds" is the mean and the min-max over the runs of a preset. Writes to ``--out``:

- ``pfc_depth.png``: the three metrics against the layer, per preset the mean over the seeds (line)
  and their min-max (band), and the null ``null_mean`` +- ``null_std`` (each averaged over the seeds,
  as :meth:`pfc_fast.app.report.Runs.null` does) as a dashed band of the preset's colour;
- ``null_normalised.png``: the null-normalised curves, each seed against its own null, over the
  seeds: the z-score ``(value - null_mean) / null_std`` (top; the grey band is
  ``+-NULL_SIGMAS``, where the report calls a layer indistinguishable from the null) and the ratio
  ``value / null_mean`` (bottom; 1: the null's value). Where ``null_std`` is 0 (every permutation
  gave the same value) the z-score is 0 if the value equals ``null_mean`` (to a relative 1e-9, the
  report's rule) and undefined (NaN: no point drawn, ``null`` in the JSON, counted in
  ``z_undefined``) otherwise; the ratio is undefined where ``null_mean`` is 0, both where a run
  holds no null;
- ``spearman.png``: the Spearman correlation of each metric with depth against the epoch, over the
  seeds (-1: decreasing in rank at every layer), the epoch from which every seed is in the terminal
  phase marked;
- ``pfc_depth.json``: the protocol (seeds, ``TERMINAL_ACCURACY``, ``NULL_SIGMAS``) and per preset
  (``presets``): the runs, accuracies over the seeds, and per metric (``last_epoch``) the curves
  (``mean``, ``min``, ``max`` per layer), the null (``null_mean``, ``null_std``), the z-score and
  ratio over the seeds with their trends (:func:`pfc_fast.app.report.monotonicity` of the mean
  curve), per layer the number of seeds indistinguishable from the null
  (:func:`pfc_fast.app.report.indistinguishable`), and the verdict over the seeds of the report
  (:func:`pfc_fast.app.report.verdict`: Spearman of the mean curve and its p-value, "decreases in k
  of n runs", the layers indistinguishable from the null); per seed (``per_seed``) the single-run
  numbers: curves, null, z-score, ratio, :func:`~pfc_fast.app.report.monotonicity`, the fraction of
  adjacent pairs that do not increase (PFC3 reaches 0 at the last layers, a tie), the fraction of
  terminal-phase epochs at which the metric decreases at every layer, and Spearman by epoch.

With several seeds, ``pfc-fast report``'s aggregated report of each preset's runs (every epoch,
accuracies, losses) goes to ``RUNS/PRESET-sFIRST/report/aggregate/``.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from pfc_fast.app import flags
from pfc_fast.app.report import (NULL_SIGMAS, PFC_METRICS, Runs, indistinguishable, load_run, monotonicity,
                                 null_of, trend, verdict, write_report)

from .runs import PRESETS, run_config, train_or_reuse

TERMINAL_ACCURACY = 0.999
#: The default seeds: every preset is trained once per seed.
SEEDS = (0, 1, 2)
#: The default presets: three seeds of these cost about what one seed of these and ``fashion-mnist``
#: did (the budgets: :data:`experiments.runs.PRESETS`); add ``fashion-mnist`` with ``--presets``.
DEFAULT_PRESETS = ("embedded", "digits")


def z_score(value, null):
    """``(value - null_mean) / null_std`` for ``null = (null_mean, null_std)`` (or ``None``: NaN).

    ``null_std = 0``: 0 where the value equals ``null_mean`` to a relative 1e-9 (as
    :func:`pfc_fast.app.report.indistinguishable` has it), else NaN (no finite scale)."""
    if null is None or value is None:
        return math.nan
    mean, std = null
    if std > 0:
        return (value - mean) / std
    return 0.0 if math.isclose(value, mean, rel_tol=1e-9) else math.nan


def ratio(value, null):
    """``value / null_mean`` (NaN where there is no null or ``null_mean`` is 0)."""
    if null is None or value is None or null[0] == 0:
        return math.nan
    return value / null[0]


def _over_seeds(rows):
    """``mean``, ``min`` and ``max`` per column of ``rows`` (seeds, layers) over its values that are
    not NaN (NaN where a column has none)."""
    rows = np.asarray(rows, dtype=float)
    defined = ~np.isnan(rows)
    some = defined.any(axis=0)
    fill = np.where(defined, rows, 0.0)
    count = np.maximum(defined.sum(axis=0), 1)
    return {"mean": np.where(some, fill.sum(axis=0) / count, math.nan).tolist(),
            "min": np.where(some, np.where(defined, rows, math.inf).min(axis=0), math.nan).tolist(),
            "max": np.where(some, np.where(defined, rows, -math.inf).max(axis=0), math.nan).tolist()}


def _spread(values):
    """``mean``, ``min``, ``max`` of a list of numbers."""
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def _terminal(records):
    return [r for r in records if r.train_acc >= TERMINAL_ACCURACY]


def _seed_summary(run, field):
    """The numbers of one seed's run for ``field`` (see the module docstring)."""
    records = run.records
    terminal = _terminal(records)
    last = records[-1]
    values = last.series(field)
    nulls = [null_of(layer, field) for layer in last.layers]
    pairs = list(zip(values, values[1:]))
    return {"values": values,
            "null_mean": [None if n is None else n[0] for n in nulls],
            "null_std": [None if n is None else n[1] for n in nulls],
            "z": [z_score(v, n) for v, n in zip(values, nulls)],
            "ratio": [ratio(v, n) for v, n in zip(values, nulls)],
            **monotonicity(values),
            "non_increasing_pairs": sum(b <= a for a, b in pairs) / len(pairs) if pairs else math.nan,
            "terminal_epochs_monotone": (sum(monotonicity(r.series(field))["decreasing_pairs"] == 1.0
                                             for r in terminal) / len(terminal)) if terminal else None,
            "spearman_by_epoch": [monotonicity(r.series(field))["spearman"] for r in records]}


def summarise(name, seeds, runs):
    """The numbers of preset ``name`` over its runs (a :class:`pfc_fast.app.report.Runs`, one run
    per seed of ``seeds``, in that order): see the module docstring."""
    last = runs.at(runs.last_epoch)
    config = run_config(runs.runs[0].directory.path).to_dict()
    config.pop("seed")
    per_seed = []
    for seed, run, record in zip(seeds, runs.runs, last):
        terminal = _terminal(run.records)
        per_seed.append({"seed": seed, "run_dir": run.directory.path, "epochs": record.epoch,
                         "train_acc": record.train_acc, "test_acc": record.test_acc,
                         "terminal_phase_from_epoch": terminal[0].epoch if terminal else None,
                         "last_epoch": {m.field: _seed_summary(run, m.field) for m in PFC_METRICS}})
    starts = [s["terminal_phase_from_epoch"] for s in per_seed]
    summary = {"preset": name, "description": PRESETS[name][1], "seeds": list(seeds),
               "run_dirs": [run.directory.path for run in runs.runs], "config": config,
               "epochs": runs.last_epoch,
               "train_acc": _spread([r.train_acc for r in last]), "test_acc": _spread([r.test_acc for r in last]),
               "terminal_phase_from_epoch": starts,
               "all_seeds_terminal_from_epoch": None if None in starts else max(starts),
               "layers": runs.layer_names, "last_epoch": {}}
    for metric in PFC_METRICS:
        field = metric.field
        curves = _over_seeds(runs.values(field, runs.last_epoch))
        null = runs.null(field, runs.last_epoch)
        z_rows = [s["last_epoch"][field]["z"] for s in per_seed]
        ratio_rows = [s["last_epoch"][field]["ratio"] for s in per_seed]
        z = _over_seeds(z_rows)
        ratios = _over_seeds(ratio_rows)
        overall, words = verdict(runs, field)
        summary["last_epoch"][field] = {
            **curves,
            "null_mean": None if null is None else null[0].tolist(),
            "null_std": None if null is None else null[1].tolist(),
            "z": {**z, "trend": monotonicity(z["mean"]),
                  "z_undefined": [sum(math.isnan(row[depth]) for row in z_rows)
                                  for depth in range(len(runs.layer_names))]},
            "ratio": {**ratios, "trend": monotonicity(ratios["mean"])},
            "indistinguishable_runs": [sum(indistinguishable(r.layers[depth], field) for r in last)
                                       for depth in range(len(runs.layer_names))],
            "spearman": overall.spearman, "p_value": overall.p_value,
            "decreasing_pairs": overall.decreasing / overall.pairs if overall.pairs else math.nan,
            "decreases_in_runs": sum(trend(r.series(field)).decreases for r in last),
            "verdict": words}
    summary["per_seed"] = per_seed
    return summary


# -- the figures --------------------------------------------------------------------------------

def _colours(summaries):
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(len(summaries))]


def _band(axis, x, curve, colour, label):
    """The mean of ``curve`` (``mean``, ``min``, ``max``) as a line with markers, the min-max as a band."""
    axis.plot(x, curve["mean"], marker="o", markersize=3, lw=1, color=colour, label=label)
    axis.fill_between(x, curve["min"], curve["max"], color=colour, alpha=0.2, lw=0)


def _layer_ticks(axis, summaries):
    names = max((s["layers"] for s in summaries), key=len)
    axis.set_xticks(range(len(names)))
    axis.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    axis.set_xlabel("layer (forward order)")


def _label(summary):
    seeds = len(summary["seeds"])
    return f"{summary['preset']} (epoch {summary['epochs']}, {seeds} seed{'s' if seeds > 1 else ''})"


def _plot_depth(summaries, path):
    figure = Figure(figsize=(13, 4.2), layout="constrained")
    axes = figure.subplots(1, len(PFC_METRICS))
    for axis, metric in zip(axes, PFC_METRICS):
        for summary, colour in zip(summaries, _colours(summaries)):
            numbers = summary["last_epoch"][metric.field]
            x = range(len(numbers["mean"]))
            _band(axis, x, numbers, colour, _label(summary))
            if numbers["null_mean"] is not None:
                mean = np.array(numbers["null_mean"], dtype=float)
                std = np.array(numbers["null_std"], dtype=float)
                axis.plot(x, mean, color=colour, lw=0.8, linestyle="--", label=f"{summary['preset']}: null")
                axis.fill_between(x, mean - std, mean + std, facecolor=colour, alpha=0.08, edgecolor=colour,
                                  linestyle="--", lw=0.5)
        _layer_ticks(axis, summaries)
        axis.set(title=metric.title, ylabel=metric.label)
        axis.title.set_fontsize(9)
        if metric.log:
            axis.set_yscale("log")
    axes[0].legend(fontsize=6)
    figure.suptitle("last epoch: mean (lines) and min-max (bands) over the seeds; dashed: the null "
                    "(permuted labels), mean ± std", fontsize=9)
    figure.savefig(path, dpi=100)


def _plot_null_normalised(summaries, path):
    figure = Figure(figsize=(13, 7.4), layout="constrained")
    axes = figure.subplots(2, len(PFC_METRICS))
    for column, metric in enumerate(PFC_METRICS):
        top, bottom = axes[0][column], axes[1][column]
        for summary, colour in zip(summaries, _colours(summaries)):
            numbers = summary["last_epoch"][metric.field]
            x = range(len(numbers["mean"]))
            _band(top, x, numbers["z"], colour, _label(summary))
            _band(bottom, x, numbers["ratio"], colour, _label(summary))
        top.axhspan(-NULL_SIGMAS, NULL_SIGMAS, color="0.5", alpha=0.25, lw=0,
                    label=f"within {NULL_SIGMAS:g} null std")
        top.set_yscale("symlog", linthresh=NULL_SIGMAS)
        top.set(title=f"{metric.label}: (value - null mean) / null std", ylabel="z-score (symlog)")
        bottom.axhline(1.0, color="0.5", lw=0.8, label="null mean")
        bottom.set(title=f"{metric.label}: value / null mean", ylabel="ratio")
        if metric.log:
            bottom.set_yscale("log")
        for axis in (top, bottom):
            axis.title.set_fontsize(9)
            _layer_ticks(axis, summaries)
    axes[0][0].legend(fontsize=6)
    axes[1][0].legend(fontsize=6)
    figure.suptitle("last epoch, each seed against its own null: mean (lines) and min-max (bands) over the seeds",
                    fontsize=9)
    figure.savefig(path, dpi=100)


def _plot_spearman(summaries, path):
    figure = Figure(figsize=(13, 3.4), layout="constrained")
    axes = figure.subplots(1, len(PFC_METRICS))
    for axis, metric in zip(axes, PFC_METRICS):
        for summary, colour in zip(summaries, _colours(summaries)):
            rows = [s["last_epoch"][metric.field]["spearman_by_epoch"] for s in summary["per_seed"]]
            epochs = min(len(row) for row in rows)
            _band(axis, range(1, epochs + 1), _over_seeds([row[:epochs] for row in rows]), colour,
                  summary["preset"])
            start = summary["all_seeds_terminal_from_epoch"]
            if start is not None:
                axis.axvline(start, color=colour, linestyle=":", linewidth=1)
        axis.set(title=metric.label + ": Spearman with depth",
                 xlabel="epoch (dotted: every seed in the terminal phase)", ylim=(-1.05, 1.05))
        axis.title.set_fontsize(9)
        axis.axhline(-1, color="grey", linewidth=0.5)
    axes[0].legend(fontsize=7)
    figure.savefig(path, dpi=100)


# -- the JSON -----------------------------------------------------------------------------------

def _clean(value):
    """JSON without NaN or infinities (``null`` instead), so any JSON reader takes the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def write_json(path, value):
    with open(path, "w") as handle:
        json.dump(_clean(value), handle, indent=1)
        handle.write("\n")


def run(presets, runs_dir, out, device="auto", data_dir=None, seeds=SEEDS):
    """Train or reuse every preset once per seed, then write the figures and JSON; returns the
    per-preset summaries (the ``presets`` of ``pfc_depth.json``)."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    summaries = []
    for name in presets:
        run_dirs = [train_or_reuse(name, runs_dir, device, data_dir, seed=seed)[0] for seed in seeds]
        runs = Runs([load_run(run_dir) for run_dir in run_dirs])
        summary = summarise(name, seeds, runs)
        if len(seeds) > 1:
            summary["report_dir"] = write_report(*run_dirs)
        summaries.append(summary)
    os.makedirs(out, exist_ok=True)
    _plot_depth(summaries, os.path.join(out, "pfc_depth.png"))
    _plot_null_normalised(summaries, os.path.join(out, "null_normalised.png"))
    _plot_spearman(summaries, os.path.join(out, "spearman.png"))
    write_json(os.path.join(out, "pfc_depth.json"),
               {"seeds": seeds, "terminal_accuracy": TERMINAL_ACCURACY, "null_sigmas": NULL_SIGMAS,
                "presets": summaries})
    for s in summaries:
        starts = ", ".join("-" if e is None else str(e) for e in s["terminal_phase_from_epoch"])
        print(f"{s['preset']}: epoch {s['epochs']}, {len(seeds)} seed(s), train acc {s['train_acc']['mean']:.4f} "
              f"[{s['train_acc']['min']:.4f}, {s['train_acc']['max']:.4f}], test acc {s['test_acc']['mean']:.4f}; "
              f"terminal phase from epoch {starts}")
        if None in s["terminal_phase_from_epoch"]:
            print(f"  warning: not every seed of {s['preset']} reached the terminal phase (training accuracy "
                  f">= {TERMINAL_ACCURACY})")
        for metric in PFC_METRICS:
            numbers = s["last_epoch"][metric.field]
            print(f"  {metric.label}: {numbers['verdict']} (Spearman of the mean {numbers['spearman']:.3f}, "
                  f"p = {numbers['p_value']:.2g})")
    print(f"figures and numbers in {out}")
    return summaries


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.pfc_depth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), choices=PRESETS)
    parser.add_argument("--seeds", nargs="+", type=flags.seed, default=list(SEEDS),
                        help="train every preset once per seed (default: 0 1 2)")
    parser.add_argument("--runs", default="runs/pfc_depth", help="directory of the training runs")
    parser.add_argument("--out", default="docs/reproduction/pfc_depth", help="directory of the figures and JSON")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", help="dataset directory (cifar10-resnet18)")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"argument --seeds: give every seed once, got {' '.join(map(str, args.seeds))}")
    run(args.presets, args.runs, args.out, args.device, args.data_dir, args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
