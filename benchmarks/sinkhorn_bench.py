"""Timings of pfc_fast.sinkhorn against POT's ``ot.bregman.sinkhorn_log`` on torch tensors.

    python -m benchmarks.sinkhorn_bench --device cpu --threads 2
    python -m benchmarks.sinkhorn_bench --device cuda

Fixed iteration counts (``tol=0``; POT with ``stopThr=0``), float32, D = 64, uniform weights,
eps = 0.05 x the median cost. Times are per iteration (one f and one g update) of the whole call,
cost matrix and transport cost included; POT is given its cost matrix. Prints a markdown table
and writes ``benchmarks/results/sinkhorn-<machine>.json``. On CUDA the floor of an iteration is
``2 N M (D / fma_rate + 1 / exp_rate)`` with the card's measured fp32 FMA and exp rates.
"""
import ot
import torch

import pfc_fast

from .timing import exp_rate, fp32_fma_rate, machine_name, main, timed

DIM = 64
ITERATIONS = 100
# (N, modes of ours, run POT)
CASES = {
    "cpu": [(2_000, ("dense", "online"), True), (10_000, ("online",), False)],
    "cuda": [(10_000, ("dense", "online"), True), (50_000, ("online",), True)],
}


def make_clouds(n, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen)
    y = torch.randn(n, DIM, generator=gen) * 0.8 + 0.5
    return x.to(device), y.to(device)


def pot_sinkhorn_log(x, y, eps, iterations=ITERATIONS):
    """POT's log-domain solver on torch tensors, given its (squared Euclidean) cost matrix."""
    cost = ot.dist(x, y)
    a = torch.full((x.shape[0],), 1.0 / x.shape[0], device=x.device)
    b = torch.full((y.shape[0],), 1.0 / y.shape[0], device=y.device)
    return lambda: ot.bregman.sinkhorn_log(a, b, cost, eps, numItermax=iterations, stopThr=0.0)


def run(device, repeat):
    rows = []
    floor = None
    if device.type == "cuda":
        rates = {"fma_per_s": fp32_fma_rate(device), "exp_per_s": exp_rate(device)}
        floor = lambda n: 2 * n * n * (DIM / rates["fma_per_s"] + 1 / rates["exp_per_s"])
    for n, modes, with_pot in CASES[device.type]:
        x, y = make_clouds(n, device)
        eps = 0.05 * pfc_fast.median_cost(x.cpu(), y.cpu())
        row = {"N": n, "M": n, "D": DIM, "iterations": ITERATIONS, "eps": eps}
        for mode in modes:
            seconds = timed(lambda: pfc_fast.sinkhorn(x, y, eps=eps, tol=0, max_iter=ITERATIONS, mode=mode), device,
                            repeat)
            row[f"ours_{mode}_ms_per_iter"] = 1e3 * seconds / ITERATIONS
        if with_pot:
            seconds = timed(pot_sinkhorn_log(x, y, eps), device, repeat)
            row["pot_ms_per_iter"] = 1e3 * seconds / ITERATIONS
            best = min(v for k, v in row.items() if k.startswith("ours_"))
            row["speedup_vs_pot"] = row["pot_ms_per_iter"] / best
        if floor is not None:
            row["floor_ms_per_iter"] = 1e3 * floor(n)
        rows.append(row)
        del x, y
    result = {"machine": machine_name(device), "device": str(device), "torch": torch.__version__,
              "pot": ot.__version__, "threads": torch.get_num_threads(), "build": pfc_fast.build_info(),
              "cases": rows}
    if device.type == "cuda":
        result["rates"] = rates
    return result


def markdown(result):
    lines = [f"`sinkhorn` on {result['machine']} (torch {result['torch']}, POT {result['pot']}, "
             f"{result['threads']} threads), D = {DIM}, float32, {ITERATIONS} iterations, ms per iteration", "",
             "| N = M | ours (dense) | ours (online) | POT sinkhorn_log | speed-up | floor |",
             "|---|---|---|---|---|---|"]
    fmt = lambda r, k: f"{r[k]:.3f}" if k in r else "-"
    for r in result["cases"]:
        speedup = f"{r['speedup_vs_pot']:.1f}x" if "speedup_vs_pot" in r else "-"
        lines.append(f"| {r['N']:,} | {fmt(r, 'ours_dense_ms_per_iter')} | {fmt(r, 'ours_online_ms_per_iter')} | "
                     f"{fmt(r, 'pot_ms_per_iter')} | {speedup} | {fmt(r, 'floor_ms_per_iter')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(__doc__.split("\n\n")[0], run, markdown, "sinkhorn", repeat=3)
