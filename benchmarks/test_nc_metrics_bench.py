"""pytest-benchmark suite: ``pytest benchmarks/`` (CPU cases; CUDA cases where there is a GPU)."""
import pytest
import torch

import pfc_fast

from .baselines import published_nc_metrics
from .nc_metrics_bench import CASES, make_case

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PARAMS = [pytest.param(device, case, id=f"{device}-N{case[0]}-D{case[1]}-K{case[2]}")
          for device in DEVICES for case in CASES[device]]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device,case", PARAMS)
def test_nc_metrics(benchmark, device, case):
    n, d, k, _ = case
    feats, labels = make_case(n, d, k, device)

    def run():
        result = pfc_fast.nc_metrics(feats, labels, num_classes=k)
        _sync(device)
        return result

    benchmark(run)


@pytest.mark.parametrize("device,case", [p for p in PARAMS if p.values[1][3]])
def test_published_baseline(benchmark, device, case):
    n, d, k, _ = case
    feats, labels = make_case(n, d, k, device)

    def run():
        result = published_nc_metrics(feats, labels, k)
        _sync(device)
        return result

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
