"""``pfc-fast report`` on synthetic run directories (records written through :class:`RunDirectory`):
the verdict rules against scipy computed here, the null, several runs, bad input, and the figures'
artists (y labels, markers, bands, titles)."""
import dataclasses
import math
import os

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from scipy.stats import permutation_test, rankdata, spearmanr

from pfc_fast import NCMetrics
from pfc_fast.app import cli
from pfc_fast.app.config import TrainConfig
from pfc_fast.app.record import EpochRecord
from pfc_fast.app.report import (NULL_LABEL, PFC_METRICS, Runs, figures, indistinguishable, load_run, monotonicity,
                                 spearman_p_value, trend, write_report)
from pfc_fast.app.run_directory import RunDirectory

NAMES = ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1"]
#: The fields of NCMetrics but the null (the files of older runs lack it) and per_class.
FIELDS = [f.name for f in dataclasses.fields(NCMetrics) if f.name != "per_class" and not f.name.startswith("null_")]
MONOTONE = [5.0, 4.0, 3.0, 2.0, 1.0]
BUMPY = [4.0, 3.5, 3.5, 2.0, 1.0]  # decreases with p < 0.05 (exact: 5 layers), not from layer1.0 to layer1.1 (a tie)
FLAT = [2.0, 1.0, 3.0, 1.5, 2.5]
NO_NULL = "null keys present, None"


def _layer(name, values, null=None):
    """A layer's record as NCMetrics.to_dict() writes it; ``null``: ``(means, stds)`` dicts, ``None``
    (no null keys, as in existing runs) or ``NO_NULL`` (the keys, ``None``)."""
    layer = {"name": name, **{field: 0.5 for field in FIELDS}, "num_samples": 50, "class_counts": [5] * 10,
             "num_classes": 10, "dim": 64, **values}
    if null == NO_NULL:
        layer.update(null_mean=None, null_std=None)
    elif null is not None:
        layer.update(null_mean=null[0], null_std=null[1])
    return layer


def _write_run(path, last, epochs=3, nulls=None, names=NAMES, seed=None):
    """A run directory whose last epoch has the per-layer ``last`` values ({field: list}); earlier
    epochs are (epochs - e + 1) times larger. ``nulls``: one ``_layer`` null per layer (last epoch)."""
    directory = RunDirectory(str(path))
    os.makedirs(path)
    if seed is not None:
        directory.create(TrainConfig(dataset="digits", seed=seed), {})
    records = []
    for epoch in range(1, epochs + 1):
        scale = epochs - epoch + 1
        layers = [_layer(name, {field: values[depth] * scale for field, values in last.items()},
                         (nulls or [None] * len(names))[depth] if epoch == epochs else None)
                  for depth, name in enumerate(names)]
        records.append(EpochRecord.from_dict({
            "epoch": epoch, "lr": 0.05, "train_loss": 1.0 / epoch, "train_acc": 1 - 0.1 / epoch,
            "test_loss": 2.0 / epoch, "test_acc": 0.8, "probe_acc": 0.9, "layers": layers, "train_seconds": 2.0, "measure_seconds": 0.1,
            "test_seconds": 0.2, "geodesic_seconds": 0.0, "forward_passes": 1}))
    directory.write_records(records)
    return str(path)


def _summary(out):
    with open(os.path.join(out, "summary.md")) as handle:
        return handle.read()


def _row(summary, label, which=0):
    """The cells (but the first) of the summary's table rows that start with ``label``: the first, or ``which``."""
    line = [line for line in summary.splitlines() if line.startswith(f"| {label} |")][which]
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def _scipy(values):
    """rho and its two-sided p-value: scipy's exact permutation test up to 9 layers, spearmanr's beyond."""
    result = spearmanr(np.arange(len(values)), values)
    if len(values) > 9:
        return float(result.statistic), float(result.pvalue)

    def rho(sample, axis):
        ranks = rankdata(sample, axis=axis)
        ranks = ranks - ranks.mean(axis=axis, keepdims=True)
        index = np.arange(sample.shape[axis]) - (sample.shape[axis] - 1) / 2
        return (ranks * index).sum(axis) / np.sqrt((ranks ** 2).sum(axis) * (index ** 2).sum())

    exact = permutation_test((np.asarray(values, dtype=float),), rho, permutation_type="pairings",
                             n_resamples=np.inf, vectorized=True)
    return float(result.statistic), float(exact.pvalue)


@pytest.mark.parametrize("values,verdict", [
    (MONOTONE, "decreases monotonically"),
    ([9, 7, 8, 5, 4, 2, 3, 1], "decreases (p < 0.05) but not at every layer"),
    ([1, 2, 3, 4, 5], "increases monotonically"),
    ([1, 2, 3, 4], "no significant trend (rho = 1.00, p = 0.083)"),  # exact: 2 of the 4! orderings reach |rho| = 1
    ([1, 3, 2, 4, 6, 5, 7, 8], "increases (p < 0.05) but not at every layer"),
    ([5, 2, 7, 3, 4, 6, 8, 0, 1], "no significant trend (rho = -0.28, p = 0.46)"),  # the issue's example
    ([4.0, 3.0, 2.0, 2.0, 1.0], "decreases (p < 0.05) but not at every layer"),  # a tie is no decrease
])
def test_verdicts_follow_the_spearman_test(values, verdict):
    result = trend(values)
    rho, p_value = _scipy(values)
    assert result.spearman == pytest.approx(rho) and result.p_value == pytest.approx(p_value)
    assert result.decreasing == sum(b < a for a, b in zip(values, values[1:])) and result.pairs == len(values) - 1
    assert result.verdict == verdict
    assert result.decreases == (p_value < 0.05 and rho < 0)


@pytest.mark.parametrize("seed", range(6))
def test_exact_spearman_p_value_against_scipys_permutation_test(seed):
    """Fresh random curves of 3 to 9 layers, half of them with ties (rounded values), against
    scipy's exact permutation test; beyond 9 layers, spearmanr's asymptotic p-value."""
    rng = np.random.default_rng(seed)
    for length in range(3, 10):
        values = np.cumsum(rng.normal(-0.5, 1.0, length))
        values = np.round(values) if seed % 2 else values
        if len(set(values)) == 1:
            continue
        assert spearman_p_value(values.tolist()) == pytest.approx(_scipy(values.tolist())[1], rel=1e-9)
    long = rng.normal(size=12).tolist()
    assert spearman_p_value(long) == pytest.approx(float(spearmanr(np.arange(12), long).pvalue), rel=1e-12)


def test_spearman_rho_by_hand_and_the_json_form():
    values = [4.0, 3.0, 3.5, 1.0]  # ranks 4, 2, 3, 1: rho = 1 - 6 (9 + 0 + 0 + 9) / (4 * 15) = -0.8
    ranks = rankdata(values)
    assert trend(values).spearman == pytest.approx(1 - 6 * np.sum((ranks - np.arange(1, 5)) ** 2) / 60) == -0.8
    assert monotonicity(values) == {"spearman": pytest.approx(-0.8), "p_value": pytest.approx(_scipy(values)[1]),
                                    "decreasing_pairs": pytest.approx(2 / 3), "verdict": trend(values).verdict}


@pytest.mark.parametrize("values,verdict", [
    ([2.0, 2.0, 2.0], "constant across layers"),
    ([2.0, 1.0], "too few layers for a trend (2)"),
    ([2.0], "too few layers for a trend (1)"),
    ([2.0, None, 1.0, 0.5], "not measured at every layer"),
    ([2.0, math.nan, 1.0, 0.5], "not measured at every layer"),
])
def test_verdicts_without_a_trend_are_words_not_nan(values, verdict):
    result = trend(values)
    assert result.verdict == verdict and math.isnan(result.spearman) and not result.decreases


@pytest.mark.parametrize("value,mean,std,near", [
    (1.0, 1.5, 0.25, True),  # 2 standard deviations exactly
    (1.0, 1.5, 0.2499, False),
    (2.0, 1.5, 0.25, True),
    (0.5, 0.5, 0.0, True),  # null_std = 0: equal
    (0.5, 0.5 * (1 + 1e-12), 0.0, True),  # to the rounding of the mean
    (0.5, 0.51, 0.0, False),
])
def test_the_null_rule(value, mean, std, near):
    assert indistinguishable(_layer("stem", {"nc1": value}, ({"nc1": mean}, {"nc1": std})), "nc1") == near


def test_no_null_is_never_indistinguishable():
    assert not indistinguishable(_layer("stem", {"nc1": 1.0}), "nc1")
    assert not indistinguishable(_layer("stem", {"nc1": 1.0}, NO_NULL), "nc1")
    assert not indistinguishable(_layer("stem", {"nc1": 1.0}, ({"nc2_etf": 1.0}, {"nc2_etf": 1.0})), "nc1")
    assert not indistinguishable(_layer("stem", {"nc4": None}, ({"nc4": 0.0}, {"nc4": 1.0})), "nc4")


def _axes(figure):
    return [axis for axis in figure.axes if axis.get_label() != "<colorbar>"]


def _bands(axis):
    """(null bands, other bands) of ``axis``."""
    polygons = [c for c in axis.collections if isinstance(c, PolyCollection)]
    return [c for c in polygons if c.get_label() == NULL_LABEL], [c for c in polygons if c.get_label() != NULL_LABEL]


def _check_figures(drawn, title):
    for name, figure in drawn.items():
        assert figure.get_suptitle().startswith(title), name
        for axis in _axes(figure):
            assert axis.get_ylabel(), f"{name}: {axis.get_title()} has no y label"
            assert axis.lines and all(line.get_marker() not in (None, "", " ", "None") for line in axis.lines), name
    for figure in (drawn["pfc_vs_depth.png"], drawn["pfc_vs_epoch.png"]):
        assert [axis.get_ylabel() for axis in _axes(figure)] == ["PFC1 (nc1)", "PFC2 (nc2_etf)", "PFC3 (nc4)"]


def test_report_of_one_run_with_a_null(tmp_path):
    std = {"nc1": 0.1, "nc2_etf": 0.1, "nc4": 0.0}
    nulls = [NO_NULL] + [({"nc1": nc1, "nc2_etf": nc2, "nc4": 0.5}, std)  # the stem: the keys without a null
                         for nc1, nc2 in ((9.0, 3.4), (9.0, 1.0), (2.1, 1.0), (2.1, 1.0))]
    last = {"nc1": MONOTONE, "nc2_etf": BUMPY, "nc4": [0.5, 0.3, 0.5, 0.4, 0.5]}
    run = _write_run(tmp_path / "seed-run", last, nulls=nulls)
    assert cli.main(["report", run]) == 0  # one run: RUN/report, as before
    out = os.path.join(run, "report")
    assert sorted(os.listdir(out)) == ["pfc_vs_depth.png", "pfc_vs_epoch.png", "summary.md", "training.png"]
    summary = _summary(out)
    rho, p_value = _scipy(BUMPY)
    # within 2 std: nc1 at layer2.0 (2.0 against 2.1 ± 0.1; layer2.1: 1.0, 11 std away), nc2_etf at layer1.0
    # (3.5 against 3.4 ± 0.1) and layer2.1 (1.0 against 1 ± 0.1); nc4 equals its null (std 0) at layer1.1, layer2.1
    assert _row(summary, "PFC1 (nc1)") == [f"{value:.4g}" for value in _scipy(MONOTONE)] + [
        "4 of 4", "decreases monotonically; indistinguishable from the null at layer layer2.0"]
    assert _row(summary, "PFC2 (nc2_etf)") == [f"{rho:.4g}", f"{p_value:.4g}", "3 of 4",
                                               "decreases (p < 0.05) but not at every layer; indistinguishable from "
                                               "the null at layers layer1.0, layer2.1"]
    rho, p_value = _scipy(last["nc4"])
    assert _row(summary, "PFC3 (nc4)")[-1] == (f"no significant trend (rho = {rho:.2f}, p = {p_value:.2g}); "
                                               "indistinguishable from the null at layers layer1.1, layer2.1")
    assert _row(summary, "stem")[-4:] == ["-", "-", "-", "64"]  # null columns: none at the stem
    assert _row(summary, "layer2.0")[-4:] == ["2.1 ± 0.1", "1 ± 0.1", "0.5 ± 0", "64"]

    drawn = figures(Runs([load_run(run)]))
    _check_figures(drawn, "seed-run")
    assert drawn["pfc_vs_depth.png"].get_suptitle() == "seed-run"
    for axis, metric in zip(_axes(drawn["pfc_vs_depth.png"]), PFC_METRICS):
        nulls_drawn, spreads = _bands(axis)
        assert len(nulls_drawn) == 1 and not spreads  # one run: no min-max band
        assert NULL_LABEL in axis.get_legend_handles_labels()[1]
        assert len(axis.lines) == 3 and list(axis.lines[-1].get_ydata()) == last[metric.field]
    assert not any(_bands(axis)[0] for axis in _axes(drawn["pfc_vs_epoch.png"]))  # the null: against depth only


def test_a_one_epoch_run_without_a_null_shows_points(tmp_path):
    run = _write_run(tmp_path / "one", {"nc1": MONOTONE, "nc2_etf": FLAT, "nc4": [0.0] * 5}, epochs=1)
    out = write_report(run, out=str(tmp_path / "figs"))
    assert out == str(tmp_path / "figs")
    summary = _summary(out)
    assert _row(summary, "PFC3 (nc4)") == ["-", "-", "0 of 4", "constant across layers"]
    assert "null" not in summary and "nan" not in summary
    drawn = figures(Runs([load_run(run)]))
    _check_figures(drawn, "one")
    for figure in drawn.values():
        for axis in _axes(figure):
            assert not any(_bands(axis))
    for axis in _axes(drawn["pfc_vs_epoch.png"]):
        assert [list(line.get_xdata()) for line in axis.lines] == [[1]] * len(NAMES)


def _seeds(tmp_path, epochs=(3, 3, 3)):
    """Three runs: the first two decrease with depth (with a null at the stem, none in the third
    run), the third does not."""
    lasts = [{"nc1": [5.0, 4.0, 3.0, 2.0, 1.0], "nc2_etf": [1.0, 0.8, 0.8, 0.4, 0.2], "nc4": FLAT},
             {"nc1": [6.0, 4.5, 3.5, 2.5, 1.5], "nc2_etf": [1.1, 0.9, 0.7, 0.5, 0.3], "nc4": MONOTONE},
             {"nc1": [3.0, 4.0, 2.0, 5.0, 1.0], "nc2_etf": [0.3, 0.4, 0.2, 0.5, 0.1], "nc4": FLAT}]
    null = ({"nc1": 5.0, "nc2_etf": 0.0, "nc4": 0.0}, {"nc1": 1.0, "nc2_etf": 0.01, "nc4": 0.01})
    return [_write_run(tmp_path / f"run-s{seed}", last, epochs=epochs[seed], seed=seed,
                       nulls=[null] + [NO_NULL] * 4 if seed < 2 else None) for seed, last in enumerate(lasts)], lasts


def test_several_runs_aggregate_with_a_verdict_over_the_seeds(tmp_path, capsys):
    runs, lasts = _seeds(tmp_path, epochs=(3, 3, 2))
    assert cli.main(["report", *runs]) == 0
    out = os.path.join(runs[0], "report", "aggregate")
    assert capsys.readouterr().out == f"report: {out}\n"
    assert not os.path.exists(os.path.join(runs[0], "report", "summary.md"))  # the run's own report untouched
    summary = _summary(out)
    assert summary.startswith("# PFC report: 3 runs\n")
    assert "Options that differ: seed = 0 / 1 / 2" in summary and "dataset = digits" in summary
    assert "Epoch 2 (the last all the runs finished; they end at epochs 3, 3, 2):" in summary
    # at epoch 2 the first two runs' values are twice their last ones: the ranks are the same
    for metric, decreasing in (("nc1", 2), ("nc2_etf", 2), ("nc4", 1)):
        mean = np.mean([np.multiply(last[metric], scale) for last, scale in zip(lasts, (2, 2, 1))], axis=0)
        rho, p_value = _scipy(mean)
        expected = trend(mean.tolist()).verdict + f"; decreases in {decreasing} of 3 runs"
        row = _row(summary, next(m.label for m in PFC_METRICS if m.field == metric))
        assert row[:2] == [f"{rho:.4g}", f"{p_value:.4g}"] and row[-1].startswith(expected)
    # the null is at epoch 3 of the first two runs, so not at the common epoch 2
    assert "indistinguishable" not in summary
    assert _row(summary, "run-s2") == ["0.95", "0.9", "0.8", "0.5", "1"]  # epoch 2's numbers
    assert _row(summary, "mean [min, max]")[0] == "0.95 [0.95, 0.95]"
    assert _row(summary, "layer1.0")[0] == f"{np.mean([2 * 4.0, 2 * 4.5, 4.0]):.4g} [4, 9]"

    drawn = figures(Runs([load_run(run) for run in runs]))
    _check_figures(drawn, "run-s0, run-s1, run-s2: mean (lines) and min-max (bands) over 3 runs")
    for axis in _axes(drawn["pfc_vs_depth.png"]):
        nulls_drawn, spreads = _bands(axis)
        assert not nulls_drawn and len(spreads) == 1  # the last common epoch's band
    for axis in _axes(drawn["pfc_vs_epoch.png"]):
        assert len(_bands(axis)[1]) == len(NAMES)
        assert [list(line.get_xdata()) for line in axis.lines] == [[1, 2]] * len(NAMES)
    for axis in _axes(drawn["training.png"]):
        assert len(_bands(axis)[1]) == len(axis.lines)


def test_several_runs_with_a_null_count_the_runs_near_it(tmp_path):
    runs, lasts = _seeds(tmp_path)
    out = write_report(*runs, out=str(tmp_path / "agg"))
    summary = _summary(out)
    # the stem's nc1 (5 and 6 against 5 ± 1) in both runs with a null; nc2_etf and nc4 far from 0 ± 0.01
    assert _row(summary, "PFC1 (nc1)")[-1].endswith(
        "; decreases in 2 of 3 runs; indistinguishable from the null at layer stem (2 of 3 runs)")
    assert "indistinguishable" not in _row(summary, "PFC2 (nc2_etf)")[-1]
    assert _row(summary, "run-s2", -1) == [trend(lasts[2][m.field]).verdict for m in PFC_METRICS]  # each run
    assert _row(summary, "stem")[4:7] == ["5 ± 1", "0 ± 0.01", "0 ± 0.01"]  # the mean over the runs with a null
    assert _row(summary, "layer1.0")[4:7] == ["-", "-", "-"]
    for axis in _axes(figures(Runs([load_run(run) for run in runs]))["pfc_vs_depth.png"]):
        assert [len(bands) for bands in _bands(axis)] == [1, 1]  # the null and the last epoch's min-max


def test_runs_with_different_layers_or_twice_the_same_are_refused(tmp_path, capsys):
    runs, _ = _seeds(tmp_path, epochs=(1, 1, 1))
    other = _write_run(tmp_path / "cw", {"nc1": [3.0, 2.0, 1.0]}, epochs=1, names=["stem", "block1", "block2"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", runs[0], runs[1], other])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert (f"argument run_dir: runs with different layers cannot be aggregated: {other!r} has stem, block1, block2; "
            f"{runs[0]!r} has stem, layer1.0") in err
    with pytest.raises(SystemExit):
        cli.main(["report", runs[0], runs[0] + "/"])
    assert f"argument run_dir: {runs[0] + '/'!r} is given twice" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(runs[0], "report"))


def test_bad_run_directories_are_named(tmp_path, capsys):
    good = _write_run(tmp_path / "good", {"nc1": MONOTONE}, epochs=1)
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    started = RunDirectory(str(tmp_path / "started"))
    os.makedirs(started.path)
    started.create(TrainConfig(), {})
    for path, message in ((tmp_path / "nothing", "does not exist"), (tmp_path / "file", "is a file, not a directory"),
                          (tmp_path / "empty", "holds no pfc-fast run (no config.json, no metrics.jsonl)"),
                          (tmp_path / "started", "has no epochs yet (no lines in metrics.jsonl)")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["report", good, str(path)])
        assert exit_info.value.code == 2
        assert f"argument run_dir: run directory {str(path)!r} {message}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no run directory given"):
        write_report()
