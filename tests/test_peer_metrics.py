"""The metrics pfc_fast shares with Wu & Papyan's ``neural-collapse`` package (rhubarbwu/neural-collapse,
``measure.py`` / ``kernels.py`` / ``util.py``): hyperspherical uniformity (GNC2, log and Riesz
kernels), uniform duality (NC3u), orthogonality to out-of-distribution features (NC5) and the
per-class outputs, each against that package's formula written out here in float64, on fresh data."""
import math

import pytest
import torch

import pfc_fast

from conftest import make_features, seed_for


def _wp_normalize(x):
    """neural_collapse.util.normalize: x / (||x|| + eps)."""
    return x / (torch.linalg.norm(x, dim=-1, keepdim=True) + torch.finfo(x.dtype).eps)


def _wp_symm_reduce(grid, reduce=torch.sum):
    """neural_collapse.util.symm_reduce: the reduction of the upper triangle (no diagonal) over
    the K (K - 1) / 2 pairs."""
    k = grid.shape[0]
    a, b = torch.triu_indices(k, k, 1)
    return reduce(grid[a, b]) / (k * (k - 1) / 2)


def _wp_kernel_stats(means, global_mean, kernel):
    """neural_collapse.kernels.kernel_stats: average and variance of a kernel over pairs of
    normalised centred means."""
    grid = kernel(_wp_normalize(means - global_mean))
    avg = _wp_symm_reduce(grid)
    var = _wp_symm_reduce(grid, lambda row: torch.sum((row - avg) ** 2))
    return float(avg), float(var)


def _wp_log_kernel(data):
    """neural_collapse.kernels.log_kernel (exponent -1): log(||a - b||^-1)."""
    return ((data.unsqueeze(1) - data).norm(dim=-1) ** -1).log()


def _wp_riesz_kernel(data):
    """neural_collapse.kernels.riesz_kernel: sign(S) ||a - b||^-S, S = D - 2."""
    s = data.shape[-1] - 2
    return math.copysign(1, s) * (data.unsqueeze(1) - data).norm(dim=-1) ** (-s)


def _wp_similarities(means, weight, global_mean=0.0):
    """neural_collapse.measure.similarities(M, W, m_G, cos=True): cos(w_c, mu_c - mu_G), per class."""
    return torch.nn.functional.cosine_similarity(weight, means - global_mean)


def _problem(n, d, k, name, dtype=torch.float64):
    feats, labels = make_features(n, d, k, seed=seed_for(name, n, d, k), dtype=dtype, spread=0.8, balanced=True)
    means = torch.stack([feats[labels == c].double().mean(0) for c in range(k)])
    return feats, labels, means, means.mean(0)


@pytest.mark.parametrize("d,k", [(3, 4), (5, 7), (12, 30)])
def test_hyperspherical_uniformity_is_wu_papyans_kernel_stats(d, k):
    feats, labels, means, global_mean = _problem(600, d, k, "gnc2")
    metrics = pfc_fast.nc_metrics(feats, labels)
    log_avg, log_var = _wp_kernel_stats(means, global_mean, _wp_log_kernel)
    riesz_avg, _ = _wp_kernel_stats(means, global_mean, _wp_riesz_kernel)
    assert metrics.gnc2_log == pytest.approx(log_avg, rel=1e-12)
    assert metrics.gnc2_log_var == pytest.approx(log_var, rel=1e-10)
    assert metrics.gnc2_riesz_log == pytest.approx(math.log(riesz_avg), rel=1e-12, abs=1e-13)


def test_riesz_energy_stays_finite_where_the_kernel_overflows():
    """D = 2,048: ||a - b||^-2046 overflows float64 for pairs closer than ~0.7, so the package's
    mean is inf; the log of the mean, taken as a log-sum-exp, is finite and equals the exact value
    computed with Python's arbitrary-precision fractions of the same float64 distances."""
    gen = torch.Generator().manual_seed(seed_for("riesz"))
    labels = torch.arange(400) % 4
    direction = torch.randn(2048, generator=gen, dtype=torch.float64)
    centres = torch.tensor([1.0, 1.05, -1.0, -1.05], dtype=torch.float64)[:, None] * direction  # two close pairs
    feats = centres[labels] + 0.01 * torch.randn(400, 2048, generator=gen, dtype=torch.float64)
    means = torch.stack([feats[labels == c].mean(0) for c in range(4)])
    metrics = pfc_fast.nc_metrics(feats, labels)
    riesz_avg, _ = _wp_kernel_stats(means, means.mean(0), _wp_riesz_kernel)
    assert math.isinf(riesz_avg)
    unit = _wp_normalize(means - means.mean(0))
    a, b = torch.triu_indices(4, 4, 1)
    logs = [-2046 * math.log(float(d)) for d in (unit[a] - unit[b]).norm(dim=1)]
    top = max(logs)
    exact = top + math.log(sum(math.exp(v - top) for v in logs) / len(logs))
    assert math.isfinite(metrics.gnc2_riesz_log)
    assert metrics.gnc2_riesz_log == pytest.approx(exact, rel=1e-9)


def test_uniform_duality_is_the_coefficient_of_variation_of_wu_papyans_similarities():
    feats, labels, means, global_mean = _problem(800, 16, 6, "unc3")
    weight = means - global_mean + 0.3 * torch.randn(6, 16, generator=torch.Generator().manual_seed(1),
                                                       dtype=torch.float64)
    cosines = _wp_similarities(means, weight, global_mean)
    metrics = pfc_fast.nc_metrics(feats, labels, classifier=weight)
    assert metrics.nc3_uniform == pytest.approx(float(cosines.std() / cosines.mean()), rel=1e-10)
    assert pfc_fast.nc_metrics(feats, labels).nc3_uniform is None


@pytest.mark.parametrize("global_mean", ["unweighted", "weighted"])
def test_nc5_is_wu_papyans_orthogonality_deviation_of_centred_means(global_mean):
    """orthogonality_deviation(M, m_G_ood) = mean_c |cos(M_c, m_G_ood)|, given the means and the
    out-of-distribution mean both centred by the in-distribution global mean."""
    feats, labels, means, _ = _problem(900, 10, 5, "nc5")
    ood = torch.randn(250, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.7
    mu_g = feats.mean(0) if global_mean == "weighted" else means.mean(0)
    expected = float(torch.nn.functional.cosine_similarity(means - mu_g, (ood.mean(0) - mu_g)[None, :]).abs().mean())
    metrics = pfc_fast.nc_metrics(feats, labels, ood_feats=ood, global_mean=global_mean)
    assert metrics.nc5 == pytest.approx(expected, rel=1e-12)
    assert pfc_fast.nc_metrics(feats, labels).nc5 is None


def test_nc5_in_batches_and_its_errors():
    feats, labels, _, _ = _problem(500, 8, 4, "nc5-acc")
    ood = torch.randn(300, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    acc = pfc_fast.NCAccumulator(4)
    acc.update(feats, labels)
    acc.update_ood(ood[:100])
    acc.next_pass()
    acc.update(feats, labels)
    acc.update_ood(ood[100:])
    assert acc.compute().nc5 == pytest.approx(pfc_fast.nc_metrics(feats, labels, ood_feats=ood).nc5, rel=1e-12)
    with pytest.raises(RuntimeError, match="after compute"):
        acc.update_ood(ood)
    with pytest.raises(ValueError, match="ood_feats has D = 3 but feats has D = 8"):
        pfc_fast.nc_metrics(feats, labels, ood_feats=torch.randn(10, 3))
    with pytest.raises(ValueError, match="ood_feats contains NaN"):
        pfc_fast.nc_metrics(feats, labels, ood_feats=torch.full((4, 8), float("nan")))
    centre = torch.stack([feats[labels == c].mean(0) for c in range(4)]).mean(0)
    with pytest.raises(ValueError, match="nc5 .* is undefined"):
        pfc_fast.nc_metrics(feats, labels, ood_feats=centre[None, :])


def test_per_class_outputs_are_wu_papyans_mean_norms_and_cdnv_grid():
    """mean_norms(M, m_G), the within-class variances ``mean ||h - mu_c||^2`` and
    class_dist_norm_vars(V, M): ((v_a + v_b) / 2) / ||mu_a - mu_b||^2 (the diagonal, 0/0 there, is 0
    here), for the present classes only."""
    feats, labels = make_features(1200, 9, 7, seed=seed_for("per-class"), dtype=torch.float32, absent=(4,))
    classes = [0, 1, 2, 3, 5, 6]
    h = feats.double()
    means = torch.stack([h[labels == c].mean(0) for c in classes])
    variances = torch.stack([((h[labels == c] - means[j]) ** 2).sum(1).mean() for j, c in enumerate(classes)])
    grid = ((variances[:, None] + variances[None, :]) / 2) / ((means.unsqueeze(1) - means) ** 2).sum(-1)
    stats = pfc_fast.nc_metrics(feats, labels, num_classes=7, per_class=True).per_class
    assert stats.classes == classes
    torch.testing.assert_close(stats.mean_norms, (means - means.mean(0)).norm(dim=-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.within_variances, variances, rtol=1e-12, atol=0)
    off = ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(stats.cdnv[off], grid[off], rtol=1e-12, atol=0)
    assert bool((stats.cdnv.diagonal() == 0).all())
    assert stats.to_dict()["cdnv"][0][1] == pytest.approx(float(grid[0, 1]), rel=1e-12)
    assert pfc_fast.nc_metrics(feats, labels).per_class is None


@pytest.mark.parametrize("factor", [2.0 ** -400, 3.0e150])
def test_per_class_outputs_scale_with_the_features(factor):
    feats, labels, _, _ = _problem(400, 6, 3, "per-class-scale")
    base = pfc_fast.nc_metrics(feats, labels, per_class=True).per_class
    scaled = pfc_fast.nc_metrics(feats * factor, labels, per_class=True).per_class
    torch.testing.assert_close(scaled.mean_norms / factor, base.mean_norms, rtol=1e-12, atol=0)
    torch.testing.assert_close(scaled.within_variances / factor ** 2, base.within_variances, rtol=1e-12, atol=0)
    torch.testing.assert_close(scaled.cdnv, base.cdnv, rtol=1e-12, atol=0)


def test_a_class_at_the_global_mean_and_two_equal_means_as_wu_papyan_have_them():
    """Wu & Papyan's normalize(0) = 0 and cosine_similarity(0, x) = 0 give a class mean at the
    global mean cosines 0 and the unit vector 0 (its log kernel with every other is log 1 = 0): NC3u,
    NC5 and the log and Riesz energies equal theirs (all four were NaN here); two equal means give
    their class_dist_norm_vars entry ((v_a + v_b) / 2) / 0 = inf, as the CDNV matrix here (was inf
    too, now documented, and inf also where both variances are 0)."""
    gen = torch.Generator().manual_seed(seed_for("peer-degenerate"))
    d, labels = 5, torch.arange(5).repeat_interleave(60)
    v = torch.randint(-4, 5, (2, d), generator=gen).double()
    while int(torch.linalg.matrix_rank(v)) < 2:  # +-v0, +-v1: four directions
        v = torch.randint(-4, 5, (2, d), generator=gen).double()
    offset = torch.randint(-9, 10, (d,), generator=gen).double()
    centres = offset + torch.stack([0 * v[0], v[0], -v[0], v[1], -v[1]])  # class 0 at the global mean, exactly
    half = torch.randint(-8, 9, (5, 30, d), generator=gen).double() / 16
    noise = torch.cat([half, -half], dim=1).reshape(300, d)  # +-pairs in every class: exact class means
    feats = centres[labels] + noise
    means = torch.stack([feats[labels == c].mean(0) for c in range(5)])
    assert torch.equal(means, centres) and torch.equal(means.mean(0), centres[0])
    weight = torch.randn(5, d, generator=gen, dtype=torch.float64)
    ood = offset + torch.randn(40, d, generator=gen, dtype=torch.float64)
    metrics = pfc_fast.nc_metrics(feats, labels, classifier=weight, ood_feats=ood)
    log_avg, log_var = _wp_kernel_stats(means, means.mean(0), _wp_log_kernel)
    riesz_avg, _ = _wp_kernel_stats(means, means.mean(0), _wp_riesz_kernel)
    cosines = _wp_similarities(means, weight, means.mean(0))
    assert float(cosines[0]) == 0.0
    expected_nc5 = torch.nn.functional.cosine_similarity(means - means.mean(0), (ood.mean(0) - means.mean(0))[None])
    assert metrics.gnc2_log == pytest.approx(log_avg, rel=1e-12)
    assert metrics.gnc2_log_var == pytest.approx(log_var, rel=1e-10)
    assert metrics.gnc2_riesz_log == pytest.approx(math.log(riesz_avg), rel=1e-12, abs=1e-13)
    assert metrics.nc3_uniform == pytest.approx(float(cosines.std() / cosines.mean()), rel=1e-10)
    assert metrics.nc5 == pytest.approx(float(expected_nc5.abs().mean()), rel=1e-12)

    for spread in (1.0, 0.0):
        twins = centres.clone()
        twins[1] = twins[3]
        equal = twins[labels] + spread * noise
        stats = pfc_fast.nc_metrics(equal, labels, per_class=True).per_class
        variances = torch.stack([((equal[labels == c] - twins[c]) ** 2).sum(1).mean() for c in range(5)])
        grid = ((variances[:, None] + variances[None, :]) / 2) / ((twins.unsqueeze(1) - twins) ** 2).sum(-1)
        off = ~torch.eye(5, dtype=torch.bool)
        if spread == 0.0:
            assert math.isnan(grid[1, 3]) and math.isnan(grid[3, 1])  # theirs: 0 / 0; here: inf, as documented
            grid[1, 3] = grid[3, 1] = math.inf
        torch.testing.assert_close(stats.cdnv[off], grid[off], rtol=1e-12, atol=0)
        assert stats.cdnv[1, 3] == stats.cdnv[3, 1] == math.inf
