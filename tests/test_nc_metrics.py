"""nc_metrics against the float64 reference (explicit Sigma_W, Sigma_B, pseudo-inverse) on fresh
random data: all input dtypes, K from 2 to 100, D from 1 to 2048, unbalanced and absent classes,
with and without a classifier, the collapse regime, and D = 65,536 through the projection identity."""
import numpy as np
import pytest
import torch

import pfc_fast
from pfc_fast import reference

from conftest import assert_metrics_close, make_features, seed_for

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# (N, D, K, absent classes)
SHAPES = [
    (300, 1, 2, ()),
    (500, 5, 3, ()),
    (1500, 64, 10, (3, 7)),
    (3000, 300, 100, (0, 50, 99)),
    (700, 2048, 10, (9,)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-D{s[1]}-K{s[2]}")
@pytest.mark.parametrize("with_classifier", [False, True], ids=["no-W", "W"])
def test_against_reference(device, dtype, shape, with_classifier):
    n, d, k, absent = shape
    seed = seed_for(n, d, k, str(dtype), with_classifier)
    feats, labels = make_features(n, d, k, seed=seed, device=device, dtype=dtype, spread=0.7, absent=absent)
    kwargs = {}
    if with_classifier:
        gen = torch.Generator().manual_seed(seed + 1)
        kwargs = {"classifier": torch.randn(k, d, generator=gen).to(device),
                  "bias": torch.randn(k, generator=gen).to(device)}
    ours = pfc_fast.nc_metrics(feats, labels, num_classes=k, **kwargs)
    ref = reference.nc_metrics(feats.double(), labels, num_classes=k, **kwargs)
    # abs_tol: with K = 2 and D = 1, nc2_equinorm and nc2_etf are 0 exactly and come out near 1e-14
    assert_metrics_close(ours, ref, rtol=1e-8, abs_tol=1e-12)


@pytest.mark.parametrize("target", [1e-2, 1e-4, 1e-6, 1e-8, 1e-10])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.float64, 1e-9)], ids=["fp32", "fp64"])
def test_collapse_regime(device, target, dtype, rtol):
    """Spec section 3: nc1 down to 1e-10 with offsets 1e4 times the within-class spread."""
    n, d, k = 2000, 32, 10
    spread = (target * k / d) ** 0.5  # nc1 ~ d * spread^2 / k for unit-variance class means
    feats, labels = make_features(n, d, k, seed=int(-np.log10(target)), device=device, dtype=dtype,
                                  spread=spread, offset=1e4 * spread)
    gen = torch.Generator().manual_seed(5)
    classifier = torch.randn(k, d, generator=gen, dtype=torch.float64).to(device)
    ours = pfc_fast.nc_metrics(feats, labels, classifier=classifier)
    ref = reference.nc_metrics(feats.double(), labels, classifier=classifier)
    assert target / 30 < ref["nc1"] < target * 30  # the regime is the intended one
    assert_metrics_close(ours, ref, rtol=rtol)


def test_nc1_projection_identity_large_dim(device):
    """D = 65,536 (a flattened ResNet-18 layer1 map): no D x D matrix anywhere."""
    feats, labels = make_features(400, 65536, 5, seed=11, device=device, dtype=torch.float32, spread=2.0)
    ours = pfc_fast.nc_metrics(feats.view(400, 64, 32, 32), labels)
    assert ours.dim == 65536
    assert ours.nc1 == pytest.approx(reference.nc1_projection(feats, labels), rel=1e-9)


def test_pooling_and_numpy_and_weighted_mean(device):
    feats, labels = make_features(600, 8 * 3 * 3, 4, seed=3, device=device, spread=1.5)
    maps = feats.view(600, 8, 3, 3)
    gap = pfc_fast.nc_metrics(maps, labels, pooling="gap", global_mean="weighted")
    ref = reference.nc_metrics(maps.double(), labels, pooling="gap", global_mean="weighted")
    assert gap.dim == 8
    assert_metrics_close(gap, ref, rtol=1e-9)
    flat = pfc_fast.nc_metrics(maps.cpu().numpy(), labels.cpu().numpy())
    assert_metrics_close(flat, reference.nc_metrics(feats.cpu().double(), labels.cpu()), rtol=1e-9)


def test_predictions_give_nc4(device):
    feats, labels = make_features(800, 16, 6, seed=4, device=device, spread=2.0)
    gen = torch.Generator().manual_seed(9)
    predictions = torch.randint(0, 6, (800,), generator=gen).to(device)
    ours = pfc_fast.nc_metrics(feats, labels, predictions=predictions)
    ref = reference.nc_metrics(feats.double(), labels, predictions=predictions)
    assert_metrics_close(ours, ref, rtol=1e-9)
    assert ours.nc3 is None and ours.nc4 is not None


def test_strided_features(device):
    feats, labels = make_features(500, 40, 5, seed=6, device=device)
    view = feats[:, ::2]  # non-contiguous columns
    rows = feats[::2]     # row stride != D
    assert_metrics_close(pfc_fast.nc_metrics(view, labels), reference.nc_metrics(view.double(), labels), 1e-9)
    assert_metrics_close(pfc_fast.nc_metrics(rows, labels[::2]), reference.nc_metrics(rows.double(), labels[::2]),
                         1e-9)


def test_perfect_collapse_matches_closed_form():
    """Features equal to a simplex ETF: nc1 = 0, nc2 = 0, nc3 = 0 with W = M^T, NCC exact."""
    k = 5
    etf = torch.eye(k, dtype=torch.float64) - 1.0 / k
    labels = torch.arange(k).repeat(20)
    metrics = pfc_fast.nc_metrics(etf[labels] + 3.0, labels, classifier=etf)
    assert metrics.nc1 < 1e-25 and metrics.within_trace < 1e-25  # rounding of (etf + 3) only
    assert metrics.nc2_etf == pytest.approx(0, abs=1e-12)
    assert metrics.nc2_equinorm == pytest.approx(0, abs=1e-12)
    assert metrics.nc2_equiangle == pytest.approx(0, abs=1e-12)
    assert metrics.nc3 == pytest.approx(0, abs=1e-12)
    assert metrics.nc3_etf == pytest.approx(0, abs=1e-12)
    assert metrics.nc4 == 0 and metrics.ncc_accuracy == 1
    assert metrics.between_trace == pytest.approx((k - 1) / k)
