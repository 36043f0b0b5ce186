"""pytest-benchmark suite for sinkhorn: ``pytest benchmarks/`` (CUDA cases where there is a GPU)."""
import pytest
import torch

import pfc_fast

from .sinkhorn_bench import CASES, ITERATIONS, make_clouds, pot_sinkhorn_log

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OURS = [pytest.param(device, n, mode, id=f"{device}-N{n}-{mode}")
        for device in DEVICES for n, modes, _ in CASES[device] for mode in modes]
POT = [pytest.param(device, n, id=f"{device}-N{n}") for device in DEVICES for n, _, pot in CASES[device] if pot]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device,n,mode", OURS)
def test_sinkhorn(benchmark, device, n, mode):
    x, y = make_clouds(n, device)
    eps = 0.05 * pfc_fast.median_cost(x.cpu(), y.cpu())

    def run():
        result = pfc_fast.sinkhorn(x, y, eps=eps, tol=0, max_iter=ITERATIONS, mode=mode)
        _sync(device)
        return result

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("device,n", POT)
def test_pot_sinkhorn_log(benchmark, device, n):
    x, y = make_clouds(n, device)
    solve = pot_sinkhorn_log(x, y, 0.05 * pfc_fast.median_cost(x.cpu(), y.cpu()))

    def run():
        result = solve()
        _sync(device)
        return result

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
