"""Claim (b): a trained ResNet moves its data along a Wasserstein geodesic (the transparent model).

    python -m experiments.transparent [--preset embedded-cwresnet] [--runs runs/transparent]
                                      [--out docs/reproduction/transparent] [--device auto]

Trains (or reuses) a constant-width ResNet with ``pfc-fast train``, which records every epoch the
line-shape score (LSS), the OT score (OTS, stem against the last block) and the W-path ratio of
the globally pooled features (``docs/spec.md`` section 5). Then, on the probe set of the
finished run, with the flattened features of the stem (``x``) and of every block:

- the network's per-layer PFC1 = ``nc1`` and PFC2 = ``nc2_etf``;
- the transparent model's: the displacement interpolation ``h_t = (1 - t) x + t T(x)`` at
  ``t = l / L`` (:func:`pfc_fast.geodesic.transparent_model`), ``T`` the optimal assignment of
  ``x`` to the network's last-layer features, and to the class-balanced simplex ETF;
- LSS, OTS and W-path ratio of the flattened features, for the trained network and for the same
  network at initialisation.

Writes ``transparent.png`` (the curves), ``geodesic_training.png`` (LSS, OTS, W-path ratio against
the epoch; epoch 0 = initialisation) and ``transparent.json`` to ``--out``.
"""
import argparse
import math
import os
import sys

import torch
from matplotlib.figure import Figure

from pfc_fast import geodesic, nc_metrics
from pfc_fast.app.report import monotonicity
from pfc_fast.app.train import restore

from .pfc_depth import write_json
from .runs import PRESETS, train_or_reuse

CURVES = (("nc1", "PFC1 = NC1", True), ("nc2_etf", "PFC2 = NC2 (distance to ETF)", False))
GEODESIC = (("lss", "LSS (1 = straight tracks)"), ("ots", "OTS (1 = moves samples as OT does)"),
            ("w_path_ratio", "W-path ratio (1 = geodesic)"))


def layer_features(run, pooling="flatten"):
    """Labels, the network's predictions and ``{layer: (N, D) float64 features}`` of the probe set."""
    images = run.inputs(run.train_images[run.probe])
    with torch.no_grad():
        feats = {name: h.double().cpu() for name, h in run.monitor.features(images, pooling=pooling).items()}
        predictions = run.network(images).argmax(1).cpu()
    return run.train_labels[run.probe].cpu(), predictions, feats


def _curve(metrics):
    return {field: [getattr(m, field) for m in metrics] for field, _, _ in CURVES}


def compare(run):
    """The network's and the transparent model's curves and the geodesic scores of ``run``."""
    labels, predictions, feats = layer_features(run)
    layers = list(feats.values())
    network = _curve([nc_metrics(h, labels, predictions=predictions) for h in layers])
    curves = {"network": network}
    for name, target in (("transparent (target: last layer)", layers[-1]), ("transparent (target: ETF)", "etf")):
        curves[name] = _curve(geodesic.transparent_model(layers[0], labels, target, num_layers=len(layers) - 1).metrics)
    # interior layers only: the ETF target is exactly collapsed (nc1 = 0) at t = 1
    gaps = {name: max(abs(math.log10(a / b)) for a, b in zip(curve["nc1"][1:-1], network["nc1"][1:-1]))
            for name, curve in curves.items() if name != "network"}
    return {"layers": list(feats), "num_samples": len(labels), "dim": layers[0].shape[1], "curves": curves,
            "monotonicity": {name: {field: monotonicity(values) for field, values in curve.items()}
                             for name, curve in curves.items()},
            "max_abs_log10_nc1_gap_to_network": gaps,
            "geodesic_flatten": geodesic.scores(layers)}


def _plot_curves(result, path):
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    axes = figure.subplots(1, len(CURVES))
    names = result["layers"]
    for axis, (field, label, log) in zip(axes, CURVES):
        for name, curve in result["curves"].items():
            axis.plot(range(len(names)), curve[field], marker="o" if name == "network" else ".", label=name,
                      linewidth=2 if name == "network" else 1)
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels([f"{n}\nt={i / (len(names) - 1):.2g}" for i, n in enumerate(names)], fontsize=6)
        axis.set(title=label, xlabel="layer / interpolation time t")
        if log:  # the ETF target collapses exactly at t = 1 (nc1 = 0): keep the axis on the network's scale
            axis.set_yscale("log")
            axis.set_ylim(bottom=min(result["curves"]["network"][field]) / 1e3)
    axes[0].legend(fontsize=7)
    figure.savefig(path, dpi=100)


def _plot_training(records, initial, path):
    figure = Figure(figsize=(13, 3.4), layout="constrained")
    axes = figure.subplots(1, len(GEODESIC))
    epochs = [0] + [r.epoch for r in records]
    for axis, (field, label) in zip(axes, GEODESIC):
        axis.plot(epochs, [initial[field]] + [getattr(r, field) for r in records], marker=".")
        axis.axhline(1.0, color="grey", linewidth=0.5)
        axis.set(title=label, xlabel="epoch (0: initialisation)")
    figure.suptitle("globally pooled features of the stem and every block, probe subset", fontsize=9)
    figure.savefig(path, dpi=100)


def run(preset, runs_dir, out, device="auto"):
    """Train or reuse ``preset``, compare with the transparent model, write figures and JSON."""
    run_dir, records = train_or_reuse(preset, runs_dir, device, needs_null=False)  # no use of the null
    if not records[-1].has_geodesic:
        raise SystemExit(f"preset {preset} records no geodesic scores: the transparent model needs a "
                         "constant-width network (--model cwresnet) with --geodesic-samples > 0")
    trained, epoch = restore(run_dir)
    result = {"preset": preset, "description": PRESETS[preset][1], "run_dir": run_dir, "epoch": epoch,
              "train_acc": records[-1].train_acc, "test_acc": records[-1].test_acc, **compare(trained)}
    initial, _ = restore(run_dir, checkpoint=False)
    result["geodesic_flatten_at_initialisation"] = geodesic.scores(list(layer_features(initial)[2].values()))
    initial_pooled = geodesic.scores(list(layer_features(initial, pooling="gap")[2].values()))
    result["geodesic_pooled_by_epoch"] = {field: [initial_pooled[field]] + [getattr(r, field) for r in records]
                                          for field, _ in GEODESIC}
    os.makedirs(out, exist_ok=True)
    _plot_curves(result, os.path.join(out, "transparent.png"))
    _plot_training(records, initial_pooled, os.path.join(out, "geodesic_training.png"))
    write_json(os.path.join(out, "transparent.json"), result)
    for name, checks in result["monotonicity"].items():
        print(f"{name}: " + ", ".join(f"{field} {m['verdict']}" for field, m in checks.items()))
    flat, init = result["geodesic_flatten"], result["geodesic_flatten_at_initialisation"]
    print("flattened features, trained (initialisation): " + ", ".join(
        f"{field} {flat[field]:.4g} ({init[field]:.4g})" for field, _ in GEODESIC))
    print(f"figures and numbers in {out}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.transparent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="embedded-cwresnet", choices=PRESETS)
    parser.add_argument("--runs", default="runs/transparent", help="directory of the training runs")
    parser.add_argument("--out", default="docs/reproduction/transparent", help="directory of the figures and JSON")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    run(args.preset, args.runs, args.out, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
