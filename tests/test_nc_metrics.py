"""nc_metrics against the float64 reference (explicit Sigma_W, Sigma_B, pseudo-inverse) on fresh
random data: all input dtypes, K from 2 to 100, D from 1 to 2048, unbalanced and absent classes,
with and without a classifier, the collapse regime, and D = 65,536 through the projection identity."""
import math

import numpy as np
from fractions import Fraction

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


@pytest.mark.parametrize("d", [48, 700])  # D < K: the basis from the D x D scatter; D > K: from the Gram
def test_many_classes_against_reference(device, d):
    """K = 600 (>= 512: the second pass by BLAS products, csrc/nc/nc_common.h) with a classifier
    and two absent classes."""
    k = 600
    feats, labels = make_features(3000, d, k, seed=seed_for("many", d), device=device, balanced=True, spread=0.7,
                                  absent=(0, 599))
    gen = torch.Generator().manual_seed(seed_for("many-w", d))
    kwargs = {"classifier": torch.randn(k, d, generator=gen).to(device), "bias": torch.randn(k, generator=gen).to(device)}
    ours = pfc_fast.nc_metrics(feats, labels, num_classes=k, **kwargs)
    assert_metrics_close(ours, reference.nc_metrics(feats.double(), labels, num_classes=k, **kwargs), rtol=1e-8)


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


def test_cdnv_of_nearly_coinciding_means_is_exact():
    """Two class means 2^-s apart at unit scale (dyadic data: the means are exact in float64): cdnv
    against its closed form. The Gram expansion of the distance loses every digit at s = 26."""
    for shift in (10, 17, 26, 40):
        delta = 2.0 ** -shift
        base = torch.tensor([[1.0, 0.5, 0.0], [1.0 + delta, 0.5, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
        noise = torch.tensor([[0.25, 0.0, 0.0], [0.0, 0.125, 0.0]], dtype=torch.float64) * delta
        feats = torch.cat([base[c] + sign * noise for c in range(3) for sign in (1, -1)])  # (12, 3), exact means
        labels = torch.arange(3).repeat_interleave(4)
        variances = torch.tensor([float((noise ** 2).sum(1).mean())] * 3)
        distances = torch.cdist(base, base, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        expected = sum(float((variances[a] + variances[b]) / (2 * distances[a, b]))
                       for a in range(3) for b in range(3) if a != b) / 6
        ours = pfc_fast.nc_metrics(feats, labels)
        assert ours.cdnv == pytest.approx(expected, rel=1e-12), shift


def _exact_nc1(feats, labels):
    """``Tr(Sigma_W Sigma_B^-1) / K`` in exact rational arithmetic, for D = 2 (Sigma_B invertible)."""
    rows = [[Fraction(float(v)) for v in row] for row in feats.tolist()]
    ys = labels.tolist()
    classes = sorted(set(ys))
    means = {c: [sum(r[j] for r, y in zip(rows, ys) if y == c) / ys.count(c) for j in range(2)] for c in classes}
    centre = [sum(means[c][j] for c in classes) / len(classes) for j in range(2)]

    def scatter(vectors, scale):
        return [[sum(v[a] * v[b] for v in vectors) / scale for b in range(2)] for a in range(2)]

    within = scatter([[r[j] - means[y][j] for j in range(2)] for r, y in zip(rows, ys)], len(rows))
    between = scatter([[means[c][j] - centre[j] for j in range(2)] for c in classes], len(classes))
    det = between[0][0] * between[1][1] - between[0][1] * between[1][0]
    inverse = [[between[1][1] / det, -between[0][1] / det], [-between[1][0] / det, between[0][0] / det]]
    trace = sum(within[a][b] * inverse[b][a] for a in range(2) for b in range(2))
    return float(trace / len(classes))


def test_overlapping_classes_keep_their_between_class_direction():
    """Two classes whose means are 1e-7 apart (relative to the third): Sigma_B's small eigenvalue
    is real, so nc1 is large, as the float64 reference (size x eps cut-off) and every published
    code have it; the legacy 1e-10 cut-off drops it and reports collapse."""
    gen = torch.Generator().manual_seed(seed_for("overlap"))
    means = torch.tensor([[0.0, 0.0], [1e-7, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.arange(3).repeat(200)
    noise = torch.randn(600, 2, generator=gen, dtype=torch.float64)
    noise -= torch.stack([noise[labels == c].mean(0) for c in range(3)])[labels]  # the means are exact
    feats = means[labels] + 1e-3 * noise
    ours = pfc_fast.nc_metrics(feats, labels)
    # Sigma_B's condition number is 1e14: its small eigenvalue, formed as a square, holds two digits
    # in float64, in pfc_fast's K x K algebra as in the reference's D x D one
    exact = _exact_nc1(feats, labels)
    assert ours.nc1 > 1e7 and ours.nc1 == pytest.approx(exact, rel=5e-2)
    assert pfc_fast.reference.nc_metrics(feats, labels)["nc1"] == pytest.approx(exact, rel=5e-2)
    legacy = pfc_fast.nc_metrics(feats, labels, pinv_rtol=pfc_fast.metrics.LEGACY_PINV_RTOL)
    assert legacy.nc1 < 1.0
    with pytest.raises(ValueError, match="pinv_rtol must be a finite number >= 0"):
        pfc_fast.nc_metrics(feats, labels, pinv_rtol=-1.0)


def _exact_nearest(feats, means):
    """argmin_c ||h - mu_c||^2 in exact rational arithmetic, ties to the lowest c."""
    rows = [[Fraction(float(v)) for v in row] for row in feats.tolist()]
    centres = [[Fraction(float(v)) for v in row] for row in means.tolist()]
    return [min(range(len(centres)), key=lambda c: (sum((a - b) ** 2 for a, b in zip(row, centres[c])), c))
            for row in rows]


def test_exact_ties_in_the_nearest_class_centre_go_to_the_lowest_index(device):
    """Integer features far from the origin (2^20), many samples exactly halfway between two class
    means: the expanded distances round differently for the two classes (for most seeds they decide
    a dozen of these samples the wrong way), the decisions must not. Expected: exact rational arithmetic,
    ties to the lowest index; the reference agrees."""
    gen = torch.Generator().manual_seed(seed_for("ties"))
    k, d, offset = 5, 40, 2.0 ** 20
    centres = 2 * torch.randint(-20, 21, (k, d), generator=gen).double()  # even: integer midpoints
    rows, labels = [], []
    for c in range(k):
        for j in range(d):
            for sign in (1, -1):  # symmetric about the centre: the class mean is exactly the centre
                rows.append(centres[c] + sign * 5 * torch.eye(d, dtype=torch.float64)[j])
        for other in range(k):
            if other != c:
                tie = (centres[c] + centres[other]) / 2  # equidistant from both; its mirror stays in c
                rows += [tie, 2 * centres[c] - tie] * 3
        labels += [c] * (len(rows) - len(labels))
    feats, labels = offset + torch.stack(rows), torch.tensor(labels)
    expected = _exact_nearest(feats, offset + centres)
    accuracy = sum(e == y for e, y in zip(expected, labels.tolist())) / len(expected)
    assert 0.5 < accuracy < 1.0  # ties decided both ways
    ours = pfc_fast.nc_metrics(feats.to(device), labels.to(device), predictions=torch.tensor(expected).to(device))
    assert ours.ncc_accuracy == accuracy and ours.nc4 == 0.0
    assert pfc_fast.reference.nc_metrics(feats, labels)["ncc_accuracy"] == accuracy


@pytest.mark.parametrize("factor", [1e-300, 1e-150, 1e-100, 1e100, 1e150, 1e300])
def test_metrics_are_scale_invariant_in_float64(device, factor):
    """The metrics of c H equal those of H for c from 1e-300 to 1e300 (the traces scale by c^2):
    float64 features are rescaled by a power of two where their products would leave float64's
    range, and finite input is never called "NaN or Inf"."""
    feats, labels = make_features(500, 12, 5, seed=seed_for("scale", factor), dtype=torch.float64, spread=0.3)
    gen = torch.Generator().manual_seed(seed_for("scale-classifier"))
    weight, bias = torch.randn(5, 12, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    plain = pfc_fast.nc_metrics(feats.to(device), labels.to(device), classifier=weight.to(device), bias=bias.to(device))
    scaled = pfc_fast.nc_metrics((factor * feats).to(device), labels.to(device), classifier=weight.to(device),
                                 bias=(factor * bias).to(device))
    for field, value in plain.to_dict().items():
        other = getattr(scaled, field)
        if field in ("within_trace", "between_trace"):
            expected = factor * factor * value  # 0 or inf where float64 cannot hold it
            if 1e-300 < expected < 1e300:
                assert other == pytest.approx(expected, rel=1e-12), field
        elif isinstance(value, float):
            assert other == pytest.approx(value, rel=1e-10, abs=1e-14), field
        else:
            assert other == value, field
    if not 1e-150 <= factor <= 1e150:
        return  # batches 1e300 apart: their products cannot share float64's range
    acc = pfc_fast.NCAccumulator(5)  # batches of very different magnitudes, rescaled on the way
    order = torch.argsort(feats[:, 0])
    for part in (order[:100], order[100:]):
        acc.update(factor * feats[part] if part.numel() == 100 else feats[part], labels[part])
    acc.next_pass()
    for part in (order[:100], order[100:]):
        acc.update(factor * feats[part] if part.numel() == 100 else feats[part], labels[part])
    mixed = torch.cat([factor * feats[order[:100]], feats[order[100:]]])
    reference_metrics = pfc_fast.reference.nc_metrics(mixed, labels[order]) if 1e-100 <= factor <= 1e100 else None
    result = acc.compute()
    assert math.isfinite(result.nc1) and math.isfinite(result.cdnv)
    if reference_metrics is not None:
        assert result.nc1 == pytest.approx(reference_metrics["nc1"], rel=1e-8)


def test_subnormal_features_and_a_bias_that_dwarfs_tiny_features():
    """Subnormal float64 features (largest 1e-310) are rescaled, not refused; a classifier whose
    bias dwarfs the logits of tiny features decides by the bias, as W h + b does in float64."""
    feats, labels = make_features(400, 8, 4, seed=seed_for("subnormal"), dtype=torch.float64, spread=0.3)
    plain = pfc_fast.nc_metrics(feats, labels)
    tiny = pfc_fast.nc_metrics(feats / feats.abs().max() * 1e-310, labels)
    assert tiny.nc1 == pytest.approx(plain.nc1, rel=1e-6) and tiny.ncc_accuracy == plain.ncc_accuracy
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed_for("bias")), dtype=torch.float64)
    bias = torch.tensor([1e9, 2e9, 3e9, 4e9], dtype=torch.float64)  # argmax(W h + b) = 3 for every tiny h
    expected = pfc_fast.nc_metrics(feats, labels, predictions=torch.full_like(labels, 3)).nc4
    assert pfc_fast.nc_metrics(feats * 1e-300, labels, classifier=weight, bias=bias).nc4 == expected
    with pytest.raises(ValueError, match="pinv_rtol must be < 1"):
        pfc_fast.nc_metrics(feats, labels, pinv_rtol=1.0)


def _exact_classes(centres, counts, gen, spread=0.25):
    """Samples ``centre_c +- e`` in pairs (``e``: random multiples of ``spread / 8``; an odd count adds the
    centre itself): dyadic values whose class means are the integer ``centres`` exactly in float64."""
    rows, labels = [], []
    for c, (centre, n) in enumerate(zip(centres, counts)):
        noise = torch.randint(-8, 9, (n // 2, centre.shape[0]), generator=gen).double() * spread / 8
        rows += [centre + noise, centre - noise] + ([centre[None]] if n % 2 else [])
        labels += [c] * n
    return torch.cat(rows), torch.tensor(labels)


def _axes(d, count, gen):
    """``count`` distinct random coordinate axes of R^d, times random nonzero integers."""
    axes = torch.randperm(d, generator=gen)[:count]
    signs = 2 * torch.randint(0, 2, (count,), generator=gen) - 1
    scales = torch.randint(1, 5, (count,), generator=gen).double() * signs
    return torch.eye(d, dtype=torch.float64)[axes] * scales[:, None]


def _no_nan(metrics):
    values = [v for v in metrics.to_dict().values() if isinstance(v, float)]
    assert not any(math.isnan(v) for v in values), metrics


@pytest.mark.parametrize("global_mean", ["unweighted", "weighted"])
def test_a_class_mean_at_the_global_mean_has_no_direction(device, global_mean):
    """Centred means 0, +-v1, +-v2 (v1, v2 orthogonal; for the weighted mean 0, 2v, -v with counts 4, 4, 8):
    nc2_equiangle, gnc2_*, nc3_uniform and nc5 were NaN (0 / 0 cosines). Class 0 has no direction:
    its cosines are 0 and its unit vector 0, so (unweighted) nc2_equiangle = (8 x 1/4 + 4 x 3/4 +
    8 x 1/4) / 20 = 0.35 and gnc2_log = (4 log 1 + 2 log 1/2 + 4 log 1/sqrt 2) / 10 = -0.4 log 2;
    every field against the float64 reference."""
    gen = torch.Generator().manual_seed(seed_for("at-global-mean", global_mean))
    d = 4
    offset = torch.randint(-9, 10, (d,), generator=gen).double()
    v = _axes(d, 2, gen)
    if global_mean == "unweighted":
        centres, counts = torch.stack([0 * v[0], v[0], -v[0], v[1], -v[1]]), [6, 7, 8, 9, 10]
    else:  # the sample mean (4 x 0 + 4 x 2v - 8 x v) / 16 = 0
        centres, counts = torch.stack([0 * v[0], 2 * v[0], -v[0]]), [4, 4, 8]
    feats, labels = _exact_classes(offset + centres, counts, gen)
    k = centres.shape[0]
    classifier = torch.randn(k, d, generator=gen, dtype=torch.float64)
    ood = offset + torch.randn(7, d, generator=gen, dtype=torch.float64)
    kwargs = dict(classifier=classifier, ood_feats=ood, global_mean=global_mean)
    ours = pfc_fast.nc_metrics(feats.to(device), labels.to(device), **{**kwargs, "classifier": classifier.to(device),
                                                                       "ood_feats": ood.to(device)})
    _no_nan(ours)
    assert_metrics_close(ours, reference.nc_metrics(feats, labels, **kwargs), rtol=1e-9, exact_decisions=False)
    if global_mean == "unweighted":
        assert ours.nc2_equiangle == pytest.approx(0.35, rel=1e-14)
        assert ours.gnc2_log == pytest.approx(-0.4 * math.log(2), rel=1e-14)
    else:  # 0, 2v, -v: cosines 0, 0 and -1, so (4 x 1/2 + 2 x 1/2) / 6
        assert ours.nc2_equiangle == pytest.approx(0.5, rel=1e-14)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("spread", [0.25, 0.0], ids=["spread", "no-spread"])
def test_two_equal_class_means(device, d, spread):
    """mu_0 = mu_1: the cdnv term (var_0 + var_1) / (2 ||mu_0 - mu_1||^2) is inf (was inf, or NaN for
    var = 0), the log energy of the coinciding u_0 = u_1 and its variance inf, the Riesz (D-2)-energy
    inf for D >= 3 and 0 for D = 2 (the kernel d^0 = 1; was NaN); the other terms and fields finite,
    against the reference and the closed form of the per-class CDNV matrix."""
    gen = torch.Generator().manual_seed(seed_for("equal-means", d, spread))
    offset = torch.randint(-9, 10, (d,), generator=gen).double()
    centres = torch.randint(-6, 7, (4, d), generator=gen).double()
    centres[1] = centres[0]
    steps = _axes(d, 2, gen) if d >= 2 else torch.tensor([[3.0], [-7.0]])  # classes 2, 3: no direction shared
    centres[2:] = centres[0] + 2 * steps
    feats, labels = _exact_classes(offset + centres, [6, 8, 5, 9], gen, spread=spread)
    ours = pfc_fast.nc_metrics(feats.to(device), labels.to(device), per_class=True)
    _no_nan(ours)
    ref = reference.nc_metrics(feats, labels)
    assert_metrics_close(ours, ref, rtol=1e-9, exact_decisions=False)
    assert ours.cdnv == math.inf and ours.gnc2_log == math.inf and ours.gnc2_log_var == math.inf
    assert ours.gnc2_riesz_log == {1: None, 2: 0.0, 3: math.inf}[d]
    variances = torch.stack([((feats[labels == c] - centres[c] - offset) ** 2).sum(1).mean() for c in range(4)])
    distances = ((centres[:, None] - centres[None]) ** 2).sum(-1)
    grid = ours.per_class.cdnv
    assert grid[0, 1] == grid[1, 0] == math.inf and bool((grid.diagonal() == 0).all())
    off = ~torch.eye(4, dtype=torch.bool)
    off[0, 1] = off[1, 0] = False
    torch.testing.assert_close(grid[off], ((variances[:, None] + variances[None]) / (2 * distances))[off],
                               rtol=1e-12, atol=0)


def test_d1_with_three_classes_puts_two_directions_together():
    """D = 1, K = 3: two centred means share a sign, so u_a = u_b: gnc2_log = gnc2_log_var = inf in
    the package and now in the reference (its variance was NaN, inf - inf)."""
    gen = torch.Generator().manual_seed(seed_for("d1-k3"))
    centres = torch.tensor([[-5.0], [1.0], [3.0]]) + torch.randint(-9, 10, (1,), generator=gen).double()
    feats, labels = _exact_classes(centres, [8, 9, 10], gen)
    ours = pfc_fast.nc_metrics(feats, labels)
    assert ours.gnc2_log == math.inf and ours.gnc2_log_var == math.inf and ours.gnc2_riesz_log is None
    assert_metrics_close(ours, reference.nc_metrics(feats, labels), rtol=1e-12, exact_decisions=False)


def test_classifier_degenerate_cases():
    """A zero classifier row (nc3_uniform was NaN, the reference finite), W orthogonal to every
    centred mean (W M^T = 0: nc3_etf = 1, the normalised zero matrix against the unit-norm ETF, and
    nc3_uniform = inf, all cosines 0; both were NaN), and classifier rows of the present classes all
    zero (nc3 was NaN; now refused as an all-zero classifier is)."""
    gen = torch.Generator().manual_seed(seed_for("classifier-degenerate"))
    d = 3
    centres = torch.randint(-6, 7, (4, 2), generator=gen).double()
    while _parallel_pair(centres) or len(set(map(tuple, centres.tolist()))) < 4:  # no direction shared by rounding
        centres = torch.randint(-6, 7, (4, 2), generator=gen).double()
    centres = torch.cat([centres, torch.zeros(4, 1, dtype=torch.float64)], dim=1)  # the means span 2 of 3 axes
    offset = torch.randint(-9, 10, (d,), generator=gen).double()
    feats, labels = _exact_classes(offset + centres, [6, 7, 8, 9], gen)
    weight = torch.randn(4, d, generator=gen, dtype=torch.float64)
    weight[2] = 0
    ours = pfc_fast.nc_metrics(feats, labels, classifier=weight)
    _no_nan(ours)
    assert_metrics_close(ours, reference.nc_metrics(feats, labels, classifier=weight), rtol=1e-10,
                         exact_decisions=False)
    orthogonal = torch.zeros(4, d, dtype=torch.float64)
    orthogonal[:, 2] = torch.randint(1, 5, (4,), generator=gen).double()  # along the axis the means do not use
    ours = pfc_fast.nc_metrics(feats, labels, classifier=orthogonal)
    assert ours.nc3_etf == pytest.approx(1.0, rel=1e-14) and ours.nc3_uniform == math.inf
    assert ours.nc3 == pytest.approx(2.0, rel=1e-14)  # || W/|W| - M/|M| ||^2 of orthogonal unit-norm matrices
    assert_metrics_close(ours, reference.nc_metrics(feats, labels, classifier=orthogonal), rtol=1e-10,
                         exact_decisions=False)
    absent_only = torch.zeros(5, d, dtype=torch.float64)
    absent_only[4] = 1.0  # class 4 has no samples
    with pytest.raises(ValueError, match=r"classifier: the rows of the classes present \(\[0, 1, 2, 3\]\) are all "
                                         "zeros; NC3 is undefined"):
        pfc_fast.nc_metrics(feats, labels, num_classes=5, classifier=absent_only)


@pytest.mark.parametrize("value", [0.1, 12345.678, -3.7e-5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_constant_features_are_refused(value, dtype):
    """Constant features: their class means differ by rounding only (a few eps); float64 0.1 gave
    nc1 = 0.97 and 12345.678 cdnv = NaN, from the rounding. All class means equal to 64 eps of
    their magnitude are refused as equal."""
    labels = torch.arange(37) % 3
    with pytest.raises(ValueError, match=r"all class means are equal \(to float64 rounding"):
        pfc_fast.nc_metrics(torch.full((37, 4), value, dtype=dtype), labels)


def _parallel_pair(centres):
    """Whether two unequal centred means (integer ``centres``, unweighted global mean) point the same
    way: their directions are then equal in exact arithmetic only, and the log energy of the pair,
    ``log(1 / d)`` with ``d`` the rounding of their normalisation, depends on that rounding."""
    scaled = (centres.shape[0] * centres - centres.sum(0)).long()  # K (mu_c - mu_G), exact
    for a in range(len(scaled)):
        for b in range(a + 1, len(scaled)):
            u, v = scaled[a], scaled[b]
            if u.any() and v.any() and not torch.equal(u, v) and int(u @ v) > 0 and \
                    not bool((u[:, None] * v[None, :] != v[:, None] * u[None, :]).any()):
                return True
    return False


def test_random_degenerate_geometries_never_give_nan():
    """Seeded random small problems (K 2..6, D 1..4, classes of 1..7 samples, spread 0 or not), each
    with a random degeneracy: a class mean repeated (its unit distance was the rounding of two norms
    of one vector, ~1e-16, so gnc2_log finite where the reference has inf), a class mean at the
    global mean (centres +-v and 0), or none; no field is NaN, and every field equals the
    reference's (configurations with parallel unequal centred means in D >= 2 redrawn)."""
    gen = torch.Generator().manual_seed(seed_for("random-degenerate"))
    for case in range(60):
        k, d = int(torch.randint(2, 7, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen))
        centres = torch.randint(-4, 5, (k, d), generator=gen).double()
        kind = case % 3
        if kind == 0:
            centres[k - 1] = centres[0]
        elif kind == 1 and k >= 3:
            half = (k - 1) // 2
            centres[1:1 + half] = centres[1 + half:1 + 2 * half]  # +-v pairs about class 0's centre
            centres[1 + half:1 + 2 * half] *= -1
            centres[0] = 0
            if (k - 1) % 2:
                centres[k - 1] = 0  # an odd one out at 0 too: an equal mean
        if d >= 2 and _parallel_pair(centres):
            continue
        counts = torch.randint(1, 8, (k,), generator=gen).tolist()
        offset = torch.randint(-9, 10, (d,), generator=gen).double()
        feats, labels = _exact_classes(offset + centres, counts, gen, spread=float(case % 4 != 3) * 0.5)
        expected = reference.nc_metrics(feats, labels)
        means = torch.stack([feats[labels == c].mean(0) for c in range(k)])
        if bool((means == means[0]).all()):
            with pytest.raises(ValueError, match="all class means are equal"):
                pfc_fast.nc_metrics(feats, labels)
            continue
        ours = pfc_fast.nc_metrics(feats, labels)
        _no_nan(ours)
        # rtol: small integer centres can make Sigma_B ill-conditioned (nc1 in the 1e4s), where nc1
        # keeps fewer digits (docs/spec.md section 3)
        assert_metrics_close(ours, expected, rtol=1e-6, abs_tol=1e-12, exact_decisions=False)
