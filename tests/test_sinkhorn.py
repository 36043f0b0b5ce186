"""pfc_fast.sinkhorn against POT (float64, run to convergence), emd2, finite differences and POT's
autograd; batched equals unbatched; small eps; online memory; bad input; the op under opcheck."""
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import pfc_fast
from pfc_fast import _ops, reference, transport
from conftest import seed_for

ot = pytest.importorskip("ot", reason="POT is not installed (the GPU machine needs benchmarks/wheels)")


def _clouds(n, m, d, seed, dtype=torch.float64, shift=1.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(m, d, generator=gen, dtype=torch.float64) * 0.8 + shift
    a = torch.rand(n, generator=gen, dtype=torch.float64) + 0.2
    b = torch.rand(m, generator=gen, dtype=torch.float64) + 0.2
    return [t.to(device, dtype) for t in (x, y, a / a.sum(), b / b.sum())]


def _pot(a, b, cost, eps):
    a, b, cost = (t.double().cpu().numpy() for t in (a, b, cost))
    a, b = a / a.sum(), b / b.sum()  # float32 weights: equal masses again in float64
    plan = ot.bregman.sinkhorn_log(a, b, cost, eps, numItermax=100_000, stopThr=1e-13)
    return torch.from_numpy(plan), float((plan * cost).sum())


def _rel(ours, ref):
    return float((ours.double().cpu() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("mode", ["online", "dense"])
@pytest.mark.parametrize("dtype,rtol,tol", [(torch.float64, 1e-8, 1e-13), (torch.float32, 1e-4, 1e-6)], ids=["fp64", "fp32"])
def test_matches_pot(device, mode, dtype, rtol, tol):
    x, y, a, b = _clouds(120, 90, 7, seed=1, dtype=dtype, device=device)
    eps = 0.05 * pfc_fast.median_cost(x, y)
    result = pfc_fast.sinkhorn(x, y, a, b, eps=eps, tol=tol, max_iter=100_000, mode=mode)
    plan, cost = _pot(a, b, ot.dist(x.double().cpu(), y.double().cpu()), eps)
    assert result.marginal_error < tol
    assert _rel(result.plan(), plan) < rtol
    assert result.cost.item() == pytest.approx(cost, rel=rtol)
    # value = <a, f> + <b, g> is the entropic OT value <P, C> + eps KL(P | a b^T)
    p = plan.clamp_min(1e-300)
    kl = float((p * (p / (a.double().cpu()[:, None] * b.double().cpu()[None, :])).log() - p).sum() + 1)
    assert result.value.item() == pytest.approx(cost + eps * kl, rel=max(rtol, 1e-9))


@pytest.mark.parametrize("dtype,rtol,tol", [(torch.float64, 1e-8, 1e-13), (torch.float32, 1e-4, 1e-6)], ids=["fp64", "fp32"])
def test_given_cost_matrix(device, dtype, rtol, tol):
    gen = torch.Generator().manual_seed(2)
    cost = (torch.rand(60, 80, generator=gen, dtype=torch.float64) * 3).to(device, dtype)
    _, _, a, b = _clouds(60, 80, 1, seed=3, dtype=dtype, device=device)
    result = pfc_fast.sinkhorn(cost=cost, a=a, b=b, eps=0.1, tol=tol, max_iter=100_000)
    plan, total = _pot(a, b, cost, 0.1)
    assert _rel(result.plan(), plan) < rtol
    assert result.cost.item() == pytest.approx(total, rel=rtol)
    with pytest.raises(ValueError, match="mode='online'"):
        pfc_fast.sinkhorn(cost=cost, eps=0.1, mode="online")


@pytest.mark.parametrize("mode", ["online", "dense"])
def test_batched_equals_unbatched(device, mode):
    clouds = [_clouds(50, 70, 4, seed=10 + k, device=device) for k in range(3)]
    x, y, a, b = (torch.stack(parts) for parts in zip(*clouds))
    batched = pfc_fast.sinkhorn(x, y, a, b, eps=0.3, tol=0, max_iter=150, mode=mode)
    assert batched.f.shape == (3, 50) and batched.cost.shape == (3,)
    for k, (xk, yk, ak, bk) in enumerate(clouds):
        single = pfc_fast.sinkhorn(xk, yk, ak, bk, eps=0.3, tol=0, max_iter=150, mode=mode)
        torch.testing.assert_close(batched.f[k], single.f, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched.g[k], single.g, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched.plan()[k], single.plan(), rtol=1e-12, atol=1e-15)
        assert batched.cost[k].item() == pytest.approx(single.cost.item(), rel=1e-12)


def test_fixed_iterations_and_reference():
    x, y, a, b = _clouds(40, 30, 3, seed=4)
    ours = pfc_fast.sinkhorn(x, y, a, b, eps=0.2, tol=0, max_iter=37)
    assert ours.n_iter == 37
    ref = reference.sinkhorn(x, y, a, b, eps=0.2, max_iter=37, tol=0)
    torch.testing.assert_close(ours.f, ref["f"], rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(ours.plan(), ref["plan"], rtol=1e-10, atol=1e-15)
    assert ours.marginal_error.item() == pytest.approx(ref["marginal_error"], rel=1e-8)


def test_eps_scaling_approaches_emd():
    x, y, a, b = _clouds(300, 300, 2, seed=5)
    cost = ot.dist(x, y)
    exact = ot.emd2(a.numpy(), b.numpy(), cost.numpy())
    eps = 1e-3 * float(cost.median())
    result = pfc_fast.sinkhorn(x, y, a, b, eps=eps, eps_scaling=0.5, tol=1e-9, max_iter=20_000)
    assert result.marginal_error < 1e-9
    assert result.cost.item() == pytest.approx(exact, rel=1e-2)


@pytest.mark.parametrize("mode", ["online", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_small_eps_far_apart(device, mode, dtype):
    x, y, a, b = _clouds(200, 150, 5, seed=6, dtype=dtype, shift=100.0, device=device)
    eps = 1e-3 * pfc_fast.median_cost(x, y)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    result = pfc_fast.sinkhorn(x, y, a, b, eps=eps, tol=tol, max_iter=50_000, eps_scaling=0.7, mode=mode)
    for value in (result.f, result.g, result.cost, result.value, result.plan()):
        assert bool(torch.isfinite(value).all())
    assert result.marginal_error < tol
    plan = result.plan().double()
    assert float((plan.sum(0) - b.double()).abs().sum()) < (1e-3 if dtype == torch.float32 else 1e-8)


def test_gradients_finite_differences():
    x, y, a, b = _clouds(25, 20, 3, seed=7)
    kwargs = dict(eps=0.3, tol=1e-14, max_iter=100_000)
    x.requires_grad_(True)
    y.requires_grad_(True)
    a.requires_grad_(True)
    value = pfc_fast.sinkhorn(x, y, a, b, **kwargs).value
    gx, gy, ga = torch.autograd.grad(value, (x, y, a))
    h = 1e-6

    def value_at(xv=x, yv=y, av=a):
        return pfc_fast.sinkhorn(xv.detach(), yv.detach(), av.detach(), b, **kwargs).value.item()

    for i, d in [(0, 0), (7, 2), (24, 1)]:
        step = torch.zeros_like(x)
        step[i, d] = h
        assert gx[i, d].item() == pytest.approx((value_at(xv=x + step) - value_at(xv=x - step)) / (2 * h), rel=1e-5)
    for j, d in [(0, 1), (19, 2)]:
        step = torch.zeros_like(y)
        step[j, d] = h
        assert gy[j, d].item() == pytest.approx((value_at(yv=y + step) - value_at(yv=y - step)) / (2 * h), rel=1e-5)
    direction = torch.zeros_like(a)
    direction[3], direction[11] = h, -h  # keeps the total mass equal to b's
    fd = (value_at(av=a + direction) - value_at(av=a - direction)) / (2 * h)
    assert (ga[3] - ga[11]).item() == pytest.approx(fd, rel=1e-5)


def test_gradients_match_pot_autograd():
    x, y, a, b = _clouds(30, 40, 4, seed=8)
    eps = 0.5
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    ours = pfc_fast.sinkhorn(xr, yr, a, b, eps=eps, tol=1e-14, max_iter=100_000).value
    gx, gy = torch.autograd.grad(ours, (xr, yr))
    # POT's torch backend, differentiated through its iterations: the entropic value
    # <P, C> + eps KL(P | a b^T) of its plan (at convergence the same gradient as the envelope's)
    xp, yp = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    cost = ot.dist(xp, yp)
    plan = ot.bregman.sinkhorn_log(a, b, cost, eps, numItermax=100_000, stopThr=1e-14)
    prior = a[:, None] * b[None, :]
    pot_value = (plan * cost).sum() + eps * (plan * (plan / prior).log() - plan + prior).sum()
    px, py = torch.autograd.grad(pot_value, (xp, yp))
    torch.testing.assert_close(gx, px, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gy, py, rtol=1e-6, atol=1e-9)


def test_divergence_and_w2(device):
    x, _, a, _ = _clouds(150, 150, 3, seed=9, device=device)
    shift = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64, device=device)
    kwargs = dict(eps=0.5, tol=1e-11, max_iter=100_000)
    assert abs(pfc_fast.sinkhorn_divergence(x, x, a, a, **kwargs).item()) < 1e-9
    # a translation: the debiased divergence is exactly |t|^2, whatever eps
    assert pfc_fast.wasserstein2(x, x + shift, a, a, **kwargs).item() == pytest.approx(float(shift.norm()), rel=1e-6)
    xr = x.clone().requires_grad_(True)
    divergence = pfc_fast.sinkhorn_divergence(xr, x + shift, a, a, **kwargs)
    (grad,) = torch.autograd.grad(divergence, xr)
    assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(grad, (-2 * a[:, None] * shift).expand_as(grad), rtol=1e-5, atol=1e-7)


def test_online_mode_memory(tmp_path):
    """N = M = 40,000 in online mode: an N x M float32 matrix would take 6.4 GB."""
    script = textwrap.dedent("""
        import resource, torch, pfc_fast
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(40_000, 8, generator=gen), torch.randn(40_000, 8, generator=gen) + 1
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = pfc_fast.sinkhorn(x, y, eps=1.0, tol=0, max_iter=1, mode="online")
        assert bool(torch.isfinite(result.f).all()) and bool(torch.isfinite(result.cost))
        print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before_kib, peak_kib = map(int, out.stdout.split())
    assert peak_kib - before_kib < 300 * 1024, f"online mode grew the peak RSS by {(peak_kib - before_kib) / 1024:.0f} MiB"


def test_plan_too_large(monkeypatch):
    x, y, _, _ = _clouds(30, 30, 2, seed=11)
    result = pfc_fast.sinkhorn(x, y, eps=0.5)
    monkeypatch.setattr(transport, "free_bytes", lambda device: 1000)
    with pytest.raises(MemoryError, match="the plan needs"):
        result.plan()


@pytest.mark.parametrize("dtype,rtol,tol", [(torch.float64, 1e-8, 1e-12), (torch.float32, 5e-4, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("eps_factor", [0.05, 0.01, 0.001])
def test_scaling_solver_matches_pot_at_every_eps(device, dtype, rtol, tol, eps_factor):
    """The stabilised-scaling solver (dense mode's default) against POT's converged log-domain plan at
    the benchmarks' eps (fractions of the median cost), from fresh clouds: converged, no NaN. In
    float32 at 0.001 the rounding of the cost over eps limits the marginal error to about 1e-5
    (the benchmarks' float32 tolerance, 1e-4, there)."""
    if dtype == torch.float32 and eps_factor < 0.01:
        rtol, tol = 10 * rtol, 10 * tol
    x, y, a, b = _clouds(150, 120, 8, seed=seed_for("scaling pot", eps_factor), dtype=dtype, device=device)
    eps = eps_factor * pfc_fast.median_cost(x, y)
    result = pfc_fast.sinkhorn(x, y, a, b, eps=eps, tol=tol, max_iter=200_000, mode="dense")
    assert result.method == "scaling"
    for value in (result.f, result.g, result.cost, result.value):
        assert bool(torch.isfinite(value).all())
    assert result.marginal_error < tol
    plan, cost = _pot(a, b, ot.dist(x.double().cpu(), y.double().cpu()), eps)
    assert result.cost.item() == pytest.approx(cost, rel=rtol)
    assert _rel(result.plan(), plan) < (rtol if eps_factor >= 0.01 else 50 * rtol)  # plan entries ~ exp(1/eps)


@pytest.mark.parametrize("iterations", [1, 2, 37, 400])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_scaling_solver_has_the_iterates_of_the_log_solver(device, iterations, batched):
    """The same iterations (f from g = 0, then g) in another arithmetic: equal potentials after any
    fixed number of them, at an eps where the scalings are absorbed along the way (small eps)."""
    clouds = [_clouds(70, 50, 3, seed=seed_for("iterates", iterations, k), device=device) for k in range(3)]
    x, y, a, b = (torch.stack(parts) for parts in zip(*clouds)) if batched else clouds[0]
    eps = 0.005 * pfc_fast.median_cost(clouds[0][0], clouds[0][1])
    log = pfc_fast.sinkhorn(x, y, a, b, eps=eps, tol=0, max_iter=iterations, method="log")
    scaling = pfc_fast.sinkhorn(x, y, a, b, eps=eps, tol=0, max_iter=iterations, method="scaling")
    assert (log.method, scaling.method, log.n_iter, scaling.n_iter) == ("log", "scaling", iterations, iterations)
    scale = float(log.f.abs().max())
    torch.testing.assert_close(scaling.f, log.f, rtol=0, atol=1e-11 * scale)
    torch.testing.assert_close(scaling.g, log.g, rtol=0, atol=1e-11 * scale)
    torch.testing.assert_close(scaling.marginal_error, log.marginal_error, rtol=1e-7, atol=1e-14)


def _count_calls(monkeypatch, name):
    calls = []
    original = getattr(_ops, name)
    monkeypatch.setattr(_ops, name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    return calls


def test_scaling_solver_counts_one_iteration_where_its_start_is_already_the_plan(device):
    """M = 1: the start (f the row minima of C, g = 0) is already the coupling, but no iterate; the
    scaling solver stops after one iteration, as the log solver checking every iteration does."""
    x, y, a, b = _clouds(30, 1, 3, seed=seed_for("one point"), device=device)
    b = torch.ones_like(b)
    log = pfc_fast.sinkhorn(x, y, a, b, eps=0.5, tol=1e-9, check_every=1, method="log")
    scaling = pfc_fast.sinkhorn(x, y, a, b, eps=0.5, tol=1e-9, method="scaling")
    assert (log.n_iter, scaling.n_iter) == (1, 1) and scaling.marginal_error < 1e-12
    scale = float(log.f.abs().max())
    torch.testing.assert_close(scaling.f, log.f, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(scaling.g, log.g, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_scaling_solver_reads_the_kernel_once_per_iteration(monkeypatch, dtype):
    """At eps = 0.05 median every iteration is one scaling step (and one more only measures the
    error): no log-domain iteration, no fallback, and K formed once, or twice where the first
    iterations' scalings leave float32's safe range (2^±30) once and are absorbed."""
    softmin = _count_calls(monkeypatch, "sinkhorn_softmin")
    steps = _count_calls(monkeypatch, "sinkhorn_scaling_step")
    kernels = _count_calls(monkeypatch, "sinkhorn_kernel")
    x, y, a, b = _clouds(120, 100, 4, seed=seed_for("once", str(dtype)), dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    result = pfc_fast.sinkhorn(x, y, a, b, eps=0.05 * pfc_fast.median_cost(x, y), tol=tol, max_iter=10_000)
    assert result.method == "scaling" and result.marginal_error < tol
    assert len(softmin) == 0 and len(kernels) <= (2 if dtype == torch.float32 else 1)
    assert len(steps) == result.n_iter + 1


@pytest.mark.parametrize("safe", [0.0, 2.0], ids=["every step absorbed", "absorbed past 4x"])
def test_scaling_solver_absorbs_its_scalings(monkeypatch, device, safe):
    """Scalings absorbed into the potentials (forced: a safe range of [2^-safe, 2^safe]) change the
    arithmetic, not the iterates."""
    monkeypatch.setitem(transport.SAFE_LOG2, torch.float64, safe)
    x, y, a, b = _clouds(60, 45, 3, seed=seed_for("absorb", safe), device=device)
    eps = 0.01 * pfc_fast.median_cost(x, y)
    log = pfc_fast.sinkhorn(x, y, a, b, eps=eps, tol=0, max_iter=60, method="log")
    scaling = pfc_fast.sinkhorn(x, y, a, b, eps=eps, tol=0, max_iter=60, method="scaling")
    scale = float(log.f.abs().max())
    torch.testing.assert_close(scaling.f, log.f, rtol=0, atol=1e-11 * scale)
    torch.testing.assert_close(scaling.g, log.g, rtol=0, atol=1e-11 * scale)


def test_scaling_solver_falls_back_to_the_log_domain_where_a_scaling_fails(monkeypatch, device):
    """Scaling steps that report a failed scaling (status inf: a 0, inf or NaN), here the 3rd, 4th and
    10th, make the solver absorb the last good scalings and run log-domain iterations (1, then 2 at
    the next consecutive failure, then 1 again after a good step) before forming K again: more
    log-domain half-steps, and the iterates of the log solver."""
    original = _ops.sinkhorn_scaling_step
    calls = []

    def failing(*args):
        u, v, status = original(*args)
        calls.append(1)
        if len(calls) in (3, 4, 10):
            status = status.clone()
            status[:, 1] = math.inf
        return u, v, status

    monkeypatch.setattr(_ops, "sinkhorn_scaling_step", failing)
    softmin = _count_calls(monkeypatch, "sinkhorn_softmin")
    x, y, a, b = _clouds(50, 40, 3, seed=seed_for("fails"), device=device)
    eps = 0.02 * pfc_fast.median_cost(x, y)
    scaling = pfc_fast.sinkhorn(x, y, a, b, eps=eps, tol=0, max_iter=30, method="scaling")
    assert scaling.method == "scaling" and scaling.n_iter == 30
    assert len(softmin) == 2 * (1 + 2 + 1)  # the fallbacks
    log = pfc_fast.sinkhorn(x, y, a, b, eps=eps, tol=0, max_iter=30, method="log")
    scale = float(log.f.abs().max())
    torch.testing.assert_close(scaling.f, log.f, rtol=0, atol=1e-11 * scale)
    torch.testing.assert_close(scaling.g, log.g, rtol=0, atol=1e-11 * scale)


@pytest.mark.parametrize("eps", [1e-18, 1e-20])
def test_eps_below_the_scalings_resolution_runs_the_log_domain(device, eps):
    """At eps this small against the cost, eps log u is under the rounding of the potentials, so the
    scalings cannot be absorbed: "scaling" and "auto" run the log domain, whose potentials are finite
    and whose marginal error is that of its own plan (inf where the plan overflows: no coupling)."""
    gen = torch.Generator().manual_seed(seed_for("tiny eps", eps))
    cost = (torch.rand(1, 40, 30, generator=gen, dtype=torch.float64) * 100).to(device)
    for method in ("scaling", "auto"):
        result = pfc_fast.sinkhorn(cost=cost, eps=eps, tol=0, max_iter=200, method=method)
        assert result.method == "log" and result.n_iter == 200
        assert bool(torch.isfinite(result.f).all()) and bool(torch.isfinite(result.g).all())
        own = float((result.plan().sum(-1) - 1 / 40).abs().sum())
        assert result.marginal_error.item() == (pytest.approx(own, rel=1e-9, abs=1e-12) if math.isfinite(own) else own)


def test_method_choice():
    x, y = torch.randn(30, 3), torch.randn(20, 3)
    assert pfc_fast.sinkhorn(x, y, eps=0.5).method == "scaling"  # auto, dense
    assert pfc_fast.sinkhorn(x, y, eps=0.5, mode="online").method == "log"
    assert pfc_fast.sinkhorn(x, y, eps=0.5, method="log").method == "log"
    with pytest.raises(ValueError, match="method='scaling'.*mode='dense'"):
        pfc_fast.sinkhorn(x, y, eps=0.5, mode="online", method="scaling")
    with pytest.raises(ValueError, match="method must be one of"):
        pfc_fast.sinkhorn(x, y, eps=0.5, method="fast")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"eps": 0.0}, ValueError, "eps must be a finite number > 0"),
        ({"eps": -1.0}, ValueError, "eps must be a finite number > 0"),
        ({"eps": float("nan")}, ValueError, "eps must be a finite number > 0"),
        ({"eps": "0.1"}, TypeError, "eps must be a real number"),
        ({"a": -torch.ones(10) / 10}, ValueError, "a must be non-negative"),
        ({"b": torch.full((12,), float("nan"))}, ValueError, "b must be non-negative and finite"),
        ({"a": torch.ones(10)}, ValueError, "same total mass"),
        ({"a": torch.ones(9) / 9}, ValueError, r"a must have shape \(10,\)"),
        ({"y": torch.randn(12, 4)}, ValueError, "same B and D"),
        ({"x": torch.randn(10, 3).long()}, TypeError, "x must have a floating dtype"),
        ({"x": torch.full((10, 3), float("inf"))}, ValueError, "x contains NaN or Inf"),
        ({"x": None}, ValueError, "give x and y"),
        ({"mode": "fast"}, ValueError, "mode must be one of"),
        ({"max_iter": 0}, ValueError, "max_iter must be >= 1"),
        ({"max_iter": 10.0}, TypeError, "max_iter must be an integer"),
        ({"check_every": True}, TypeError, "check_every must be an integer"),
        ({"tol": -1.0}, ValueError, "tol must be a finite number >= 0"),
        ({"eps_scaling": 1.5}, ValueError, "eps_scaling must be None"),
        ({"x": torch.randn(10, 3).to("meta")}, ValueError, "y is on cpu but x is on meta"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"x": torch.randn(10, 3), "y": torch.randn(12, 3), "eps": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        pfc_fast.sinkhorn(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_softmin_op(device, dtype):
    """The op in every form (online, dense, transposed; with good, bad or no shift) against
    logsumexp, and under opcheck."""
    x, y, _, b = _clouds(33, 70, 5, seed=12, dtype=dtype, device=device)
    h = torch.randn(2, 70, dtype=dtype, device=device)
    log_w = b.log().expand(2, 70).contiguous()
    xs, ys = torch.stack([x, x + 1]), torch.stack([y, y - 1])
    cost = ((xs[:, :, None] - ys[:, None]) ** 2).sum(-1)
    eps = 0.3
    expected = -eps * torch.logsumexp(log_w[:, None] + (h[:, None] - cost) / eps, dim=-1)
    tight = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-10)
    ops = _ops.ops_for(h)  # pfc_fast, or pfc_fast_simt in the simt case
    op = ops.sinkhorn_softmin
    shifts = {"none": None, "good": expected + 0.01, "far below": expected - 80.0 * eps,
              "far above": expected + 80.0 * eps}
    for name, shift in shifts.items():
        online = op(xs, ys, None, h, log_w, eps, shift)
        dense = op(None, None, cost, h, log_w, eps, shift)
        columns = op(None, None, cost.transpose(1, 2).contiguous(), h, log_w, eps, shift, transpose=True)
        for result in (online, dense, columns):
            torch.testing.assert_close(result, expected, **tight, msg=f"shift {name}")
    shift = expected + 0.01
    torch.library.opcheck(op.default, (xs, ys, None, h, log_w, eps))
    torch.library.opcheck(op.default, (xs, ys, None, h, log_w, eps, shift))
    torch.library.opcheck(op.default, (None, None, cost, h, log_w, eps, shift))
    torch.library.opcheck(op.default, (None, None, cost.transpose(1, 2).contiguous(), h, log_w, eps, shift, True))
    f = torch.randn(2, 33, dtype=dtype, device=device)
    log_a = torch.full((2, 33), -3.5, dtype=dtype, device=device)
    torch.library.opcheck(ops.sinkhorn_plan_sums.default, (xs, ys, None, f, h, log_a, log_w, eps))
    mass, row_cost = ops.sinkhorn_plan_sums(None, None, cost, f, h, log_a, log_w, eps)
    plan = torch.exp(log_a[:, :, None] + log_w[:, None] + (f[:, :, None] + h[:, None] - cost) / eps)
    torch.testing.assert_close(mass, plan.sum(-1), **tight)
    torch.testing.assert_close(row_cost, (plan * cost).sum(-1), **tight)


def test_an_unconverged_result_warns_with_its_marginal_error():
    """max_iter reached with marginal_error >= tol: a ConvergenceWarning that gives the error (the
    result was silently off before); none when tol = 0 asks for exactly max_iter, or on convergence."""
    import warnings

    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(40, 3, generator=gen), torch.randn(50, 3, generator=gen) + 1.0
    with pytest.warns(pfc_fast.ConvergenceWarning, match=r"max_iter = 5 unconverged: marginal_error [0-9.e+-]+ > tol"):
        result = pfc_fast.sinkhorn(x, y, eps=0.01, max_iter=5)
    assert float(result.marginal_error) > 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", pfc_fast.ConvergenceWarning)
        pfc_fast.sinkhorn(x, y, eps=0.01, max_iter=5, tol=0.0)
        assert float(pfc_fast.sinkhorn(x, y, eps=1.0, max_iter=5000).marginal_error) < 1e-6


def _grid_problem():
    """Points on an integer grid, N + M = 8 (centring and squared distances are exact), some of
    x and y coinciding (zero costs), weights of a few bits: the plan at a tiny eps is exactly
    defined by f and g."""
    x = torch.tensor([[0., 0.], [1., 0.], [2., 1.]], dtype=torch.float64)
    y = torch.tensor([[0., 0.], [1., 0.], [1., 0.], [3., 1.], [2., 2.]], dtype=torch.float64)
    a = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    b = torch.full((5,), 0.2, dtype=torch.float64)
    return x, y, a, b


@pytest.mark.parametrize("form", ["online", "dense", "cost", "batched", "cyclic cost"])
@pytest.mark.parametrize("eps", [1e-20, 1e-17, 1e-12])
def test_marginal_error_is_that_of_the_plan_at_tiny_eps(device, form, eps):
    """Issue 14: at eps below ~1e-17 of the cost scale the f updates change at rounding level only
    and marginal_error read 0 (converged: the cyclic cost) or another wrong number while the plan
    was no coupling. It is ||P 1 - a||_1 of the plan that f and g define,
    P = a b^T exp((f + g - C) / eps), computed here in float64."""
    x, y, a, b = _grid_problem()
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    kwargs = dict(eps=eps, max_iter=30, tol=0)
    if form == "cyclic cost":  # no zero cost: every plan entry underflows
        cost = torch.tensor([[1.0, 1.0, 2.0], [2.0, 1.0, 1.0], [1.0, 2.0, 1.0]], dtype=torch.float64)
        a = b = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    if form in ("cost", "cyclic cost"):
        result = pfc_fast.sinkhorn(cost=cost.to(device), a=a.to(device), b=b.to(device), **kwargs)
    elif form == "batched":  # the second problem: x moved by a grid step
        xs, ys = torch.stack([x, x + 1.0]).to(device), torch.stack([y, y]).to(device)
        result = pfc_fast.sinkhorn(xs, ys, a.to(device), b.to(device), mode="online", **kwargs)
    else:
        result = pfc_fast.sinkhorn(x.to(device), y.to(device), a.to(device), b.to(device), mode=form, **kwargs)
    f, g, error = result.f.cpu(), result.g.cpu(), result.marginal_error.cpu()
    costs = torch.stack([cost, ((x[:, None] + 1.0 - y[None]) ** 2).sum(-1)]) if form == "batched" else cost
    plan = a[:, None] * b[None, :] * torch.exp((f[..., :, None] + g[..., None, :] - costs) / eps)
    expected = (plan.sum(-1) - a).abs().sum(-1)
    assert bool((expected > 1e-5).all())  # no coupling (to the default tol)
    torch.testing.assert_close(error, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(result.plan().cpu(), plan, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(result.cost.cpu(), (plan * costs).sum((-2, -1)), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("mode", ["online", "dense"])
def test_marginal_error_at_tiny_eps_float32(mode):
    """The float32 twin of the test above: marginal_error is that of result.plan(), not 0."""
    x, y, a, b = (t.float() for t in _grid_problem())
    with pytest.warns(pfc_fast.ConvergenceWarning):
        result = pfc_fast.sinkhorn(x, y, a, b, eps=1e-20, max_iter=30, mode=mode)
    from_plan = float((result.plan().double().sum(1) - a.double()).abs().sum())
    assert from_plan > 0.1
    assert float(result.marginal_error) == pytest.approx(from_plan, rel=1e-6)


@pytest.mark.parametrize("weights", ["float16", "bfloat16", "float16 batched", "float16 and None"])
def test_weights_in_half_precision(weights):
    """Issue 14: uniform float16 weights (totals 0.99976 for N = 120 after rounding) failed the
    equal-mass check; the check now allows the weights' dtype resolution, and b is rescaled to a's
    total. The result is POT's on the same (upcast) weights with b rescaled so."""
    x, y, _, _ = _clouds(120, 90, 3, seed=seed_for("half weights", weights))
    dtype = torch.bfloat16 if weights == "bfloat16" else torch.float16
    a = torch.full((120,), 1 / 120, dtype=dtype)
    b = None if weights == "float16 and None" else torch.full((90,), 1 / 90, dtype=dtype)
    if weights == "float16 batched":  # (B, N) weights, different per problem
        x, y = torch.stack([x, 0.5 * x]), torch.stack([y, y + 1.0])
        a = torch.stack([a, torch.linspace(1.0, 2.0, 120, dtype=torch.float64).div(180).to(dtype)])
    result = pfc_fast.sinkhorn(x, y, a, b, eps=0.5, tol=1e-13, max_iter=100_000)
    b64 = torch.full((90,), 1 / 90, dtype=torch.float64) if b is None else b.double()
    problems = list(zip(x, y, a.double(), result.plan())) if x.dim() == 3 else [(x, y, a.double(), result.plan())]
    for xk, yk, ak, ours in problems:
        plan = ot.bregman.sinkhorn_log(ak.numpy(), (b64 * ak.sum() / b64.sum()).numpy(), ot.dist(xk, yk).numpy(),
                                       0.5, numItermax=100_000, stopThr=1e-14)
        assert _rel(ours, torch.from_numpy(plan)) < 1e-8
    resolution = {torch.float16: "0.0039", torch.bfloat16: "0.031"}[dtype]
    with pytest.raises(ValueError, match=rf"same total mass \(to {resolution} relative"):
        pfc_fast.sinkhorn(x, y, torch.full((120,), 1.1 / 120, dtype=dtype), b, eps=0.5)


def test_costs_beyond_the_compute_dtype():
    """Issue 14: float32 points whose squared distances overflow float32 gave NaN; now a ValueError
    names x and y and suggests float64 or rescaling, and float64 computes the same problem (cost
    scaled by s^2 when the points are scaled by s and eps by s^2). Neighbours: points far from 0
    (their float32 mean overflowed: NaN), float64 overflow, a float32 cost near its
    largest number, an eps for which C / eps overflows (inf/NaN potentials), float64 weights that
    overflow float32 (they were called "not finite")."""
    x, y, a, b = _clouds(40, 30, 3, seed=seed_for("overflow"))
    scale = 1e20
    with pytest.raises(ValueError, match=r"x and y: .* too large for float32.*give float64 inputs, or rescale"):
        pfc_fast.sinkhorn((x * scale).float(), (y * scale).float(), a, b, eps=scale ** 2)
    unit = pfc_fast.sinkhorn(x, y, a, b, eps=0.5, tol=1e-12, max_iter=10_000)
    scaled = pfc_fast.sinkhorn(x * scale, y * scale, a, b, eps=0.5 * scale ** 2, tol=1e-12, max_iter=10_000)
    assert scaled.cost.item() == pytest.approx(unit.cost.item() * scale ** 2, rel=1e-9)
    with pytest.raises(ValueError, match=r"x and y: .* too large for float64.*rescale"):
        pfc_fast.sinkhorn(x * 1e160, y * 1e160, eps=1.0)
    # float32 points all at 1e37 (distinct ones there would be 1e30 apart: too far): C = 0, P = a b^T
    same = pfc_fast.sinkhorn(torch.full((40, 3), 1e37), torch.full((30, 3), 1e37), a.float(), b.float(), eps=0.5)
    assert same.cost.item() == 0 and same.value.item() == pytest.approx(0, abs=1e-6)
    torch.testing.assert_close(same.plan(), (a[:, None] * b[None, :]).float())
    cost = (ot.dist(x, y) / ot.dist(x, y).max() * 2e38).float()  # finite float32, potentials beyond
    with pytest.raises(ValueError, match=r"cost: its largest magnitude .* too large for float32"):
        pfc_fast.sinkhorn(cost=cost, eps=1.0)
    for dtype, eps in ((torch.float32, 1e-40), (torch.float32, 1e-36), (torch.float64, 1e-310), (torch.float32, 1e37)):
        with pytest.raises(ValueError, match=r"eps = .* is out of range for float"):
            pfc_fast.sinkhorn(x.to(dtype), y.to(dtype), eps=eps)
    with pytest.raises(ValueError, match="a does not fit float32"):
        pfc_fast.sinkhorn(x.float(), y.float(), a * 1e300, b * 1e300, eps=0.5)


@pytest.mark.parametrize("offset", [1e3, -1e3])
def test_eps_scaling_ignores_a_constant_added_to_the_cost(offset):
    """Issue 14: eps-scaling on a given cost started at max(C) (more stages for a cost with an
    offset; none at all when max(C) < 0), not at its range. OT does not change when a constant is
    added to C: the same plan after the same iterations as without the offset; at convergence, POT's."""
    gen = torch.Generator().manual_seed(seed_for("offset", offset))
    cost = torch.rand(60, 80, generator=gen, dtype=torch.float64) * 3
    _, _, a, b = _clouds(60, 80, 1, seed=seed_for("offset weights", offset))
    eps = 3e-3
    kwargs = dict(a=a, b=b, eps=eps, eps_scaling=0.5, tol=0, max_iter=40)
    plain = pfc_fast.sinkhorn(cost=cost, **kwargs)
    moved = pfc_fast.sinkhorn(cost=cost + offset, **kwargs)
    torch.testing.assert_close(moved.plan(), plain.plan(), rtol=1e-8, atol=1e-12)
    kwargs.update(tol=1e-9, max_iter=100_000)  # the offset's rounding (1e-13 / eps) limits the precision
    converged = pfc_fast.sinkhorn(cost=cost + offset, **kwargs)
    plan, _ = _pot(a, b, cost, eps)
    assert _rel(converged.plan(), plan) < 1e-6


def test_empty_batch_is_refused():
    """Issue 14: B = 0 problems gave an obscure RuntimeError (max() of an empty tensor); now a
    ValueError names x and y (and a given cost says it is empty)."""
    with pytest.raises(ValueError, match=r"x \(0, 5, 3\) and y \(0, 6, 3\) hold B = 0 problems"):
        pfc_fast.sinkhorn(torch.randn(0, 5, 3), torch.randn(0, 6, 3))
    with pytest.raises(ValueError, match="B = 0"):
        pfc_fast.wasserstein2(torch.randn(0, 5, 3), torch.randn(0, 6, 3))
    with pytest.raises(ValueError, match=r"cost is empty \(shape \(0, 5, 6\)\)"):
        pfc_fast.sinkhorn(cost=torch.rand(0, 5, 6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_points(dtype):
    """float16 / bfloat16 points compute in float32, on the same (upcast) values: POT's plan to
    1e-4; envelope gradients come back in the points' dtype."""
    x, y, a, b = _clouds(50, 40, 3, seed=seed_for("half points", str(dtype)))
    xh, yh = x.to(dtype), y.to(dtype)
    result = pfc_fast.sinkhorn(xh, yh, a, b, eps=0.5, tol=1e-6, max_iter=10_000)
    plan, cost = _pot(a, b, ot.dist(xh.double(), yh.double()), 0.5)
    assert _rel(result.plan(), plan) < 1e-4
    assert result.cost.item() == pytest.approx(cost, rel=1e-4)
    xr = xh.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(pfc_fast.sinkhorn(xr, yh, a, b, eps=0.5).value, xr)
    assert grad.dtype == dtype and bool(torch.isfinite(grad).all())


def test_eps_scaling_as_a_numpy_number():
    """eps_scaling = np.float32(0.5) was refused as "not a float in (0, 1)"; it is that number."""
    import numpy as np

    x, y, a, b = _clouds(30, 20, 2, seed=seed_for("np eps_scaling"))
    expected = pfc_fast.sinkhorn(x, y, a, b, eps=0.1, eps_scaling=0.5)
    assert pfc_fast.sinkhorn(x, y, a, b, eps=0.1, eps_scaling=np.float32(0.5)).value.item() == expected.value.item()
    with pytest.raises(TypeError, match="eps_scaling must be a real number"):
        pfc_fast.sinkhorn(x, y, eps=0.01, eps_scaling=True)


def test_repr_is_one_short_line_with_the_numbers():
    import dataclasses
    import math

    x, y, a, b = _clouds(20, 30, 3, seed=seed_for("repr"))
    result = pfc_fast.sinkhorn(x, y, a, b, eps=0.5, tol=1e-9, max_iter=10_000)
    text = repr(result)
    assert text == (f"SinkhornResult(value={result.value.item():.4g}, n_iter={result.n_iter}, "
                    f"marginal_error={result.marginal_error.item():.4g}, eps=0.5, N=20, M=30)")
    batched = pfc_fast.sinkhorn(x.expand(5, 20, 3), y.expand(5, 30, 3), eps=0.5, tol=1e-9, max_iter=10_000)
    values = [f"{v:.4g}" for v in batched.value.tolist()]
    assert repr(batched).startswith(f"SinkhornResult(value=[{values[0]}, {values[1]}, ..., {values[4]}], ")
    assert repr(batched).endswith(", eps=0.5, B=5, N=20, M=30)")
    degenerate = dataclasses.replace(result, value=torch.tensor(math.inf), marginal_error=torch.tensor(math.inf))
    assert "value=inf" in repr(degenerate) and "marginal_error=inf" in repr(degenerate)
    for text in (text, repr(batched), repr(degenerate)):
        assert "\n" not in text and len(text) < 200 and "0x" not in text and "tensor(" not in text
