"""Shared fixtures: data generators and the device parameter (CUDA cases skip visibly without a GPU)."""
import math

import pytest
import torch

import pfc_fast

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not (torch.cuda.is_available() and pfc_fast.build_info()["cuda"]),
                reason="no CUDA device (or pfc_fast built without CUDA kernels): CUDA case not run",
            ),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def make_features(n, d, k, *, seed, device="cpu", dtype=torch.float32, spread=1.0, offset=0.0,
                  balanced=False, absent=()):
    """Features ``offset + mu_y + spread * noise`` with labels; classes in ``absent`` never occur.

    Unbalanced by default (class c drawn with probability proportional to c + 1).
    """
    gen = torch.Generator().manual_seed(seed)
    weights = torch.ones(k) if balanced else torch.arange(1, k + 1, dtype=torch.float64)
    for c in absent:
        weights[c] = 0
    labels = torch.multinomial(weights, n, replacement=True, generator=gen)
    means = torch.randn(k, d, generator=gen, dtype=torch.float64)
    feats = offset + means[labels] + spread * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return feats.to(device=device, dtype=dtype), labels.to(device)


def assert_metrics_close(ours, ref, rtol, exact_decisions=True):
    """Every field of ``ours`` (NCMetrics) against the reference dict."""
    ours = ours.to_dict()
    assert set(ours) == set(ref)
    for name, value in ours.items():
        expected = ref[name]
        if expected is None or value is None:
            assert value is None and expected is None, f"{name}: {value} vs {expected}"
        elif isinstance(expected, float) and not (exact_decisions and name in ("nc4", "ncc_accuracy")):
            assert math.isclose(value, expected, rel_tol=rtol, abs_tol=1e-14), f"{name}: {value} vs {expected}"
        else:
            assert value == expected, f"{name}: {value} vs {expected}"
