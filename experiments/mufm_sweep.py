"""Claim (c): the MUFM optimum is not neural collapse, yet it is more concentrated than its input.

    python -m experiments.mufm_sweep [--per-class 30] [--layers 4] [--lots 0 1e-3 ... 10]
                                     [--sinkhorn-per-class 6] [--sinkhorn-lots 1 3 10]
                                     [--out docs/reproduction/mufm]

Solves the multilayer unconstrained feature model (:mod:`pfc_fast.mufm`, the reconstruction of
``docs/spec.md`` section 6) on real input features ``X``: a class-balanced subset of
scikit-learn's digits (8x8 pixels, ``D = 64``, scaled to [0, 1]), for every coupling weight
``lot`` of the sweep with the sample-matched cost, and for a few with the Sinkhorn-divergence
cost on a smaller subset (every evaluation of that objective runs ``3 L`` Sinkhorn solves, so
it takes about a second per iteration at 60 samples). ``lot = 0`` is the plain UFM, whose
optimum is neural collapse (a simplex ETF). Every solve runs to a stationary point (at most
``--sinkhorn-steps`` iterations for the Sinkhorn cost); its relative gradient norm is recorded.

Writes to ``--out``: ``mufm_sweep.png`` (``nc1(H_L) / nc1(X)`` and ``nc2_etf(H_L)`` against
``lot``, beside those of ``X`` and of the UFM; ``nc1`` against the layer for some lots)
and ``mufm_sweep.json`` (per solve: ``lot``, cost, per-layer ``nc1``, ``nc1_quotient``,
``nc2_etf``, ``nc4``, the relative gradient norm, iterations, seconds).
"""
import argparse
import os
import sys
import time

import torch
from matplotlib.figure import Figure

from pfc_fast import mufm, nc_metrics
from pfc_fast.app.data import balanced_indices, digits_pixels
from pfc_fast.app.flags import positive_int

from .pfc_depth import write_json

LOTS = (0.0, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
SINKHORN_LOTS = (1.0, 3.0, 10.0)
FIELDS = ("nc1", "nc1_quotient", "nc2_etf", "nc4")


def digits_features(per_class, seed=0):
    """``per_class`` digits of every class: ``X (10 per_class, 64)`` float64 in [0, 1], labels."""
    pixels, target = digits_pixels()
    labels = torch.tensor(target, dtype=torch.long)
    index = balanced_indices(labels, per_class, 10, seed, name="per_class")
    return torch.tensor(pixels, dtype=torch.float64)[index] / 16.0, labels[index]


def _record(result, seconds):
    return {"lot": result.lot, "cost": result.cost, "num_samples": result.layers[0].shape[0], "grad_norm": result.grad_norm, "converged": result.converged,
            "stop": result.stop, "n_iter": result.n_iter, "seconds": seconds, "loss": result.loss,
            "sinkhorn_eps": result.sinkhorn_eps,
            "layers": {field: [getattr(m, field) for m in result.metrics] for field in FIELDS}}


def _timed_sweep(per_class, seed, layers, lots, cost, **kwargs):
    """The input's metrics and one record per lot (warm-started sweep: the mean time per solve)."""
    x, labels = digits_features(per_class, seed)
    inputs = nc_metrics(x, labels)
    start = time.perf_counter()
    results = mufm.sweep(x, labels, layers, lots, cost=cost, **kwargs)
    seconds = (time.perf_counter() - start) / len(results)
    return {field: getattr(inputs, field) for field in FIELDS if field != "nc4"}, [_record(r, seconds) for r in results]


def _plot(summary, path):
    figure = Figure(figsize=(14, 3.8), layout="constrained")
    axes = figure.subplots(1, 3)
    ufm = [r for r in summary["solves"] if r["lot"] == 0]
    for axis, field, title in ((axes[0], "nc1", "NC1(H_L) / NC1(X)"), (axes[1], "nc2_etf", "NC2 (distance to ETF) of H_L")):
        for cost, marker in (("matched", "o"), ("sinkhorn", "s")):
            runs = [r for r in summary["solves"] if r["cost"] == cost and r["lot"] > 0]
            scale = summary["inputs"][cost]["nc1"] if field == "nc1" else 1.0
            if runs:
                axis.plot([r["lot"] for r in runs], [r["layers"][field][-1] / scale for r in runs], marker=marker,
                          label=f"MUFM, {cost} cost (N = {runs[0]['num_samples']})")
        axis.axhline(1.0 if field == "nc1" else summary["inputs"]["matched"][field], color="black", linestyle="--",
                     linewidth=1, label="input X")
        if ufm:
            value = ufm[0]["layers"][field][-1] / (summary["inputs"]["matched"]["nc1"] if field == "nc1" else 1.0)
            axis.axhline(value, color="grey", linestyle=":", label="UFM (lot = 0)")
        axis.set(xscale="log", xlabel="lot (coupling weight)", title=title)
        axis.set_yscale("log" if field == "nc1" else "linear")
    axes[0].legend(fontsize=7)
    matched = [r for r in summary["solves"] if r["cost"] == "matched"]
    for r in matched[::max(1, len(matched) // 5)]:
        axes[2].plot(range(len(r["layers"]["nc1"])), r["layers"]["nc1"], marker=".", label=f"lot {r['lot']:g}")
    axes[2].set(yscale="log", xlabel="layer l (0 = X)", title="NC1 of H_l, matched cost")
    axes[2].legend(fontsize=7)
    figure.savefig(path, dpi=100)


def run(per_class, layers, lots, sinkhorn_per_class, sinkhorn_lots, out, seed=0, sinkhorn_steps=2000):
    """Solve the sweeps, write the figure and JSON; returns the summary."""
    summary = {"data": "scikit-learn digits, class-balanced subsets, pixels / 16", "dim": 64, "num_layers": layers,
               "defaults": {"lw": 5e-3, "lb": 5e-3, "lh": 5e-3}, "inputs": {}}
    summary["inputs"]["matched"], solves = _timed_sweep(per_class, seed, layers, lots, "matched")
    if sinkhorn_lots:
        summary["inputs"]["sinkhorn"], more = _timed_sweep(sinkhorn_per_class, seed, layers, sinkhorn_lots, "sinkhorn",
                                                           steps=sinkhorn_steps)
        solves += more
    summary["solves"] = solves
    os.makedirs(out, exist_ok=True)
    _plot(summary, os.path.join(out, "mufm_sweep.png"))
    write_json(os.path.join(out, "mufm_sweep.json"), summary)
    for cost, inputs in summary["inputs"].items():
        print(f"input X ({cost} sweep): nc1 {inputs['nc1']:.4g}, nc2_etf {inputs['nc2_etf']:.4g}")
    for r in solves:
        print(f"{r['cost']:8s} lot {r['lot']:<7g} H_L: nc1 {r['layers']['nc1'][-1]:.4g}  nc2_etf "
              f"{r['layers']['nc2_etf'][-1]:.4g}  relative grad norm {r['grad_norm']:.2e} ({r['stop']}, "
              f"{r['n_iter']} iterations)")
    print(f"figure and numbers in {out}")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.mufm_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=positive_int, default=30, help="digits per class in X (default 30)")
    parser.add_argument("--layers", type=positive_int, default=4, help="free layers L (default 4)")
    parser.add_argument("--lots", type=float, nargs="+", default=list(LOTS), help="coupling weights, matched cost")
    parser.add_argument("--sinkhorn-per-class", type=positive_int, default=6, help="digits per class in X of the "
                        "Sinkhorn-cost sweep (default 6)")
    parser.add_argument("--sinkhorn-lots", type=float, nargs="*", default=list(SINKHORN_LOTS),
                        help="coupling weights, Sinkhorn cost (none: skip)")
    parser.add_argument("--sinkhorn-steps", type=positive_int, default=2000, help="most L-BFGS iterations of a "
                        "Sinkhorn-cost solve (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="which digits are drawn")
    parser.add_argument("--out", default="docs/reproduction/mufm", help="directory of the figure and JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small problems: one thread is faster, and immune to a busy machine
    run(args.per_class, args.layers, args.lots, args.sinkhorn_per_class, args.sinkhorn_lots, args.out, args.seed,
        args.sinkhorn_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
