"""Times the CPU kernels' variants (csrc/common/cpu_isa.h) against each other, and optionally against a
``-march=native`` build: the numbers of README.md "Install".

    python tools/cpu_variants_bench.py [--native DIR] [--rounds 2]

Each variant this CPU runs (``PFC_FAST_CPU_KERNELS``) and, with ``--native``, the pfc_fast built in place
in DIR (``PFC_FAST_NATIVE=1 FORCE_ONLY_CPU=1 PFC_FAST_SIMT=0 python setup.py build_ext --inplace``) runs
in a process of its own, the rounds interleaved; each case reports the median of repeated calls in ms.
Benchmark on an idle machine.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = [("nc_metrics 20,000x512 K=10", 20_000, 512, 10, 20), ("nc_metrics 5,000x4,096 K=10", 5_000, 4096, 10, 10),
         ("nc_metrics 20,000x512 K=100", 20_000, 512, 100, 10)]


def _median_ms(fn, repeat):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure():
    """The cases in this process: ``{case: ms}``."""
    import torch

    import pfc_fast

    out = {"cpu_kernels": pfc_fast.build_info()["cpu_kernels"]}
    for name, n, d, k, repeat in CASES:
        gen = torch.Generator().manual_seed(0)
        labels = torch.randint(0, k, (n,), generator=gen)
        feats = torch.randn(k, d, generator=gen)[labels] + torch.randn(n, d, generator=gen)
        out[name] = _median_ms(lambda: pfc_fast.nc_metrics(feats, labels, num_classes=k), repeat)
    x, y = torch.randn(2000, 64, generator=gen), torch.randn(2000, 64, generator=gen) + 0.5
    out["sinkhorn 2,000x2,000 D=64, 100 iterations"] = _median_ms(
        lambda: pfc_fast.sinkhorn(x, y, eps=0.5, max_iter=100, tol=0.0), 5)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--native", help="a source tree with pfc_fast built in place with PFC_FAST_NATIVE=1")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one process's measurement
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure()))
        return 0
    import pfc_fast

    best = pfc_fast.build_info()["cpu_kernels"]
    levels = ("baseline", "avx2", "avx512")
    runs = [(level, {"PFC_FAST_CPU_KERNELS": level}) for level in levels[:levels.index(best) + 1]] \
        if best in levels else [(best, {})]
    if args.native:
        runs.append(("-march=native", {"PYTHONPATH": os.path.abspath(args.native)}))
    results = {label: [] for label, _ in runs}
    for _ in range(args.rounds):
        for label, env in runs:
            done = subprocess.run([sys.executable, __file__, "--measure"], env={**os.environ, **env},
                                  capture_output=True, text=True, check=True)
            results[label].append(json.loads(done.stdout.splitlines()[-1]))
    for label, measured in results.items():
        cells = [f"{name}: {min(m[name] for m in measured):.1f}-{max(m[name] for m in measured):.1f} ms"
                 for name in measured[0] if name != "cpu_kernels"]
        print(f"{label} ({measured[0]['cpu_kernels']}): " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
