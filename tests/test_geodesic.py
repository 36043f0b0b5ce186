"""Geodesic checks on constructed cases with known answers (docs/spec.md section 5)."""
import pytest
import torch
from scipy.stats import spearmanr

import pfc_fast
from pfc_fast import geodesic


def _points(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _interpolation(x0, x1, layers):
    return [(1 - l / layers) * x0 + (l / layers) * x1 for l in range(layers + 1)]


def test_line_shape_score_straight_and_bent():
    x0 = _points(100, 6, 1)
    direction = _points(100, 6, 2)
    straight = [x0 + t * direction for t in (0.0, 0.1, 0.5, 0.7, 2.0)]  # uneven speed, straight lines
    assert geodesic.line_shape_score(straight) == pytest.approx(1.0, abs=1e-12)
    # a right-angle bend: two unit steps at 90 degrees give n / |u_n - u_0| = 2 / sqrt(2)
    turn = torch.zeros_like(x0)
    turn[:, 0] = 1.0
    up = torch.zeros_like(x0)
    up[:, 1] = 1.0
    assert geodesic.line_shape_score([x0, x0 + turn, x0 + turn + up]) == pytest.approx(2 ** 0.5, rel=1e-12)
    # a random walk is far from straight
    walk = [x0]
    for k in range(6):
        walk.append(walk[-1] + _points(100, 6, 10 + k))
    assert geodesic.line_shape_score(walk) > 1.3


def test_ot_score_optimal_and_not():
    x0 = _points(200, 1, 3)
    monotone = 3.0 * x0 + x0 ** 3 + 5.0          # increasing map in 1-D: the optimal one
    assert geodesic.ot_score(x0, monotone) == 1.0
    translated = _points(150, 4, 4)
    assert geodesic.ot_score(translated, translated + torch.tensor([2.0, -1.0, 0.0, 3.0], dtype=torch.float64)) == 1.0
    shuffled = monotone[torch.randperm(200, generator=torch.Generator().manual_seed(5))]
    assert geodesic.ot_score(x0, shuffled) < 0.1


def test_path_ratio_geodesic_and_detour():
    x0 = _points(150, 3, 6)
    target = 2.0 * x0 + torch.tensor([4.0, 0.0, -2.0], dtype=torch.float64)  # gradient of a convex map
    assert geodesic.wasserstein_path_ratio(_interpolation(x0, target, 4)) == pytest.approx(1.0, abs=2e-3)
    detour = [x0, x0 + torch.tensor([5.0, 5.0, 0.0], dtype=torch.float64), target]
    assert geodesic.wasserstein_path_ratio(detour) < 0.8


def test_scores_are_the_three_scores():
    x0 = _points(80, 3, 7)
    layers = _interpolation(x0, 1.5 * x0 + 2.0, 3)
    assert geodesic.scores(layers) == {"lss": float(geodesic.line_shape_score(layers)),
                                       "ots": float(geodesic.ot_score(layers[0], layers[-1])),
                                       "w_path_ratio": float(geodesic.wasserstein_path_ratio(layers))}


def test_transparent_model_towards_etf():
    gen = torch.Generator().manual_seed(7)
    labels = torch.arange(5).repeat_interleave(60)
    x0 = torch.randn(5, 8, generator=gen, dtype=torch.float64)[labels] * 2 + torch.randn(300, 8, generator=gen, dtype=torch.float64)
    model = geodesic.transparent_model(x0, labels, target="etf", num_layers=6)
    assert model.ts == [l / 6 for l in range(7)]
    nc1 = [m.nc1 for m in model.metrics]
    nc2 = [m.nc2_etf for m in model.metrics]
    assert all(b < a for a, b in zip(nc1, nc1[1:]))           # monotone decrease along t
    assert spearmanr(range(7), nc2).statistic == pytest.approx(-1.0)
    assert nc1[-1] < 1e-20 and nc2[-1] < 1e-12                 # t = 1 is the ETF: full collapse
    torch.testing.assert_close(model.features[0], x0)


def test_transparent_model_towards_features():
    x0 = _points(80, 4, 8)
    labels = torch.arange(80) % 4
    target = x0 * 0.5 + torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    model = geodesic.transparent_model(x0, labels, target=target, ts=[0.0, 0.5, 1.0])
    torch.testing.assert_close(model.features[-1], target)   # the optimal map is the identity pairing here
    torch.testing.assert_close(model.features[1], 0.5 * (x0 + target))


def test_simplex_etf():
    vertices = geodesic.simplex_etf(6, 9, scale=2.0)
    gram = vertices @ vertices.T
    torch.testing.assert_close(torch.diagonal(gram), torch.full((6,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(gram[0, 1], torch.tensor(-4.0 / 5, dtype=torch.float64))
    torch.testing.assert_close(vertices.sum(0), torch.zeros(9, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: geodesic.line_shape_score([torch.zeros(3, 2)]), ValueError, "at least 2 layers"),
        (lambda: geodesic.line_shape_score([torch.zeros(3, 2), torch.zeros(3, 3)]), ValueError, "same shape"),
        (lambda: geodesic.line_shape_score([torch.zeros(3, 2)] * 3), ValueError, "no sample moves"),
        (lambda: geodesic.ot_score(torch.zeros(3, 2), torch.full((3, 2), float("nan"))), ValueError, "NaN"),
        (lambda: geodesic.ot_score(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2)), TypeError, "floating"),
        (lambda: geodesic.simplex_etf(5, 3), ValueError, "needs D >= 4"),
        (lambda: geodesic.transparent_model(torch.zeros(4, 2), torch.arange(4), target="nc"), ValueError, "target"),
        (lambda: geodesic.transparent_model(torch.randn(4, 2), torch.arange(4), target=torch.zeros(5, 2)),
         ValueError, "target must have the shape"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_line_shape_score_out_and_back():
    """Issue 14: a track that goes out and back (x_2 = x_0: displacement 0, path length > 0) gave a
    silent inf (NaN for coordinates near float64's largest); its unit steps cancel, so its LSS is
    inf, as documented (docs/spec.md section 5), and so is the mean; never NaN. Closed forms."""
    x0 = _points(50, 4, 11)
    step = _points(50, 4, 12)
    assert geodesic.line_shape_score([x0, x0 + step, x0]) == float("inf")
    # one sample out and back among straight ones: the mean is inf
    back = x0.clone()
    back[0] = x0[0] + 2 * step[0]
    assert geodesic.line_shape_score([x0, x0 + step, x0 + 2 * step - (back - x0)]) == float("inf")
    # the limit: coming back to within delta of x_0 (a hairpin) gives n / ||u_n - u_0|| -> inf
    turn = torch.zeros(1, 2, dtype=torch.float64)
    turn[0, 0] = 1.0
    for delta in (1e-3, 1e-6):
        hairpin = [turn * 0, turn, torch.tensor([[0.0, delta]], dtype=torch.float64)]
        u = 1.0 - 1.0 / (1.0 + delta ** 2) ** 0.5, delta / (1.0 + delta ** 2) ** 0.5  # u_2 - u_0
        assert geodesic.line_shape_score(hairpin) == pytest.approx(2 / (u[0] ** 2 + u[1] ** 2) ** 0.5, rel=1e-9)
    # coordinates near float64's largest and smallest numbers: the same scores as at unit scale
    big, tiny = torch.full((3, 2), 1e308, dtype=torch.float64), torch.full((3, 2), 1e-310, dtype=torch.float64)
    assert geodesic.line_shape_score([big, -big, big]) == float("inf")
    bent = [turn * 0, turn, turn + turn.flip(1)]
    for s in (1e300, 1e-300):
        assert geodesic.line_shape_score([t * s for t in bent]) == pytest.approx(2 ** 0.5, rel=1e-12)
    assert geodesic.line_shape_score([tiny * 0, tiny, 2 * tiny]) == pytest.approx(1.0, rel=1e-12)


def test_path_ratio_on_layers_collapsed_onto_class_points():
    """Issue 14: two consecutive layers collapsed onto the same 2 class points make the median
    cost 0, and the default eps was 0 (a ValueError about an eps not given). The default now comes
    from the nonzero squared distances. Translations: W2 is the shift's length (closed form), so
    the ratio is |t + s| / (0 + |t| + |s|) = 5/7."""
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64).repeat(20, 1)  # 2 classes
    t, s = torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 4.0], dtype=torch.float64)
    layers = [points, points, points + t, points + t + s]
    assert geodesic.wasserstein_path_ratio(layers) == pytest.approx(5 / 7, rel=1e-6)
    assert pfc_fast.median_cost(points, points) == 0
    assert pfc_fast.median_cost(points, points, nonzero=True) == 1.0
    single = torch.zeros(5, 2, dtype=torch.float64)  # every layer one and the same point
    assert pfc_fast.median_cost(single, single, nonzero=True) == 0
    with pytest.raises(ValueError, match="the measures do not move"):
        geodesic.wasserstein_path_ratio([single, single, single])
