"""Claim (a): at the terminal phase of training, the PFC metrics decrease monotonically with depth.

    python -m experiments.pfc_depth [--presets fashion-mnist embedded digits] [--runs runs/pfc_depth]
                                    [--out docs/reproduction/pfc_depth] [--device auto] [--data-dir DIR]

Trains every preset of :mod:`experiments.runs` with ``pfc-fast train`` (or reuses its finished
run), which measures PFC1 = ``nc1``, PFC2 = ``nc2_etf`` and PFC3 = ``nc4`` (against the network's
own predictions) at the stem and every residual block after every epoch (``docs/spec.md``
section 2). The terminal phase is the epochs whose training accuracy (running over the epoch) is
at least ``TERMINAL_ACCURACY``. Writes to ``--out``:

- ``pfc_depth.png``: the three metrics against the layer at the last epoch, one curve per preset;
- ``spearman.png``: the Spearman correlation of each metric with depth against the epoch (-1:
  decreasing in rank at every layer), the start of the terminal phase marked;
- ``pfc_depth.json``: per preset, the last epoch's per-layer metrics, their monotonicity
  (:func:`pfc_fast.app.report.monotonicity`: Spearman, fraction of adjacent pairs that decrease), the
  fraction of adjacent pairs that do not increase (PFC3 reaches 0 at the last layers, a tie),
  and the fraction of terminal-phase epochs at which each metric decreases at every layer.
"""
import argparse
import json
import math
import os
import sys

from matplotlib.figure import Figure

from pfc_fast.app.report import PFC_METRICS, monotonicity

from .runs import PRESETS, run_config, train_or_reuse

TERMINAL_ACCURACY = 0.999


def summarise(name, run_dir, records):
    """The numbers of one preset's run (see the module docstring)."""
    last = records[-1]
    terminal = [r for r in records if r.train_acc >= TERMINAL_ACCURACY]
    summary = {"preset": name, "description": PRESETS[name][1], "run_dir": run_dir,
               "config": run_config(run_dir).to_dict(),
               "epochs": last.epoch, "train_acc": last.train_acc, "test_acc": last.test_acc,
               "terminal_phase_from_epoch": terminal[0].epoch if terminal else None,
               "layers": last.layer_names, "last_epoch": {}}
    for field, _, _ in PFC_METRICS:
        values = last.series(field)
        pairs = list(zip(values, values[1:]))
        summary["last_epoch"][field] = {
            "values": values, **monotonicity(values),
            "non_increasing_pairs": sum(b <= a for a, b in pairs) / len(pairs),
            "terminal_epochs_monotone": (sum(monotonicity(r.series(field))["decreasing_pairs"] == 1.0
                                             for r in terminal) / len(terminal)) if terminal else None,
            "spearman_by_epoch": [monotonicity(r.series(field))["spearman"] for r in records]}
    return summary


def _plot_depth(summaries, path):
    figure = Figure(figsize=(13, 3.8), layout="constrained")
    axes = figure.subplots(1, len(PFC_METRICS))
    for axis, (field, label, log) in zip(axes, PFC_METRICS):
        for summary in summaries:
            values = summary["last_epoch"][field]["values"]
            axis.plot(range(len(values)), values, marker="o", markersize=3,
                      label=f"{summary['preset']} (epoch {summary['epochs']})")
        names = max((s["layers"] for s in summaries), key=len)
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        axis.set(title=label, xlabel="layer (forward order)")
        if log:
            axis.set_yscale("log")
    axes[0].legend(fontsize=7)
    figure.savefig(path, dpi=100)


def _plot_spearman(summaries, path):
    figure = Figure(figsize=(13, 3.4), layout="constrained")
    axes = figure.subplots(1, len(PFC_METRICS))
    for axis, (field, label, _) in zip(axes, PFC_METRICS):
        for summary in summaries:
            rho = summary["last_epoch"][field]["spearman_by_epoch"]
            line, = axis.plot(range(1, len(rho) + 1), rho, label=summary["preset"])
            start = summary["terminal_phase_from_epoch"]
            if start is not None:
                axis.axvline(start, color=line.get_color(), linestyle=":", linewidth=1)
        axis.set(title=label.split(" ")[0] + ": Spearman with depth", xlabel="epoch (dotted: terminal phase)",
                 ylim=(-1.05, 1.05))
        axis.axhline(-1, color="grey", linewidth=0.5)
    axes[0].legend(fontsize=7)
    figure.savefig(path, dpi=100)


def _clean(value):
    """JSON without NaN (``null`` instead), so any JSON reader takes the file."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_json(path, value):
    with open(path, "w") as handle:
        json.dump(_clean(value), handle, indent=1)
        handle.write("\n")


def run(presets, runs_dir, out, device="auto", data_dir=None):
    """Train or reuse every preset, then write the figures and JSON; returns the summaries."""
    summaries = []
    for name in presets:
        run_dir, records = train_or_reuse(name, runs_dir, device, data_dir)
        summaries.append(summarise(name, run_dir, records))
    os.makedirs(out, exist_ok=True)
    _plot_depth(summaries, os.path.join(out, "pfc_depth.png"))
    _plot_spearman(summaries, os.path.join(out, "spearman.png"))
    write_json(os.path.join(out, "pfc_depth.json"), summaries)
    for s in summaries:
        verdicts = ", ".join(f"{field} {s['last_epoch'][field]['verdict']} (Spearman "
                             f"{s['last_epoch'][field]['spearman']:.3f})" for field, _, _ in PFC_METRICS)
        print(f"{s['preset']}: epoch {s['epochs']}, train acc {s['train_acc']:.4f}, test acc {s['test_acc']:.4f}; "
              f"{verdicts}")
    print(f"figures and numbers in {out}")
    return summaries


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.pfc_depth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["fashion-mnist", "embedded", "digits"], choices=PRESETS)
    parser.add_argument("--runs", default="runs/pfc_depth", help="directory of the training runs")
    parser.add_argument("--out", default="docs/reproduction/pfc_depth", help="directory of the figures and JSON")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", help="dataset directory (cifar10-resnet18)")
    args = parser.parse_args(argv)
    run(args.presets, args.runs, args.out, args.device, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
