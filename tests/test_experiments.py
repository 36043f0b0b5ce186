"""Every experiment of docs/reproduction.md runs end to end on a tiny configuration, and its
numbers agree with what they summarise."""
import json
import math
import os

import pytest
import torch

import pfc_fast
from experiments import pfc_depth, runs, transparent
from pfc_fast.app.run_directory import RunDirectory
from pfc_fast.app.train import restore


def _png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pfc_depth_tiny(tmp_path):
    out = tmp_path / "out"
    (summary,) = pfc_depth.run(["tiny"], str(tmp_path / "runs"), str(out))
    assert _png(out / "pfc_depth.png") and _png(out / "spearman.png")
    with open(out / "pfc_depth.json") as handle:
        (saved,) = json.load(handle)
    records = RunDirectory(str(tmp_path / "runs" / "tiny")).records()
    assert [r.epoch for r in records] == [1, 2]
    last = records[-1]
    for field in ("nc1", "nc2_etf", "nc4"):
        values = [layer[field] for layer in last.layers]
        assert saved["last_epoch"][field]["values"] == pytest.approx(values)
        expected_pairs = sum(b < a for a, b in zip(values, values[1:])) / (len(values) - 1)
        assert saved["last_epoch"][field]["decreasing_pairs"] == pytest.approx(expected_pairs)
        assert len(saved["last_epoch"][field]["spearman_by_epoch"]) == 2
    assert saved["layers"] == summary["layers"] and saved["layers"][0] == "stem"
    # a second call reuses the finished run instead of training again
    mtime = os.path.getmtime(tmp_path / "runs" / "tiny" / "checkpoint.pt")
    pfc_depth.run(["tiny"], str(tmp_path / "runs"), str(out))
    assert os.path.getmtime(tmp_path / "runs" / "tiny" / "checkpoint.pt") == mtime


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
