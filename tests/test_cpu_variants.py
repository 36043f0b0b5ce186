"""The CPU kernels' variants (csrc/common/cpu_isa.h): the x86-64 baseline, AVX2 + FMA and AVX-512,
the best one the CPU supports chosen at load time, a lower one by ``PFC_FAST_CPU_KERNELS``. Each
variant this CPU can run gives the float64 reference's numbers, in a process of its own."""
import json
import os
import subprocess
import sys

import pytest
import torch

import pfc_fast
from pfc_fast import reference

_LEVELS = ("baseline", "avx2", "avx512")

_SCRIPT = r"""
import json, sys, torch, pfc_fast
out = {"cpu_kernels": pfc_fast.build_info()["cpu_kernels"], "nc": [], "sinkhorn": []}
for n, d, k, dtype, w in [(700, 33, 6, "float32", True), (400, 600, 5, "float64", False), (300, 20, 4, "float16", True),
                          (2000, 24, 520, "float32", True), (500, 64, 10, "bfloat16", False)]:
    gen = torch.Generator().manual_seed(n + d + k)
    labels = torch.randint(0, k, (n,), generator=gen)
    feats = (torch.randn(k, d, generator=gen, dtype=torch.float64)[labels] * 2
             + torch.randn(n, d, generator=gen, dtype=torch.float64)).to(getattr(torch, dtype))
    weight = torch.randn(k, d, generator=gen, dtype=torch.float64) if w else None
    out["nc"].append(pfc_fast.nc_metrics(feats, labels, num_classes=k, classifier=weight).to_dict())
for dtype in ("float32", "float64"):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 7, generator=gen, dtype=getattr(torch, dtype))
    y = torch.randn(250, 7, generator=gen, dtype=getattr(torch, dtype)) + 0.3
    for mode in ("online", "dense"):
        r = pfc_fast.sinkhorn(x, y, eps=0.3, mode=mode, max_iter=200, tol=0.0)
        out["sinkhorn"].append({"dtype": dtype, "f": r.f.double().tolist(), "cost": float(r.cost)})
print(json.dumps(out))
"""


def _run(level):
    env = {**os.environ, "PFC_FAST_CPU_KERNELS": level}
    ran = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return json.loads(ran.stdout.splitlines()[-1])


def _supported():
    best = pfc_fast.build_info()["cpu_kernels"]
    if best == "native":
        pytest.skip("built with -march=native: one variant only")
    return _LEVELS[:_LEVELS.index(best) + 1]


def test_every_variant_this_cpu_runs_gives_the_same_numbers():
    supported = _supported()
    results = {level: _run(level) for level in supported}
    for level, result in results.items():
        assert result["cpu_kernels"] == level
    base = results[supported[-1]]
    for level in supported[:-1]:
        for ours, theirs in zip(results[level]["nc"], base["nc"]):
            for name, value in theirs.items():
                if isinstance(value, float):
                    assert ours[name] == pytest.approx(value, rel=1e-9, abs=1e-12), (level, name)
                else:
                    assert ours[name] == value, (level, name)
        for ours, theirs in zip(results[level]["sinkhorn"], base["sinkhorn"]):
            # float32: 200 iterations, each variant summing in its own order
            tol = 2e-4 if theirs["dtype"] == "float32" else 1e-10
            torch.testing.assert_close(torch.tensor(ours["f"]), torch.tensor(theirs["f"]), rtol=tol, atol=tol)
            assert ours["cost"] == pytest.approx(theirs["cost"], rel=tol)


def test_the_baseline_variant_matches_the_reference():
    """The variant no CPU lacks, against the float64 reference (the other variants match it above)."""
    _supported()
    result = _run("baseline")
    gen = torch.Generator().manual_seed(700 + 33 + 6)
    labels = torch.randint(0, 6, (700,), generator=gen)
    feats = (torch.randn(6, 33, generator=gen, dtype=torch.float64)[labels] * 2
             + torch.randn(700, 33, generator=gen, dtype=torch.float64)).to(torch.float32)
    weight = torch.randn(6, 33, generator=gen, dtype=torch.float64)
    expected = reference.nc_metrics(feats.double(), labels, num_classes=6, classifier=weight)
    for name in ("nc1", "cdnv", "nc2_etf", "gnc2_log", "nc3_uniform", "nc4", "ncc_accuracy"):
        assert result["nc"][0][name] == pytest.approx(expected[name], rel=1e-8), name


def test_a_bad_variant_name_is_refused():
    env = {**os.environ, "PFC_FAST_CPU_KERNELS": "sse"}
    ran = subprocess.run([sys.executable, "-c", "import pfc_fast"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode != 0 and "PFC_FAST_CPU_KERNELS must be one of baseline, avx2, avx512" in ran.stderr
