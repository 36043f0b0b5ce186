"""``pfc-fast report RUN_DIR [RUN_DIR ...]``: figures and a markdown summary of ``pfc-fast train`` runs.

The figures are drawn with matplotlib's object API on its Agg canvas (no pyplot, no global
backend change), so the report also runs inside notebooks and on machines without a display.

Reads ``RUN_DIR/metrics.jsonl`` of each run. One run writes to ``RUN_DIR/report/``; several runs
(seeds of one configuration, say) write one aggregated report to ``FIRST_RUN_DIR/report/aggregate/``,
leaving each run's own report alone; ``--out`` chooses another directory. Several runs must have
the same layers (by name, in order: runs that differ are refused, naming them) and are compared at
the epochs all of them finished; their figures draw the mean over the runs as the line and the
min-max over the runs as a band.

- ``pfc_vs_depth.png``: PFC1 = ``nc1`` (log scale), PFC2 = ``nc2_etf``, PFC3 = ``nc4`` against
  the layer (stem, then every residual block), one curve per epoch coloured by epoch, the last
  epoch's min-max band over the runs, and the last epoch's null (``null_mean`` ± ``null_std``,
  labelled "null (permuted labels)") as a grey band where the records hold one;
- ``pfc_vs_epoch.png``: the same metrics against the epoch, one curve per layer;
- ``training.png``: train / test / probe accuracy and train / test loss against the epoch;
- ``geodesic.png`` (constant-width runs with ``lss``): LSS, OTS and the W-path ratio against the epoch;
- ``summary.md``: the last epoch's numbers and the verdict on each PFC metric's trend with depth.

Every panel has a y-axis label (``PFC1 (nc1)``, ...), every line markers (a 1-epoch run shows
points), every figure the run's name (its directory's basename; several: all of them) as its title.

The verdict (``docs/spec.md`` section 2), at the last epoch, on the values ``v_0 .. v_{L-1}`` of a
metric at the layers in forward order (:func:`trend`):

- ``rho``: Spearman's correlation of ``v`` with the layer index ``0 .. L-1`` (midranks for ties);
  ``p``: its two-sided p-value, exact for ``L <= EXACT_LAYERS`` (9: the fraction of the ``L!``
  orderings of the layers whose ``|rho|`` reaches the observed one, :func:`spearman_p_value`; with 3
  layers it is at least 1/3, with 4 at least 1/12, so fewer than 5 layers never give ``p < 0.05``),
  else ``scipy.stats.spearmanr``'s t approximation (Kendall & Stuart); a pair ``l, l + 1`` decreases where
  ``v_{l+1} < v_l`` strictly (ties neither decrease nor increase);
- ``"not measured at every layer"`` where a value is missing (``None``, NaN), ``"too few layers for
  a trend (L)"`` where ``L < 3``, ``"constant across layers"`` where every value is equal (no rho);
- otherwise, with ``p < ALPHA`` (0.05) and ``rho < 0``: ``"decreases monotonically"`` where every
  adjacent pair decreases, else ``"decreases (p < 0.05) but not at every layer"``; with
  ``p < 0.05`` and ``rho > 0``, ``"increases monotonically"`` or ``"increases (p < 0.05) but not at
  every layer"`` alike; else ``"no significant trend (rho = -0.28, p = 0.46)"``.

The null: a layer's record may hold ``null_mean`` and ``null_std``, dicts from the metric's name to
its mean and standard deviation over label permutations (``None`` or absent: no null). A layer is
*indistinguishable from the null* for a metric where ``|value - null_mean| <= NULL_SIGMAS *
null_std`` (2 standard deviations), or the value equals ``null_mean`` to a relative 1e-9 (so that
``null_std = 0``, every permutation giving the same value, means equality up to the rounding of the
mean); the verdict then ends ``"; indistinguishable from the null at layers a, b"``.

Several runs: the verdict is that of the per-layer mean over the runs (the rules above), then
``"; decreases in k of n runs"`` (the runs whose own verdict is a decrease with ``p < 0.05``,
monotone or not), then ``"; indistinguishable from the null at layers a (k of n runs), ..."``
counting, per layer, the runs where it is.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from matplotlib import cm, colormaps, colors
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator
from scipy.stats import rankdata, spearmanr

from .record import EpochRecord
from .run_directory import RunDirectory

#: The significance level of the Spearman test.
ALPHA = 0.05
#: Up to this many layers the Spearman p-value is exact (all L! orderings), beyond it asymptotic.
EXACT_LAYERS = 9
#: A layer within this many null standard deviations of the null mean is indistinguishable from it.
NULL_SIGMAS = 2.0
#: The legend entry of the null band.
NULL_LABEL = "null (permuted labels)"
#: The subdirectory of the first run's report directory that receives the report of several runs.
AGGREGATE = "aggregate"


class PFCMetric(NamedTuple):
    """A PFC metric: its :class:`pfc_fast.NCMetrics` field, its title, whether drawn on a log scale."""

    field: str
    title: str
    log: bool

    @property
    def label(self) -> str:
        """``"PFC1 (nc1)"``: the y-axis label and the name in the summary."""
        return f"{self.title.split(' ')[0]} ({self.field})"


#: The PFC metrics, docs/spec.md section 2.
PFC_METRICS = (PFCMetric("nc1", "PFC1 = NC1  Tr(Σ_W Σ_B⁺)/K", True),
               PFCMetric("nc2_etf", "PFC2 = NC2 (distance to simplex ETF)", False),
               PFCMetric("nc4", "PFC3 = NC4 (NCC ≠ network prediction)", False))
#: (field, y-axis label, title) of the geodesic scores.
GEODESIC_SCORES = (("lss", "LSS", "LSS (1 = straight tracks)"),
                   ("ots", "OTS", "OTS (1 = moves samples as OT does)"),
                   ("w_path_ratio", "W-path ratio", "W-path ratio (1 = geodesic)"))


# -- the verdict --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trend:
    """The trend of a metric with depth (the rules: the module docstring). ``spearman`` and
    ``p_value`` are NaN where undefined (a missing value, fewer than 3 layers, constant values)."""

    spearman: float
    p_value: float
    decreasing: int  #: adjacent pairs ``l, l + 1`` with ``v_{l+1} < v_l``
    increasing: int  #: adjacent pairs with ``v_{l+1} > v_l``
    pairs: int
    verdict: str

    @property
    def decreases(self) -> bool:
        """A significant decrease (``p < ALPHA``, ``rho < 0``), at every layer or not."""
        return self.p_value < ALPHA and self.spearman < 0


def trend(values: Sequence[float | None]) -> Trend:
    """The :class:`Trend` of ``values`` (a metric at the layers, in forward order)."""
    pairs = max(len(values) - 1, 0)
    if any(value is None or math.isnan(value) for value in values):
        return Trend(math.nan, math.nan, 0, 0, pairs, "not measured at every layer")
    numbers = [float(value) for value in values if value is not None]
    decreasing = sum(b < a for a, b in zip(numbers, numbers[1:]))
    increasing = sum(b > a for a, b in zip(numbers, numbers[1:]))
    if len(numbers) < 3 or len(set(numbers)) == 1:
        verdict = f"too few layers for a trend ({len(numbers)})" if len(numbers) < 3 else "constant across layers"
        return Trend(math.nan, math.nan, decreasing, increasing, pairs, verdict)
    rho = float(spearmanr(range(len(numbers)), numbers).statistic)
    p_value = spearman_p_value(numbers)
    if p_value < ALPHA and rho != 0:
        direction, every = ("decreases", decreasing) if rho < 0 else ("increases", increasing)
        verdict = (f"{direction} monotonically" if every == pairs
                   else f"{direction} (p < {ALPHA:g}) but not at every layer")
    else:
        verdict = f"no significant trend (rho = {rho:.2f}, p = {p_value:.2g})"
    return Trend(rho, p_value, decreasing, increasing, pairs, verdict)


@functools.lru_cache(maxsize=EXACT_LAYERS)
def _orderings(length: int) -> np.ndarray:
    """All ``length!`` permutations of ``0 .. length-1``, centred, as rows of a float64 array."""
    flat = itertools.chain.from_iterable(itertools.permutations(range(length)))
    orders = np.fromiter(flat, dtype=np.float64, count=length * math.factorial(length)).reshape(-1, length)
    return orders - (length - 1) / 2


def spearman_p_value(values: Sequence[float]) -> float:
    """Two-sided p-value of Spearman's rho between ``values`` and their index ``0 .. L-1``.

    Exact for ``L <= EXACT_LAYERS``: under the null every ordering of the layers is equally likely,
    so ``p`` is the fraction of the ``L!`` permutations ``pi`` whose ``|sum_l (pi_l - mean) r_l|``
    (``r``: the midranks of ``values``, centred; proportional to rho, ties included) reaches the
    observed one, up to a relative 1e-12 (rounding of equal statistics). Beyond, scipy's
    ``spearmanr`` (the t distribution with ``L - 2`` degrees of freedom). Needs ``L >= 3`` and
    values that are not all equal (else rho is undefined: ``trend`` says so before asking).
    """
    if len(values) > EXACT_LAYERS:
        return float(spearmanr(range(len(values)), values).pvalue)
    ranks = rankdata(values)
    ranks = ranks - ranks.mean()
    statistics = np.abs(_orderings(len(values)) @ ranks)
    observed = abs(float(np.dot(np.arange(len(values)) - (len(values) - 1) / 2, ranks)))
    return float(np.mean(statistics >= observed * (1 - 1e-12)))


def monotonicity(values: Sequence[float | None]) -> dict[str, Any]:
    """:func:`trend` as a JSON object: ``spearman``, ``p_value``, ``decreasing_pairs`` (the fraction
    of adjacent pairs that decrease; NaN for one layer) and ``verdict``."""
    result = trend(values)
    return {"spearman": result.spearman, "p_value": result.p_value,
            "decreasing_pairs": result.decreasing / result.pairs if result.pairs else math.nan,
            "verdict": result.verdict}


def null_of(layer: Mapping[str, Any], field: str) -> tuple[float, float] | None:
    """``(null_mean, null_std)`` of ``field`` in a layer's record, ``None`` where it holds no null."""
    mean, std = (layer.get("null_mean") or {}).get(field), (layer.get("null_std") or {}).get(field)
    return None if mean is None or std is None else (float(mean), float(std))


def indistinguishable(layer: Mapping[str, Any], field: str) -> bool:
    """Whether ``field`` of a layer's record is indistinguishable from its null (module docstring);
    ``False`` without a null or a value."""
    null, value = null_of(layer, field), layer.get(field)
    if null is None or value is None:
        return False
    mean, std = null
    return abs(value - mean) <= NULL_SIGMAS * std or math.isclose(value, mean, rel_tol=1e-9)


# -- the runs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """A run directory and its finished epochs."""

    directory: RunDirectory
    records: list[EpochRecord]

    @property
    def name(self) -> str:
        """The directory's basename."""
        return os.path.basename(os.path.normpath(os.path.abspath(self.directory.path)))


def load_run(run_dir: str) -> Run:
    """The run in ``run_dir``, its checkpoint and records checked (``checkpoint.pt`` against its
    recorded sha256, the epochs of ``metrics.jsonl`` against the checkpoint's:
    :class:`RunDirectoryError` where they disagree). ``FileNotFoundError`` and ``ValueError`` name
    ``run_dir`` where it is missing, a file, or holds no epochs."""
    if os.path.isfile(run_dir):
        raise ValueError(f"run directory {run_dir!r} is a file, not a directory")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    run = RunDirectory(run_dir)
    epoch = run.verified_epoch()  # before the records: a run in progress writes the records first
    records = run.records()
    if epoch is not None:
        run.check_records(records, epoch, "Restore it from a backup; the report shows only what it holds")
    if not records:
        raise ValueError(f"run directory {run_dir!r} has no epochs yet (no lines in {RunDirectory.METRICS})"
                         if run.holds_run() else f"run directory {run_dir!r} holds no pfc-fast run (no "
                         f"{RunDirectory.CONFIG}, no {RunDirectory.METRICS})")
    return Run(run, records)


def _array(rows: Iterable[Iterable[float | None]]) -> np.ndarray:
    """A float array of ``rows``, ``None`` as NaN."""
    return np.array([[math.nan if value is None else value for value in row] for row in rows], dtype=float)


class Runs:
    """The runs of one report (one, or several seeds) at the epochs all of them finished.

    ``ValueError`` for the same directory twice, runs whose layers differ (naming both), or runs
    without an epoch in common."""

    def __init__(self, runs: Sequence[Run]) -> None:
        self.runs = list(runs)
        first = self.runs[0]
        for run in self.runs[1:]:
            if os.path.realpath(run.directory.path) == os.path.realpath(first.directory.path):
                raise ValueError(f"{run.directory.path!r} is given twice")
            if run.records[-1].layer_names != first.records[-1].layer_names:
                raise ValueError(f"runs with different layers cannot be aggregated: {run.directory.path!r} has "
                                 f"{', '.join(run.records[-1].layer_names)}; {first.directory.path!r} has "
                                 f"{', '.join(first.records[-1].layer_names)}")
        self._by_epoch = [{record.epoch: record for record in run.records} for run in self.runs]
        self.epochs = sorted(set.intersection(*(set(epochs) for epochs in self._by_epoch)))
        if not self.epochs:
            raise ValueError(f"runs {', '.join(repr(run.directory.path) for run in self.runs)} have no epoch in common")
        self.layer_names = first.records[-1].layer_names

    @property
    def last_epoch(self) -> int:
        """The last epoch all the runs finished."""
        return self.epochs[-1]

    def at(self, epoch: int) -> list[EpochRecord]:
        """Each run's record of ``epoch``."""
        return [records[epoch] for records in self._by_epoch]

    def values(self, field: str, epoch: int) -> np.ndarray:
        """``field`` at ``epoch``: (runs, layers), NaN where not measured."""
        return _array(record.series(field) for record in self.at(epoch))

    def over_epochs(self, value: Callable[[EpochRecord], float | None]) -> np.ndarray:
        """``value`` of each run's records: (runs, epochs), NaN where ``None``."""
        return _array([value(records[epoch]) for epoch in self.epochs] for records in self._by_epoch)

    def null(self, field: str, epoch: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The null of ``field`` at ``epoch`` per layer, the mean over the runs that hold one of
        ``null_mean`` and of ``null_std`` (NaN at a layer none holds); ``None`` where no layer has one."""
        nulls = [[null_of(record.layers[depth], field) for record in self.at(epoch)]
                 for depth in range(len(self.layer_names))]
        if not any(null is not None for layer in nulls for null in layer):
            return None
        means = _array([[None if null is None else null[0] for null in layer] for layer in nulls])
        stds = _array([[None if null is None else null[1] for null in layer] for layer in nulls])
        return _nan_mean(means), _nan_mean(stds)

    @property
    def title(self) -> str:
        """The name of the run, or the names of the runs and what the figures draw."""
        if len(self.runs) == 1:
            return self.runs[0].name
        return textwrap.fill(f"{', '.join(run.name for run in self.runs)}: mean (lines) and min-max (bands) over "
                             f"{len(self.runs)} runs", 120)


def _nan_mean(rows: np.ndarray) -> np.ndarray:
    """The mean of each row over its values that are not NaN (NaN for a row without any)."""
    counts = np.sum(~np.isnan(rows), axis=1)
    return np.where(counts > 0, np.nansum(rows, axis=1) / np.maximum(counts, 1), math.nan)


def verdict(runs: Runs, field: str) -> tuple[Trend, str]:
    """The trend of ``field`` with depth at the last epoch (of the per-layer mean over several runs)
    and the verdict in words (the rules: the module docstring)."""
    records = runs.at(runs.last_epoch)
    overall = trend(runs.values(field, runs.last_epoch).mean(axis=0).tolist())
    parts = [overall.verdict]
    count = len(records)
    if count > 1:
        parts.append(f"decreases in {sum(trend(r.series(field)).decreases for r in records)} of {count} runs")
    counts = [(name, sum(indistinguishable(r.layers[depth], field) for r in records))
              for depth, name in enumerate(runs.layer_names)]
    near = [(name, runs_near) for name, runs_near in counts if runs_near]
    if near:
        layers = ", ".join(name if count == 1 else f"{name} ({runs_near} of {count} runs)" for name, runs_near in near)
        parts.append(f"indistinguishable from the null at layer{'s' if len(near) > 1 else ''} {layers}")
    return overall, "; ".join(parts)


# -- the figures --------------------------------------------------------------------------------

def _band(axis: Axes, x: Sequence[float], values: np.ndarray, spread: bool = True, **style: Any) -> None:
    """The mean over the runs (the rows of ``values``) as a line with markers and, with ``spread``
    and several runs, their min-max as a band of the line's colour."""
    line, = axis.plot(x, values.mean(axis=0), marker="o", markersize=3, lw=1, **style)
    if spread and len(values) > 1:
        axis.fill_between(x, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2, lw=0)


def _layer_axis(axis: Axes, names: Sequence[str]) -> None:
    axis.set_xticks(range(len(names)))
    axis.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    axis.set_xlabel("layer (forward order)")


def _epoch_ticks(axis: Axis, epochs: Sequence[int]) -> None:
    """Ticks at whole epochs (at the one epoch of a 1-epoch run)."""
    axis.set_major_locator(FixedLocator(epochs) if len(epochs) == 1 else MaxNLocator(integer=True))


def _epoch_axis(axis: Axes, epochs: Sequence[int]) -> None:
    axis.set_xlabel("epoch")
    _epoch_ticks(axis.xaxis, epochs)


def pfc_vs_depth(runs: Runs) -> Figure:
    """The PFC metrics against the layer, one curve per epoch, the last epoch's min-max band over
    the runs and its null band."""
    cmap = colormaps["viridis"]
    norm = colors.Normalize(vmin=runs.epochs[0], vmax=runs.last_epoch)
    depths = list(range(len(runs.layer_names)))
    figure = Figure(figsize=(13, 4.3), layout="constrained")
    axes = figure.subplots(1, len(PFC_METRICS))
    for axis, metric in zip(axes, PFC_METRICS):
        for epoch in runs.epochs:
            last = epoch == runs.last_epoch
            _band(axis, depths, runs.values(metric.field, epoch), spread=last, color=cmap(norm(epoch)),
                  label=f"epoch {epoch}" if last else None)
        null = runs.null(metric.field, runs.last_epoch)
        if null is not None:
            mean, std = null
            # outlined: a null_std of 0 still shows, as a line
            axis.fill_between(depths, mean - std, mean + std, facecolor=(0.5, 0.5, 0.5, 0.3), edgecolor="0.5",
                              lw=0.8, zorder=0, label=NULL_LABEL)
        if metric.log:
            axis.set_yscale("log")
        axis.set_title(metric.title, fontsize=9)
        axis.set_ylabel(metric.label)
        axis.legend(fontsize=7)
        _layer_axis(axis, runs.layer_names)
    colorbar = figure.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.9)
    colorbar.set_label("epoch")
    _epoch_ticks(colorbar.ax.yaxis, runs.epochs)
    figure.suptitle(runs.title, fontsize=10)
    return figure


def pfc_vs_epoch(runs: Runs) -> Figure:
    """The PFC metrics against the epoch, one curve per layer."""
    names = runs.layer_names
    cmap = colormaps["plasma"]
    norm = colors.Normalize(vmin=0, vmax=max(1, len(names) - 1))
    figure = Figure(figsize=(13, 4.3), layout="constrained")
    axes = figure.subplots(1, len(PFC_METRICS))
    for axis, metric in zip(axes, PFC_METRICS):
        for depth, name in enumerate(names):
            _band(axis, runs.epochs, runs.over_epochs(lambda r: r.layers[depth][metric.field]),
                  color=cmap(norm(depth)), label=name)
        if metric.log:
            axis.set_yscale("log")
        axis.set_title(metric.title, fontsize=9)
        axis.set_ylabel(metric.label)
        _epoch_axis(axis, runs.epochs)
    axes[-1].legend(fontsize=6, ncol=2, title="layer", title_fontsize=7)
    figure.suptitle(runs.title, fontsize=10)
    return figure


def training(runs: Runs) -> Figure:
    """Accuracies and losses against the epoch."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    for field, label in (("train_acc", "train (running, train mode)"), ("probe_acc", "probe (eval mode)"),
                         ("test_acc", "test")):
        _band(left, runs.epochs, runs.over_epochs(lambda r: getattr(r, field)), label=label)
    left.set(ylabel="accuracy", title="accuracy")
    for field, label in (("train_loss", "train"), ("test_loss", "test")):
        _band(right, runs.epochs, runs.over_epochs(lambda r: getattr(r, field)), label=label)
    right.set(ylabel="cross-entropy", yscale="log", title="loss")
    for axis in (left, right):
        _epoch_axis(axis, runs.epochs)
        axis.legend(fontsize=8)
    figure.suptitle(runs.title, fontsize=10)
    return figure


def _geodesic_scores(runs: Runs) -> list[tuple[str, str, str]]:
    """The geodesic scores every run measured at the last epoch."""
    return [score for score in GEODESIC_SCORES
            if all(getattr(record, score[0]) is not None for record in runs.at(runs.last_epoch))]


def geodesic(runs: Runs) -> Figure:
    """The geodesic scores (constant-width runs) against the epoch."""
    scores = _geodesic_scores(runs)
    figure = Figure(figsize=(4.5 * len(scores), 3.8), layout="constrained")
    axes = figure.subplots(1, len(scores), squeeze=False)[0]
    for axis, (field, label, title) in zip(axes, scores):
        _band(axis, runs.epochs, runs.over_epochs(lambda r: getattr(r, field)))
        axis.set(ylabel=label, title=title)
        _epoch_axis(axis, runs.epochs)
    figure.suptitle(runs.title, fontsize=10)
    return figure


def figures(runs: Runs) -> dict[str, Figure]:
    """The figures of the report by file name (``geodesic.png`` where every run measured LSS)."""
    drawn = {"pfc_vs_depth.png": pfc_vs_depth(runs), "pfc_vs_epoch.png": pfc_vs_epoch(runs),
             "training.png": training(runs)}
    if all(record.has_geodesic for record in runs.at(runs.last_epoch)):
        drawn["geodesic.png"] = geodesic(runs)
    return drawn


# -- the summary --------------------------------------------------------------------------------

def _number(value: Any) -> str:
    """4 significant digits; ``-`` for ``None`` and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _spread(values: np.ndarray) -> str:
    """One run's value, or ``mean [min, max]`` over several runs (``-`` where one is missing)."""
    if len(values) == 1:
        return _number(float(values[0]))
    if np.isnan(values).any():
        return "-"
    return f"{values.mean():.4g} [{values.min():.4g}, {values.max():.4g}]"


def _options(runs: Runs) -> list[str]:
    """The options line(s): those of the run, or those the runs share and those that differ."""
    saved = [run.directory.saved_options() if run.directory.holds_run() else {} for run in runs.runs]
    keys = [key for key in saved[0] if any(options.get(key) is not None for options in saved)]
    shared = [key for key in keys if all(options.get(key) == saved[0][key] for options in saved)]
    lines = []
    if shared:
        lines += [("Run: " if len(saved) == 1 else "Options of every run: ")
                  + ", ".join(f"{key} = {saved[0][key]}" for key in shared), ""]
    differing = [key for key in keys if key not in shared]
    if differing:
        lines += ["Options that differ: " + ", ".join(
            f"{key} = {' / '.join(str(options.get(key)) for options in saved)}" for key in differing), ""]
    return lines


def _accuracy(runs: Runs) -> list[str]:
    """The last epoch's accuracies and losses: a sentence, or a table of the runs."""
    records = runs.at(runs.last_epoch)
    if len(records) == 1:
        last = records[0]
        return [f"Epoch {last.epoch}: train accuracy {last.train_acc:.4f} (running, train mode), probe accuracy "
                f"{last.probe_acc:.4f} (eval mode), test accuracy {last.test_acc:.4f}; train loss "
                f"{last.train_loss:.4g}, test loss {last.test_loss:.4g}.", ""]
    fields = ("train_acc", "probe_acc", "test_acc", "train_loss", "test_loss")
    lines = [f"Epoch {runs.last_epoch}" + (f" (the last all the runs finished; they end at epochs "
                                           f"{', '.join(str(run.records[-1].epoch) for run in runs.runs)})"
                                           if any(run.records[-1].epoch != runs.last_epoch for run in runs.runs)
                                           else "") + ":", "",
             "| run | " + " | ".join(fields) + " |", "|---" * (len(fields) + 1) + "|"]
    for run, record in zip(runs.runs, records):
        lines.append(f"| {run.name} | " + " | ".join(_number(getattr(record, field)) for field in fields) + " |")
    lines.append("| mean [min, max] | " + " | ".join(
        _spread(np.array([getattr(record, field) for record in records], dtype=float)) for field in fields) + " |")
    return lines + [""]


def summary(runs: Runs, figure_names: Sequence[str]) -> str:
    """The markdown summary of the report."""
    several = len(runs.runs) > 1
    lines = [f"# PFC report: {len(runs.runs)} runs" if several else
             f"# PFC report: {os.path.abspath(runs.runs[0].directory.path)}", ""]
    if several:
        lines += [f"- {run.name}: {os.path.abspath(run.directory.path)}" for run in runs.runs] + [""]
    lines += _options(runs)
    environment = runs.runs[0].directory.environment() if runs.runs[0].directory.holds_run() else None
    if environment and not several:
        lines += ["Environment: " + ", ".join(f"{key} = {value}" for key, value in environment.items()), ""]
    lines += _accuracy(runs)
    records = [record for run in runs.runs for record in run.records]
    train_s = sum(r.train_seconds for r in records)
    measure_s = sum(r.measure_seconds for r in records)
    share = f"{100 * measure_s / train_s:.1f}%" if train_s else "-"
    lines += [f"Time{' (all runs)' if several else ''}: training {train_s:.1f} s, PFC measurement {measure_s:.1f} s "
              f"over {len(records)} epoch{'s' if len(records) > 1 else ''} ({share} of the training time).", ""]

    mean = "of the mean over the runs " if several else ""
    lines += [f"## Trend with depth at epoch {runs.last_epoch}", "",
              f"| metric | Spearman rho {mean}with depth | p-value | adjacent pairs decreasing | verdict |",
              "|---|---|---|---|---|"]
    for metric in PFC_METRICS:
        result, words = verdict(runs, metric.field)
        lines.append(f"| {metric.label} | {_number(result.spearman)} | {_number(result.p_value)} | "
                     f"{result.decreasing} of {result.pairs} | {words} |")
    if several:
        lines += ["", "Each run:", "", "| run | " + " | ".join(metric.label for metric in PFC_METRICS) + " |",
                  "|---" * (len(PFC_METRICS) + 1) + "|"]
        for run, record in zip(runs.runs, runs.at(runs.last_epoch)):
            lines.append(f"| {run.name} | " + " | ".join(trend(record.series(metric.field)).verdict
                                                        for metric in PFC_METRICS) + " |")

    fields = ("nc1", "nc2_etf", "nc4", "ncc_accuracy")
    nulls = {metric.field: null for metric in PFC_METRICS
             if (null := runs.null(metric.field, runs.last_epoch)) is not None}
    lines += ["", f"## Epoch {runs.last_epoch}, per layer" + (" (mean [min, max] over the runs)" if several else ""),
              "", "| layer | " + " | ".join([*fields, *(f"{field} null (mean ± std)" for field in nulls)])
              + " | dim |", "|---" * (len(fields) + len(nulls) + 2) + "|"]
    last = runs.at(runs.last_epoch)
    for depth, name in enumerate(runs.layer_names):
        cells = [_spread(runs.values(field, runs.last_epoch)[:, depth]) for field in fields]
        cells += ["-" if math.isnan(null_mean[depth]) else f"{null_mean[depth]:.4g} ± {null_std[depth]:.2g}"
                  for null_mean, null_std in nulls.values()]
        dims = " / ".join(dict.fromkeys(str(record.layers[depth]["dim"]) for record in last))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {dims} |")
    if all(record.has_geodesic for record in last):
        lines += ["", "Geodesic view (constant width): " + ", ".join(
            f"{label} {_spread(np.array([getattr(record, field) for record in last], dtype=float))}"
            for field, label, _ in _geodesic_scores(runs)) + "."]
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figure_names]
    return "\n".join(lines) + "\n"


def write_report(*run_dirs: str, out: str | None = None) -> str:
    """Write the figures and ``summary.md`` of the runs in ``run_dirs`` (one, or several aggregated:
    the module docstring) to ``out`` (default ``RUN_DIR/report``, for several runs
    ``FIRST_RUN_DIR/report/aggregate``); returns the output directory.

    Each run directory is checked first (:func:`load_run`); runs that cannot be aggregated are a
    ``ValueError`` (:class:`Runs`)."""
    if not run_dirs:
        raise ValueError("no run directory given")
    runs = Runs([load_run(run_dir) for run_dir in run_dirs])
    first = runs.runs[0].directory
    out = out or (first.report_dir if len(run_dirs) == 1 else os.path.join(first.report_dir, AGGREGATE))
    os.makedirs(out, exist_ok=True)
    drawn = figures(runs)
    for name, figure in drawn.items():
        figure.savefig(os.path.join(out, name), dpi=90)
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(summary(runs, list(drawn)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``pfc-fast report``."""
    parser.add_argument("run_dir", nargs="+",
                        help="directory written by pfc-fast train; several: one report over all of them (seeds)")
    parser.add_argument("--out", help=f"where to write (default RUN_DIR/report; several runs: "
                                      f"FIRST_RUN_DIR/report/{AGGREGATE})")
    return parser


def run_cli(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Write the report of ``args.run_dir``; a missing, empty or damaged run, or runs that cannot be
    aggregated, are a ``parser.error``, a failed write exit status 1."""
    try:
        print(f"report: {write_report(*args.run_dir, out=args.out)}")
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"argument run_dir: {error}")
    except OSError as error:  # a full disk, a read-only --out
        print(f"pfc-fast report: cannot write {error.filename or args.out or args.run_dir[0]}: {error.strerror}",
              file=sys.stderr)
        return 1
    return 0
