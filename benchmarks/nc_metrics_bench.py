"""Timings of pfc_fast.nc_metrics against the published-code baseline (benchmarks/baselines.py).

    python -m benchmarks.nc_metrics_bench --device cpu --threads 2
    python -m benchmarks.nc_metrics_bench --device cuda

Prints a markdown table and writes ``benchmarks/results/nc_metrics-<machine>.json``. On CUDA the
floor is the time to read the features twice at the card's measured copy bandwidth (a
device-to-device copy of 1 GiB: bytes read + written per second).
"""
import torch

import pfc_fast

from .baselines import published_nc_metrics
from .timing import copy_bandwidth, machine_name, main, timed

# (N, D, K, run the baseline): the targets
CASES = {
    "cpu": [(20_000, 512, 10, True), (5_000, 65_536, 10, False)],
    "cuda": [(50_000, 512, 10, True), (5_000, 65_536, 10, False), (200_000, 512, 100, True)],
}


def make_case(n, d, k, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=gen)
    feats = torch.randn(k, d, generator=gen)[labels] + torch.randn(n, d, generator=gen)
    return feats.to(device, dtype), labels.to(device)


def run(device, repeat):
    rows = []
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    for n, d, k, with_baseline in CASES[device.type]:
        feats, labels = make_case(n, d, k, device)
        ours = timed(lambda: pfc_fast.nc_metrics(feats, labels, num_classes=k), device, repeat)
        row = {"N": n, "D": d, "K": k, "dtype": "float32", "ours_s": ours}
        if with_baseline:
            row["baseline_s"] = timed(lambda: published_nc_metrics(feats, labels, k), device, max(1, repeat // 2))
            row["speedup"] = row["baseline_s"] / ours
        if bandwidth is not None:
            row["floor_s"] = 2 * feats.numel() * feats.element_size() / bandwidth
            row["ratio_to_floor"] = ours / row["floor_s"]
        rows.append(row)
        del feats, labels
    return {"machine": machine_name(device), "device": str(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "copy_bandwidth_GBps": None if bandwidth is None else bandwidth / 1e9,
            "build": pfc_fast.build_info(), "cases": rows}


def markdown(result):
    lines = [f"`nc_metrics` on {result['machine']} (torch {result['torch']}, {result['threads']} threads)", "",
             "| N | D | K | ours | baseline | speed-up | floor (2 reads) | ours / floor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["cases"]:
        cells = [f"{r['N']:,}", f"{r['D']:,}", str(r["K"]), f"{r['ours_s'] * 1e3:.1f} ms",
                 f"{r['baseline_s'] * 1e3:.1f} ms" if "baseline_s" in r else "-",
                 f"{r['speedup']:.1f}x" if "speedup" in r else "-",
                 f"{r['floor_s'] * 1e3:.3f} ms" if "floor_s" in r else "-",
                 f"{r['ratio_to_floor']:.1f}" if "ratio_to_floor" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(__doc__.split("\n\n")[0], run, markdown, "nc_metrics", repeat=5)
