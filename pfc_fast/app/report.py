"""``pfc-fast report RUN_DIR``: figures and a markdown summary of a ``pfc-fast train`` run.

The figures are drawn with matplotlib's object API on its Agg canvas (no pyplot, no global
backend change), so the report also runs inside notebooks and on machines without a display.

Reads ``RUN_DIR/metrics.jsonl`` and writes to ``RUN_DIR/report/`` (or ``--out``):

- ``pfc_vs_depth.png``: PFC1 = ``nc1`` (log scale), PFC2 = ``nc2_etf``, PFC3 = ``nc4`` against
  the layer (stem, then every residual block), one curve per epoch, coloured by epoch;
- ``pfc_vs_epoch.png``: the same metrics against the epoch, one curve per layer;
- ``training.png``: train / test / probe accuracy and train / test loss against the epoch;
- ``geodesic.png`` (constant-width runs with ``lss``): LSS, OTS and the W-path ratio against the epoch;
- ``summary.md``: the last epoch's numbers and the monotonicity verdict of each PFC metric
  (``docs/spec.md`` section 2): the Spearman rank correlation of the metric with depth
  (``scipy.stats.spearmanr``; -1 = strictly decreasing in rank) and the fraction of adjacent
  layer pairs where the metric strictly decreases (1 = monotone decrease, the paper's claim).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from matplotlib import cm, colormaps, colors
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from .record import EpochRecord
from .run_directory import RunDirectory


#: (field, label, log scale) of the PFC metrics, docs/spec.md section 2.
PFC_METRICS = (("nc1", "PFC1 = NC1  Tr(Σ_W Σ_B⁺)/K", True),
               ("nc2_etf", "PFC2 = NC2 (distance to simplex ETF)", False),
               ("nc4", "PFC3 = NC4 (NCC ≠ network prediction)", False))


def monotonicity(values: Sequence[float]) -> dict[str, Any]:
    """Spearman correlation of ``values`` with their position (depth), its p-value, and the
    fraction of adjacent pairs with ``values[l + 1] < values[l]``; a verdict in words."""
    pairs = len(values) - 1
    decreasing = sum(b < a for a, b in zip(values, values[1:])) / pairs if pairs else float("nan")
    if len(set(values)) < 2:
        return {"spearman": float("nan"), "p_value": float("nan"), "decreasing_pairs": decreasing,
                "verdict": "constant across layers"}
    result = spearmanr(range(len(values)), values)
    rho, p_value = float(result.statistic), float(result.pvalue)
    if decreasing == 1.0:
        verdict = "decreases monotonically with depth"
    elif rho < 0:
        verdict = "decreases with depth overall, not at every layer"
    else:
        verdict = "does not decrease with depth"
    return {"spearman": rho, "p_value": p_value, "decreasing_pairs": decreasing, "verdict": verdict}


def _layer_axis(axis: Axes, names: Sequence[str]) -> None:
    axis.set_xticks(range(len(names)))
    axis.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    axis.set_xlabel("layer (forward order)")


def _pfc_vs_depth(records: Sequence[EpochRecord], path: str) -> None:
    names = records[-1].layer_names
    cmap = colormaps["viridis"]
    epochs = [r.epoch for r in records]
    norm = colors.Normalize(vmin=min(epochs), vmax=max(epochs))
    figure = Figure(figsize=(13, 4), layout="constrained")
    axes = figure.subplots(1, 3)
    for axis, (field, label, log) in zip(axes, PFC_METRICS):
        for record in records:
            values = record.series(field)
            axis.plot(range(len(values)), values, color=cmap(norm(record.epoch)), marker=".", lw=1)
        if log:
            axis.set_yscale("log")
        axis.set_title(label, fontsize=9)
        _layer_axis(axis, names)
    colorbar = figure.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.9)
    colorbar.set_label("epoch")
    figure.savefig(path, dpi=90)


def _pfc_vs_epoch(records: Sequence[EpochRecord], path: str) -> None:
    names = records[-1].layer_names
    epochs = [r.epoch for r in records]
    cmap = colormaps["plasma"]
    norm = colors.Normalize(vmin=0, vmax=max(1, len(names) - 1))
    figure = Figure(figsize=(13, 4), layout="constrained")
    axes = figure.subplots(1, 3)
    for axis, (field, label, log) in zip(axes, PFC_METRICS):
        for depth, name in enumerate(names):
            axis.plot(epochs, [r.layers[depth][field] for r in records], color=cmap(norm(depth)), lw=1,
                      label=name)
        if log:
            axis.set_yscale("log")
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("epoch")
    axes[-1].legend(fontsize=6, ncol=2, title="layer", title_fontsize=7)
    figure.savefig(path, dpi=90)


def _training(records: Sequence[EpochRecord], path: str) -> None:
    epochs = [r.epoch for r in records]
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    left, right = figure.subplots(1, 2)
    for field, label in (("train_acc", "train (running, train mode)"), ("probe_acc", "probe (eval mode)"),
                         ("test_acc", "test")):
        left.plot(epochs, [getattr(r, field) for r in records], marker=".", label=label)
    left.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    left.legend(fontsize=8)
    for field, label in (("train_loss", "train"), ("test_loss", "test")):
        right.plot(epochs, [getattr(r, field) for r in records], marker=".", label=label)
    right.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    right.legend(fontsize=8)
    figure.savefig(path, dpi=90)


def _geodesic(records: Sequence[EpochRecord], path: str) -> None:
    epochs = [r.epoch for r in records]
    fields = [(field, label) for field, label in (("lss", "LSS (1 = straight tracks)"),
                                                  ("ots", "OTS (1 = moves samples as OT does)"),
                                                  ("w_path_ratio", "W-path ratio (1 = geodesic)"))
              if getattr(records[-1], field) is not None]
    figure = Figure(figsize=(4.5 * len(fields), 3.4), layout="constrained")
    axes = figure.subplots(1, len(fields), squeeze=False)[0]
    for axis, (field, label) in zip(axes, fields):
        axis.plot(epochs, [math.nan if getattr(r, field) is None else getattr(r, field) for r in records], marker=".")
        axis.set(xlabel="epoch", title=label)
    figure.savefig(path, dpi=90)


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _summary(run: RunDirectory, records: Sequence[EpochRecord], figures: Sequence[str]) -> str:
    config = run.saved_options() if run.holds_run() else {}
    environment = run.environment() if run.holds_run() else None
    last = records[-1]
    lines = [f"# PFC report: {os.path.abspath(run.path)}", ""]
    if config:
        lines += ["Run: " + ", ".join(f"{key} = {value}" for key, value in config.items() if value is not None), ""]
    if environment:
        lines += ["Environment: " + ", ".join(f"{key} = {value}" for key, value in environment.items()), ""]
    lines += [f"Epoch {last.epoch}: train accuracy {last.train_acc:.4f} (running, train mode), probe accuracy "
              f"{last.probe_acc:.4f} (eval mode), test accuracy {last.test_acc:.4f}; train loss "
              f"{last.train_loss:.4g}, test loss {last.test_loss:.4g}.", ""]
    train_s = sum(r.train_seconds for r in records)
    measure_s = sum(r.measure_seconds for r in records)
    lines += [f"Time: training {train_s:.1f} s, PFC measurement {measure_s:.1f} s over {len(records)} epochs "
              f"({100 * measure_s / train_s:.1f}% of the training time).", ""]
    lines += ["## Monotonicity with depth at the last epoch", "",
              "| metric | Spearman rho with depth | p-value | adjacent pairs decreasing | verdict |",
              "|---|---|---|---|---|"]
    for field, label, _ in PFC_METRICS:
        result = monotonicity(last.series(field))
        lines.append(f"| {label.split(' ')[0]} ({field}) | {_format(result['spearman'])} | "
                     f"{_format(result['p_value'])} | {_format(result['decreasing_pairs'])} | {result['verdict']} |")
    lines += ["", "## Last epoch, per layer", "", "| layer | nc1 | nc2_etf | nc4 | ncc_accuracy | dim |",
              "|---|---|---|---|---|---|"]
    for layer in last.layers:
        lines.append(f"| {layer['name']} | {_format(layer['nc1'])} | {_format(layer['nc2_etf'])} | "
                     f"{_format(layer['nc4'])} | {_format(layer['ncc_accuracy'])} | {layer['dim']} |")
    if last.lss is not None:
        ots = f"OTS {last.ots:.4g}, " if last.ots is not None else ""
        lines += ["", f"Geodesic view (constant width): LSS {last.lss:.4g}, {ots}"
                      f"W-path ratio {_format(last.w_path_ratio)}."]
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str, out: str | None = None) -> str:
    """Write the figures and ``summary.md`` of ``run_dir``; returns the output directory.

    The run directory is checked first: ``checkpoint.pt`` against its recorded sha256, and the
    epochs of ``metrics.jsonl`` against the checkpoint's (:class:`RunDirectoryError` where they
    disagree)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    run = RunDirectory(run_dir)
    epoch = run.verified_epoch()  # before the records: a run in progress writes the records first
    records = run.records()
    if epoch is not None:
        run.check_records(records, epoch, "Restore it from a backup; the report shows only what it holds")
    if not records:
        raise ValueError(f"{run_dir} has no epochs yet (no {RunDirectory.METRICS} lines)")
    out = out or run.report_dir
    os.makedirs(out, exist_ok=True)
    plots: list[tuple[str, Callable[[Sequence[EpochRecord], str], None]]] = [
        ("pfc_vs_depth.png", _pfc_vs_depth), ("pfc_vs_epoch.png", _pfc_vs_epoch), ("training.png", _training)]
    if records[-1].has_geodesic:
        plots.append(("geodesic.png", _geodesic))
    for name, plot in plots:
        plot(records, os.path.join(out, name))
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(_summary(run, records, [name for name, _ in plots]))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``pfc-fast report``."""
    parser.add_argument("run_dir", help="directory written by pfc-fast train")
    parser.add_argument("--out", help="where to write (default RUN_DIR/report)")
    return parser


def run_cli(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Write the report of ``args.run_dir``; a missing, empty or damaged run is a ``parser.error``, a
    failed write exit status 1."""
    try:
        print(f"report: {write_report(args.run_dir, args.out)}")
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"argument run_dir: {error}")
    except OSError as error:  # a full disk, a read-only --out
        print(f"pfc-fast report: cannot write {error.filename or args.out or args.run_dir}: {error.strerror}",
              file=sys.stderr)
        return 1
    return 0

