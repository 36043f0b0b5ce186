"""MUFM (docs/spec.md section 6): the UFM's ETF optimum, the coupled optimum, the straight path, and
stationarity checked by an independent autograd implementation of the objective."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

import pfc_fast
from pfc_fast import mufm

LAMBDA = 5e-3  # the default lw = lb = lh


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The problems here are tiny: intra-op threads only add synchronisation (10x slower on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _balanced(n, d, k, seed, spread=1.0):
    """Balanced classes: random class means plus ``spread`` times Gaussian noise (float64)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randperm(n, generator=gen) % k
    means = torch.randn(k, d, generator=gen, dtype=torch.float64)
    return means[labels] + spread * torch.randn(n, d, generator=gen, dtype=torch.float64), labels


def _objective(layers, weight, bias, labels, lot, lw=LAMBDA, lb=LAMBDA, lh=LAMBDA):
    """Spec section 6 with the matched cost, written directly (torch autograd, no pfc_fast code)."""
    n = layers[0].shape[0]
    ce = torch.nn.functional.cross_entropy(layers[-1] @ weight.T + bias, labels)
    coupling = sum(((h - prev) ** 2).sum() for prev, h in zip(layers[:-1], layers[1:])) / n
    return (ce + lw / 2 * (weight ** 2).sum() + lb / 2 * (bias ** 2).sum() + lh / (2 * n) * (layers[-1] ** 2).sum()
            + lot * coupling), ce


def _autograd_stationarity(result, labels, lot):
    """``(F, ||grad F|| / ||grad CE||)`` at ``result`` over ``H_1..H_L, W, b``, by autograd."""
    free = [t.clone().requires_grad_() for t in result.layers[1:] + [result.W, result.b]]
    value, ce = _objective([result.layers[0]] + free[:-2], free[-2], free[-1], labels, lot)
    grad = torch.autograd.grad(value, free, retain_graph=True)
    grad_ce = torch.autograd.grad(ce, free, allow_unused=True)
    norm = lambda gs: math.sqrt(sum(float((g ** 2).sum()) for g in gs if g is not None))
    return float(value.detach()), norm(grad) / norm(grad_ce)


def _ufm_optimum(k, lw, lh):
    """Minimum of the UFM (Zhu et al. 2021) with balanced classes, from its 1-D reduction.

    A simplex ETF with class means of norm s and classifier rows of norm t (b = 0) has logit
    margin u = s t K/(K-1) over every other class, so F = log(1 + (K-1) e^{-u}) + lw K t^2/2 +
    lh s^2/2, and for a given s t the weight decay is smallest, sqrt(K lw lh) s t, when
    lw K t^2 = lh s^2.
    """
    loss = lambda st: math.log1p((k - 1) * math.exp(-st * k / (k - 1))) + math.sqrt(k * lw * lh) * st
    return minimize_scalar(loss, bounds=(0.0, 100.0), method="bounded", options={"xatol": 1e-12}).fun


def test_ufm_reaches_the_simplex_etf():
    x, labels = _balanced(120, 16, 4, seed=1)
    result = mufm.solve(x, labels, num_layers=3, lot=0.0)
    assert result.converged and result.stop == "tol" and result.grad_norm < 1e-6
    last = result.metrics[-1]
    assert last.nc1 < 1e-10 and last.nc2_etf < 1e-6 and last.nc3_etf < 1e-6 and last.nc2_equinorm < 1e-6
    assert float(result.b.abs().max()) < 1e-6                    # Zhu et al.: b = 0 when lb > 0
    assert result.loss == pytest.approx(_ufm_optimum(4, LAMBDA, LAMBDA), rel=1e-9, abs=0)
    value, stationarity = _autograd_stationarity(result, labels, lot=0.0)
    assert value == pytest.approx(result.loss, rel=1e-12)
    assert stationarity < 1e-6 and stationarity == pytest.approx(result.grad_norm, rel=1e-3, abs=1e-12)
    # the intermediate layers are free at lot = 0; the documented choice is the straight path
    h_last = result.layers[-1]
    for l, h in enumerate(result.layers):
        assert torch.allclose(h, x + (l / 3) * (h_last - x), rtol=0, atol=1e-12)
    assert result.layers[0] is not x and torch.equal(result.layers[0], x)


def _distance(result, reference):
    """Largest relative difference of ``H_1..H_L`` and ``W`` between two results."""
    pairs = zip(result.layers[1:] + [result.W], reference.layers[1:] + [reference.W])
    return max(float((a - b).norm() / b.norm()) for a, b in pairs)


def test_ufm_result_is_the_small_lot_limit():
    """At lot = 0 the ETF is free up to a rotation: the one returned is the lot -> 0+ limit."""
    x, labels = _balanced(60, 8, 3, seed=9)
    ufm = mufm.solve(x, labels, 2, 0.0)
    warm = mufm.solve(x, labels, 2, 0.0, init=mufm.solve(x, labels, 2, 0.05))
    assert warm.converged and _distance(warm, ufm) < 1e-6             # whatever the start
    near, nearer = (_distance(mufm.solve(x, labels, 2, lot), ufm) for lot in (2e-4, 1e-4))
    assert near < 0.1 and near / nearer == pytest.approx(2.0, rel=0.1)  # O(lot) away from it


def test_matched_coupling_concentrates_without_collapse():
    x, labels = _balanced(120, 16, 4, seed=2)
    ufm = mufm.solve(x, labels, num_layers=3, lot=0.0)
    result = mufm.solve(x, labels, num_layers=3, lot=0.01)
    assert result.converged and result.grad_norm < 1e-6
    value, stationarity = _autograd_stationarity(result, labels, lot=0.01)
    assert value == pytest.approx(result.loss, rel=1e-12) and stationarity < 1e-6
    first, last = result.metrics[0], result.metrics[-1]
    assert last.nc1 < 0.5 * first.nc1                      # more concentrated than the input...
    assert last.nc1 > 1e-3                                 # ...but not collapsed
    assert last.nc2_etf > 1e-2 and last.nc2_etf > 100 * ufm.metrics[-1].nc2_etf
    # the classifier still separates the training data (a finite-lot optimum keeps CE small)
    assert last.nc4 == 0.0 and bool(((result.layers[-1] @ result.W.T + result.b).argmax(1) == labels).all())


def test_matched_optimum_lies_on_the_straight_path():
    x, labels = _balanced(60, 8, 3, seed=3)
    joint = mufm.solve(x, labels, num_layers=4, lot=0.02, eliminate_path=False)   # all layers free
    assert joint.converged and joint.grad_norm < 1e-6
    h_last = joint.layers[-1]
    deviation = max(float((h - (x + (l / 4) * (h_last - x))).norm()) for l, h in enumerate(joint.layers))
    assert deviation / float((h_last - x).norm()) < 1e-3
    reduced = mufm.solve(x, labels, num_layers=4, lot=0.02)                        # the path eliminated
    for a, b in zip(joint.layers + [joint.W, joint.b], reduced.layers + [reduced.W, reduced.b]):
        assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-8
    nc1 = [m.nc1 for m in joint.metrics]
    etf = [m.nc2_etf for m in joint.metrics]
    assert all(b < a for a, b in zip(nc1, nc1[1:])), nc1
    assert all(b < a for a, b in zip(etf, etf[1:])), etf


def test_sinkhorn_cost_gradients_flow():
    x, labels = _balanced(30, 4, 3, seed=4)
    start = mufm.solve(x, labels, num_layers=2, lot=0.1, cost="sinkhorn", steps=0)
    result = mufm.solve(x, labels, num_layers=2, lot=0.1, cost="sinkhorn", steps=40)
    assert result.sinkhorn_eps == pytest.approx(0.2 * pfc_fast.median_cost(x, x))
    history = np.array(result.history)
    assert len(history) == 41 and np.isfinite(history).all()
    assert (np.diff(history) <= 1e-12 * abs(history[0])).all() and history[-1] < 0.5 * history[0]
    assert all(bool(torch.isfinite(h).all()) for h in result.layers)
    assert float((result.layers[1] - x).norm()) > 1e-3 * float(x.norm())  # the middle layer moved
    assert result.grad_norm < 0.1 * start.grad_norm
    assert result.metrics[-1].nc1 < result.metrics[0].nc1


def test_sinkhorn_coupling_gradient_matches_finite_differences():
    """The gradient the solver descends is that of the value it reports (envelope theorem)."""
    x, labels = _balanced(20, 3, 2, seed=5)
    gen = torch.Generator().manual_seed(6)
    start = mufm.solve(x, labels, num_layers=2, lot=0.1, cost="sinkhorn", steps=3)
    layers, weight, bias = start.layers[1:], start.W, start.b
    directions = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in layers + [weight, bias]]

    def loss(step):
        moved = [t + step * d for t, d in zip(layers + [weight, bias], directions)]
        init = mufm.MUFMResult(layers=[x] + moved[:-2], W=moved[-2], b=moved[-1], history=[], loss=0.0,
                               grad_norm=0.0, converged=False, n_iter=0, stop="", lot=0.1, cost="sinkhorn",
                               sinkhorn_eps=None, metrics=[])
        return mufm.solve(x, labels, num_layers=2, lot=0.1, cost="sinkhorn", steps=0, init=init).loss

    # directional derivative by autograd through pfc_fast.sinkhorn_divergence's envelope backward
    free = [t.clone().requires_grad_() for t in layers + [weight, bias]]
    path = torch.stack([x] + free[:-2])
    value, _ = _objective([x] + free[:-2], free[-2], free[-1], labels, lot=0.0)
    value = value + 0.1 * pfc_fast.sinkhorn_divergence(path[:-1], path[1:], eps=start.sinkhorn_eps, tol=1e-12,
                                                       max_iter=10000).sum()
    assert float(value.detach()) == pytest.approx(start.loss, rel=1e-10)
    slope = sum(float((g * d).sum()) for g, d in zip(torch.autograd.grad(value, free), directions))
    h = 1e-4
    assert (loss(h) - loss(-h)) / (2 * h) == pytest.approx(slope, rel=1e-6)


def test_sweep_nc_grows_with_the_coupling():
    x, labels = _balanced(60, 8, 3, seed=7)
    lots = [0.0, 0.003, 0.03, 0.3]
    results = mufm.sweep(x.float().numpy(), labels.numpy(), 2, lots)
    assert [r.lot for r in results] == lots and all(r.converged for r in results)
    nc1 = [r.metrics[-1].nc1 for r in results]
    etf = [r.metrics[-1].nc2_etf for r in results]
    assert all(b > a for a, b in zip(nc1, nc1[1:])), nc1
    assert all(b > a for a, b in zip(etf, etf[1:])), etf
    assert etf[0] < 1e-6 < 1e-2 < etf[-1]
    cold = mufm.solve(x.float().numpy(), labels.numpy(), 2, 0.03)
    assert float((cold.layers[-1] - results[2].layers[-1]).norm()) < 1e-5 * float(cold.layers[-1].norm())


X_BAD, LABELS_BAD = _balanced(20, 4, 2, seed=8)


def _nan_x():
    bad = X_BAD.clone()
    bad[3, 1] = float("nan")
    return bad


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"X": _nan_x()}, ValueError, "X contains NaN"),
        ({"X": X_BAD[0]}, ValueError, r"X must have shape \(N, D\)"),
        ({"X": X_BAD.long()}, TypeError, "X must have a floating dtype"),
        ({"X": X_BAD.tolist()}, TypeError, "X must be a torch.Tensor or a numpy.ndarray"),
        ({"labels": LABELS_BAD[:-1]}, ValueError, r"labels must have shape \(20,\)"),
        ({"labels": LABELS_BAD + 1, "num_classes": 2}, ValueError, r"labels must lie in \[0, 2\)"),
        ({"labels": LABELS_BAD.double()}, TypeError, "labels must have an integer dtype"),
        ({"labels": torch.zeros(20, dtype=torch.long), "num_classes": 2}, ValueError, "at least 2 classes"),
        ({"num_layers": 0}, ValueError, "num_layers must be >= 1"),
        ({"num_layers": 2.0}, TypeError, "num_layers must be an integer"),
        ({"lot": -0.1}, ValueError, "lot must be a finite number >= 0"),
        ({"lot": float("nan")}, ValueError, "lot must be a finite number"),
        ({"lot": "1"}, TypeError, "lot must be a real number"),
        ({"cost": "l2"}, ValueError, "cost must be one of"),
        ({"lw": 0.0}, ValueError, "lw must be a finite number > 0"),
        ({"lh": -1e-3}, ValueError, "lh must be a finite number > 0"),
        ({"lb": -1.0}, ValueError, "lb must be a finite number >= 0"),
        ({"steps": -1}, ValueError, "steps must be >= 0"),
        ({"lr": 0}, ValueError, "lr must be a finite number > 0"),
        ({"tol": 0}, ValueError, "tol must be a finite number > 0"),
        ({"history_size": 0}, ValueError, "history_size must be >= 1"),
        ({"eliminate_path": 1}, TypeError, "eliminate_path must be a bool"),
        ({"cost": "sinkhorn", "sinkhorn_eps": 0}, ValueError, "sinkhorn_eps must be a finite number > 0"),
        ({"init": "warm"}, TypeError, "init must be an MUFMResult"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"X": X_BAD, "labels": LABELS_BAD, "num_layers": 2, "lot": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        mufm.solve(**args)


def test_bad_init_and_sweep_arguments():
    small = mufm.solve(X_BAD[:10], LABELS_BAD[:10], 2, 0.1, steps=2)
    with pytest.raises(ValueError, match="init must solve a problem of the same shape"):
        mufm.solve(X_BAD, LABELS_BAD, 2, 0.1, init=small)
    with pytest.raises(ValueError, match=r"lots\[1\] must be a finite number >= 0"):
        mufm.sweep(X_BAD, LABELS_BAD, 2, [0.1, -1.0])
    with pytest.raises(ValueError, match="lots is empty"):
        mufm.sweep(X_BAD, LABELS_BAD, 2, [])
    with pytest.raises(TypeError, match="init is not accepted"):
        mufm.sweep(X_BAD, LABELS_BAD, 2, [0.1], init=small)
