"""Every experiment of docs/reproduction.md runs end to end on a tiny configuration, and its
numbers agree with what they summarise."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import pfc_fast
from experiments import pfc_depth, runs, transparent
from pfc_fast.app import report
from pfc_fast.app.run_directory import RunDirectory
from pfc_fast.app.train import restore


def _png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pfc_depth_tiny_seeds(tmp_path):
    out, runs_dir = tmp_path / "out", tmp_path / "runs"
    (summary,) = pfc_depth.run(["tiny"], str(runs_dir), str(out), seeds=[0, 1])
    for name in ("pfc_depth.png", "null_normalised.png", "spearman.png"):
        assert _png(out / name)
    with open(out / "pfc_depth.json") as handle:
        saved = json.load(handle)
    assert saved["seeds"] == [0, 1] and saved["null_sigmas"] == report.NULL_SIGMAS
    (preset,) = saved["presets"]
    assert preset["seeds"] == [0, 1] and preset["epochs"] == 2 and preset["layers"][0] == "stem"
    dirs = [str(runs_dir / "tiny-s0"), str(runs_dir / "tiny-s1")]
    assert preset["run_dirs"] == dirs and _png(os.path.join(preset["report_dir"], "pfc_vs_depth.png"))
    assert [RunDirectory(d).config().seed for d in dirs] == [0, 1] and "seed" not in preset["config"]
    assert preset["config"]["null_permutations"] == 4  # the null is measured (pfc-fast train's default)
    lasts = [RunDirectory(d).records()[-1] for d in dirs]
    assert [r.epoch for r in lasts] == [2, 2]
    aggregated = report.Runs([report.load_run(d) for d in dirs])
    for field in ("nc1", "nc2_etf", "nc4"):
        numbers = preset["last_epoch"][field]
        values = np.array([r.series(field) for r in lasts])
        assert numbers["mean"] == pytest.approx(values.mean(0).tolist())
        assert numbers["min"] == pytest.approx(values.min(0).tolist())
        assert numbers["max"] == pytest.approx(values.max(0).tolist())
        nulls = [[report.null_of(layer, field) for layer in r.layers] for r in lasts]
        assert all(n is not None for row in nulls for n in row)
        assert numbers["null_mean"] == pytest.approx(np.mean([[n[0] for n in row] for row in nulls], 0).tolist())
        assert numbers["null_std"] == pytest.approx(np.mean([[n[1] for n in row] for row in nulls], 0).tolist())
        # each seed against its own null
        for seed_summary, record, row in zip(preset["per_seed"], lasts, nulls):
            assert seed_summary["last_epoch"][field]["values"] == pytest.approx(record.series(field))
            z = [(v - m) / s if s > 0 else None for v, (m, s) in zip(record.series(field), row)]
            assert [a is None for a in seed_summary["last_epoch"][field]["z"]] == [b is None for b in z]
            assert [a for a in seed_summary["last_epoch"][field]["z"] if a is not None] == pytest.approx(
                [b for b in z if b is not None])
            assert seed_summary["last_epoch"][field]["ratio"] == pytest.approx(
                [v / m for v, (m, _) in zip(record.series(field), row)])
            assert len(seed_summary["last_epoch"][field]["spearman_by_epoch"]) == 2
        defined = [[a for a in column if a is not None]
                   for column in zip(*(s["last_epoch"][field]["z"] for s in preset["per_seed"]))]
        assert [a is None for a in numbers["z"]["mean"]] == [not column for column in defined]
        assert [a for a in numbers["z"]["mean"] if a is not None] == pytest.approx(
            [sum(column) / len(column) for column in defined if column])
        assert numbers["z"]["z_undefined"] == [2 - len(column) for column in defined]
        assert set(numbers["z"]["trend"]) == {"spearman", "p_value", "decreasing_pairs", "verdict"}
        # the verdict over the seeds is the report's
        _, words = report.verdict(aggregated, field)
        assert numbers["verdict"] == words and "of 2 runs" in words
        assert numbers["decreases_in_runs"] == sum(report.trend(r.series(field)).decreases for r in lasts)
        assert numbers["indistinguishable_runs"] == [sum(report.indistinguishable(r.layers[d], field) for r in lasts)
                                                     for d in range(len(preset["layers"]))]
    assert summary["last_epoch"]["nc1"]["verdict"] == preset["last_epoch"]["nc1"]["verdict"]
    # a second call reuses the finished runs instead of training again
    mtimes = [os.path.getmtime(os.path.join(d, "checkpoint.pt")) for d in dirs]
    pfc_depth.run(["tiny"], str(runs_dir), str(out), seeds=[0, 1])
    assert [os.path.getmtime(os.path.join(d, "checkpoint.pt")) for d in dirs] == mtimes
    # a finished run of other options is refused, not reused: another seed, a run without the null
    shutil.copytree(runs_dir / "tiny-s1", runs_dir / "tiny-s7")
    with pytest.raises(SystemExit, match="seed: 1 .preset: 7."):
        runs.train_or_reuse("tiny", str(runs_dir), seed=7)
    config_path = runs_dir / "tiny-s1" / "config.json"
    with open(config_path) as handle:
        config = json.load(handle)
    del config["null_permutations"]
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    with pytest.raises(SystemExit, match="made before the null"):
        runs.train_or_reuse("tiny", str(runs_dir), seed=1)


def test_null_normalised_values():
    assert pfc_depth.z_score(3.0, (1.0, 0.5)) == 4.0
    assert pfc_depth.z_score(1.0, (1.0, 0.0)) == 0.0  # null_std 0, the value the null's: z = 0
    assert math.isnan(pfc_depth.z_score(2.0, (1.0, 0.0)))  # null_std 0, another value: undefined
    assert math.isnan(pfc_depth.z_score(2.0, None))
    assert pfc_depth.ratio(0.5, (2.0, 0.1)) == 0.25
    assert math.isnan(pfc_depth.ratio(0.5, (0.0, 0.1))) and math.isnan(pfc_depth.ratio(0.5, None))
    with pytest.raises(ValueError, match="distinct"):
        pfc_depth.run(["tiny"], "unused", "unused", seeds=[0, 0])
    with pytest.raises(SystemExit):
        pfc_depth.main(["--seeds", "1", "1"])


def test_transparent_tiny(tmp_path):
    out = tmp_path / "out"
    result = transparent.run("tiny-cwresnet", str(tmp_path / "runs"), str(out))
    assert _png(out / "transparent.png") and _png(out / "geodesic_training.png")
    with open(out / "transparent.json") as handle:
        saved = json.load(handle)
    assert saved["layers"] == ["stem", "block1", "block2", "block3"]
    # the network's curve is nc_metrics of the restored checkpoint's features, measured by hand
    run, epoch = restore(str(tmp_path / "runs" / "tiny-cwresnet"))
    assert epoch == 2
    images = run.inputs(run.train_images[run.probe])
    h = run.network.stem(images)
    feats = [h]
    for block in run.network.blocks:
        h = block(h)
        feats.append(h)
    labels = run.train_labels[run.probe]
    with torch.no_grad():
        expected = [pfc_fast.nc_metrics(f.detach(), labels).nc1 for f in feats]
    assert saved["curves"]["network"]["nc1"] == pytest.approx(expected, rel=1e-6)
    # the interpolation starts at the stem's features and the ETF-target curve collapses at t = 1
    for name in ("transparent (target: last layer)", "transparent (target: ETF)"):
        assert saved["curves"][name]["nc1"][0] == pytest.approx(expected[0], rel=1e-9)
    assert saved["curves"]["transparent (target: ETF)"]["nc1"][-1] < 1e-12
    assert saved["geodesic_flatten"]["lss"] >= 1.0 and 0 <= saved["geodesic_flatten"]["ots"] <= 1
    assert len(saved["geodesic_pooled_by_epoch"]["lss"]) == 3  # initialisation, epochs 1 and 2
    assert result["epoch"] == 2


def test_transparent_needs_a_constant_width_run(tmp_path):
    with pytest.raises(SystemExit, match="constant-width"):
        transparent.run("tiny", str(tmp_path / "runs"), str(tmp_path / "out"))


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset must be one of"):
        runs.preset_flags("imagenet")


def test_mufm_sweep_tiny(tmp_path):
    from experiments import mufm_sweep
    out = tmp_path / "out"
    summary = mufm_sweep.run(per_class=4, layers=2, lots=[0.0, 0.1], sinkhorn_per_class=2, sinkhorn_lots=[1.0],
                             out=str(out), sinkhorn_steps=5)
    assert _png(out / "mufm_sweep.png")
    with open(out / "mufm_sweep.json") as handle:
        saved = json.load(handle)
    x, labels = mufm_sweep.digits_features(4)
    assert saved["inputs"]["matched"]["nc1"] == pytest.approx(pfc_fast.nc_metrics(x, labels).nc1, rel=1e-12)
    matched = [r for r in saved["solves"] if r["cost"] == "matched"]
    assert [r["lot"] for r in matched] == [0.0, 0.1] and all(r["converged"] for r in matched)
    ufm, coupled = matched
    assert ufm["layers"]["nc2_etf"][-1] < 1e-2 < coupled["layers"]["nc2_etf"][-1]
    assert coupled["layers"]["nc1"][-1] < saved["inputs"]["matched"]["nc1"]
    (sinkhorn,) = [r for r in saved["solves"] if r["cost"] == "sinkhorn"]
    assert sinkhorn["n_iter"] <= 5 and sinkhorn["num_samples"] == 20 and math.isfinite(sinkhorn["loss"])
    assert summary["solves"][0]["layers"]["nc1"][0] == pytest.approx(saved["inputs"]["matched"]["nc1"])
