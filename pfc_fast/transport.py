"""Entropic optimal transport by log-domain Sinkhorn iterations (docs/spec.md section 4).

For point clouds ``x (N, D)``, ``y (M, D)`` with weights ``a``, ``b`` and cost
``C_ij = ||x_i - y_j||^2`` (or a given cost matrix), the problem
``min_P <P, C> + eps KL(P | a b^T)`` is solved on its dual potentials:

    f_i = -eps log sum_j b_j exp((g_j - C_ij) / eps)
    g_j = -eps log sum_i a_i exp((f_i - C_ij) / eps)

starting from ``g = 0`` (f first; POT's ``sinkhorn_log`` starts with g, so equal iteration
counts differ before convergence). The plan is ``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)``.
Each update is one call of the fused kernel ``pfc_fast::sinkhorn_softmin`` (cost and
log-sum-exp in one sweep; ``mode="online"`` never allocates ``N x M``), and the transport cost
``<P, C>`` one call of ``pfc_fast::sinkhorn_plan_sums``. The marginal error
``||P 1 - a||_1`` after a g update is ``sum_i a_i |exp((f_i - f'_i)/eps) - 1|`` with ``f'`` the
next f update, so checking it costs nothing extra; it is read on the host once every
``check_every`` iterations only.

Choosing eps: ``eps`` is absolute, in the units of the cost. A scale-free choice is a fraction of
the median cost, ``eps = 0.05 * median_cost(x, y)``: about 1 gives a blurred plan, 1e-2 to 1e-3 is
close to unregularised OT (use ``eps_scaling``, e.g. 0.5, there: the iterations start at the
squared diameter of the data and shrink eps by that factor, one iteration per step, before
iterating to convergence at ``eps``; Schmitzer 2019, Feydy 2020).

Gradients: ``value`` is differentiable with respect to ``x``, ``y``, ``a``, ``b`` and a given
``cost`` by the envelope theorem (no back-propagation through the iterations):
``d value / d x_i = 2 sum_j P_ij (x_i - y_j)``, ``d value / d a = f``, ``d value / d C = P``.
"""
import math
from dataclasses import dataclass, field

import torch

from . import _inputs, _ops
from ._memory import free_bytes

MODES = ("auto", "online", "dense")
#: Dense mode ("auto") when the cost matrix takes at most this many bytes.
DENSE_BYTES = 1 << 30
#: Rows of the plan formed at a time when reducing it (cost, gradients, plan()).
CHUNK_BYTES = 64 << 20


@dataclass
class SinkhornResult:
    """Potentials and values of an entropic OT problem (batched: a leading dimension ``B``).

    ``f (N,)``, ``g (M,)``: dual potentials; ``cost = <P, C>``; ``value = <a, f> + <b, g>`` (the
    entropic OT value, differentiable); ``n_iter``: iterations run (one = an f and a g update);
    ``marginal_error = ||P 1 - a||_1`` after the last g update; ``eps``: the regularisation.
    """

    f: torch.Tensor
    g: torch.Tensor
    cost: torch.Tensor
    value: torch.Tensor
    n_iter: int
    marginal_error: torch.Tensor
    eps: float
    _problem: "_Problem" = field(repr=False, default=None)

    def plan(self):
        """The transport plan ``P`` ``(N, M)`` (or ``(B, N, M)``); raises MemoryError if it cannot fit."""
        p = self._problem
        needed = p.batch * p.rows * p.cols * p.dtype.itemsize
        available = free_bytes(p.device)
        if needed > available // 2:
            raise MemoryError(
                f"the plan needs {needed / 2**30:.1f} GiB ({p.batch} x {p.rows} x {p.cols} "
                f"{str(p.dtype).replace('torch.', '')}) but only {available / 2**30:.1f} GiB is free on {p.device}; "
                "use cost/value or reduce the plan in chunks instead")
        f, g = _batched(self.f, p), _batched(self.g, p)
        plan = torch.cat([chunk for _, chunk, _ in p.plan_chunks(f, g, self.eps)], dim=1)
        return plan if p.batched else plan[0]


def _batched(tensor, problem):
    return tensor if problem.batched else tensor.unsqueeze(0)


def _check_weights(w, name, batch, count, batched, device, dtype):
    if w is None:
        return torch.full((batch, count), 1.0 / count, dtype=dtype, device=device)
    w = _inputs.as_tensor(w, name)
    if not w.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {w.dtype}")
    if w.device != device:
        raise ValueError(f"{name} is on {w.device} but the points are on {device}")
    allowed = [(count,)] + ([(batch, count)] if batched else [])
    if tuple(w.shape) not in allowed:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, allowed))}, got {tuple(w.shape)}")
    w = w.to(dtype)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name} must be non-negative and finite")
    if not bool((w.sum(-1) > 0).all()):
        raise ValueError(f"{name} must have a positive total mass")
    return w.expand(batch, count)


class _Problem:
    """Validated inputs in the compute dtype, with a batch dimension, points centred."""

    def __init__(self, x, y, a, b, cost, mode):
        _inputs.check_choice(mode, "mode", MODES)
        if cost is not None:
            cost = _inputs.as_tensor(cost, "cost")
            if not cost.is_floating_point():
                raise TypeError(f"cost must have a floating dtype, got {cost.dtype}")
            if cost.dim() not in (2, 3):
                raise ValueError(f"cost must have shape (N, M) or (B, N, M), got {tuple(cost.shape)}")
            if mode == "online":
                raise ValueError("mode='online' computes squared Euclidean costs from x and y; a given cost needs "
                                 "mode='dense' or 'auto'")
            self.batched = cost.dim() == 3
            self.device = cost.device
            self.dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
            cost = cost.to(self.dtype)
            if not bool(torch.isfinite(cost).all()):
                raise ValueError("cost contains NaN or Inf values")
            self.x = self.y = None
            self.cost = cost if self.batched else cost.unsqueeze(0)
            self.batch, self.rows, self.cols = self.cost.shape
            self.dim = None
        else:
            if x is None or y is None:
                raise ValueError("give x and y (point clouds) or cost (a cost matrix)")
            x, y = _inputs.as_tensor(x, "x"), _inputs.as_tensor(y, "y")
            for t, name in ((x, "x"), (y, "y")):
                if not t.is_floating_point():
                    raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
                if t.dim() not in (2, 3):
                    raise ValueError(f"{name} must have shape (N, D) or (B, N, D), got {tuple(t.shape)}")
            if y.device != x.device:
                raise ValueError(f"y is on {y.device} but x is on {x.device}")
            if x.dim() != y.dim() or x.shape[-1] != y.shape[-1] or (x.dim() == 3 and x.shape[0] != y.shape[0]):
                raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must both be (N, D)/(M, D) or "
                                 "(B, N, D)/(B, M, D) with the same B and D")
            self.batched = x.dim() == 3
            self.device = x.device
            self.dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
            xb, yb = (x, y) if self.batched else (x.unsqueeze(0), y.unsqueeze(0))
            xb, yb = xb.to(self.dtype), yb.to(self.dtype)
            for points, name in ((xb, "x"), (yb, "y")):
                if not bool(torch.isfinite(points).all()):
                    raise ValueError(f"{name} contains NaN or Inf values")
            # C is translation invariant: centring shrinks |x|^2 + |y|^2 - 2 x.y's cancellation.
            centre = torch.cat([xb, yb], dim=1).mean(dim=1, keepdim=True)
            self.x, self.y = (xb - centre).contiguous(), (yb - centre).contiguous()
            self.batch, self.rows, self.dim = self.x.shape
            self.cols = self.y.shape[1]
            if self.rows == 0 or self.cols == 0:
                raise ValueError("x and y must contain at least one point each")
            dense_bytes = self.batch * self.rows * self.cols * self.dtype.itemsize
            self.cost = None
            if mode == "dense" or (mode == "auto" and dense_bytes <= DENSE_BYTES):
                self.cost = self._cost_rows(0, self.rows)
        self.a = _check_weights(a, "a", self.batch, self.rows, self.batched, self.device, self.dtype)
        self.b = _check_weights(b, "b", self.batch, self.cols, self.batched, self.device, self.dtype)
        mass_a, mass_b = self.a.sum(-1), self.b.sum(-1)
        if not bool(torch.allclose(mass_a, mass_b, rtol=1e-5, atol=0)):
            raise ValueError(f"a and b must have the same total mass, got {mass_a.tolist()} and {mass_b.tolist()}")
        self.log_a, self.log_b = self.a.log(), self.b.log()

    def _cost_rows(self, start, stop):
        """``C[:, start:stop]`` in the kernels' formula ``max(|x|^2 + |y|^2 - 2 x.y, 0)``."""
        if self.x is None:
            return self.cost[:, start:stop]
        xs = self.x[:, start:stop]
        sq = (xs * xs).sum(-1, keepdim=True) + (self.y * self.y).sum(-1).unsqueeze(1)
        return (sq - 2.0 * xs @ self.y.transpose(1, 2)).clamp_min(0.0)

    def update_f(self, g, eps, previous=None):
        """The f update from g; ``previous`` (the last f, if any) lets the kernel take one pass."""
        if self.cost is not None:
            return _ops.sinkhorn_softmin(None, None, self.cost, g, self.log_b, eps, previous)
        return _ops.sinkhorn_softmin(self.x, self.y, None, g, self.log_b, eps, previous)

    def update_g(self, f, eps, previous=None):
        """The g update from f (dense: the columns of the same cost matrix)."""
        if self.cost is not None:
            return _ops.sinkhorn_softmin(None, None, self.cost, f, self.log_a, eps, previous, transpose=True)
        return _ops.sinkhorn_softmin(self.y, self.x, None, f, self.log_a, eps, previous)

    def plan_sums(self, f, g, eps):
        """Row mass ``P 1`` and row cost ``(P * C) 1`` (B, N) from the fused kernel."""
        if self.cost is not None:
            return _ops.sinkhorn_plan_sums(None, None, self.cost, f, g, self.log_a, self.log_b, eps)
        return _ops.sinkhorn_plan_sums(self.x, self.y, None, f, g, self.log_a, self.log_b, eps)

    def marginal_error(self, f, f_next, eps):
        return (self.a * torch.expm1((f - f_next) / eps)).abs().sum(-1)

    def squared_diameter(self):
        """An upper bound of max C per problem (B,): the start of eps-scaling."""
        if self.x is None:
            return self.cost.amax(dim=(1, 2))
        points = torch.cat([self.x, self.y], dim=1)
        return ((points.amax(1) - points.amin(1)) ** 2).sum(-1)

    def plan_chunks(self, f, g, eps):
        """Yields ``(start, P[:, start:stop], C[:, start:stop])`` over row chunks of the plan."""
        step = max(1, CHUNK_BYTES // max(1, self.batch * self.cols * self.dtype.itemsize))
        for start in range(0, self.rows, step):
            stop = min(self.rows, start + step)
            cost = self._cost_rows(start, stop)
            log_plan = (self.log_a[:, start:stop, None] + self.log_b[:, None, :]
                        + (f[:, start:stop, None] + g[:, None, :] - cost) / eps)
            yield start, log_plan.exp(), cost


def _solve(problem, eps, max_iter, tol, check_every, eps_scaling):
    """Potentials (f, g), iterations and marginal error; no autograd."""
    g = torch.zeros(problem.batch, problem.cols, dtype=problem.dtype, device=problem.device)
    n_iter = 0
    if eps_scaling is not None:
        stage_eps = float(problem.squared_diameter().max())
        while stage_eps > eps and n_iter < max_iter - 1:
            g = problem.update_g(problem.update_f(g, stage_eps), stage_eps)
            n_iter += 1
            stage_eps *= eps_scaling
    f = problem.update_f(g, eps)
    g = None
    while True:
        g = problem.update_g(f, eps, g)
        n_iter += 1
        f_next = problem.update_f(g, eps, f)
        if n_iter % check_every == 0 or n_iter >= max_iter:
            error = problem.marginal_error(f, f_next, eps)
            if n_iter >= max_iter or (tol > 0 and float(error.max()) < tol):
                return f, g, n_iter, error
        f = f_next


class _EnvelopeGradient(torch.autograd.Function):
    """Passes ``value`` through; its gradients are the precomputed envelope-theorem ones."""

    @staticmethod
    def forward(ctx, value, x, y, cost, a, b, grad_x, grad_y, grad_cost, grad_a, grad_b):
        ctx.grads = (grad_x, grad_y, grad_cost, grad_a, grad_b)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value):
        out = []
        for grad in ctx.grads:
            if grad is None:
                out.append(None)
            else:
                scale = grad_value.reshape(grad_value.shape + (1,) * (grad.dim() - grad_value.dim()))
                out.append(scale * grad)
        return (None, *out, None, None, None, None, None)


def _reduce_plan(problem, f, g, eps, need):
    """The cost ``<P, C>`` (B,) from the fused kernel, and the envelope gradients in ``need``.

    ``d value / d x_i = 2 (m_i x_i - sum_j P_ij y_j)`` with ``m = P 1``, likewise for y with
    ``P^T``; ``d value / d C = P``. The gradients take one more sweep over the plan in row chunks.
    """
    mass, row_cost = problem.plan_sums(f, g, eps)
    grads = {}
    if not (need["x"] or need["y"] or need["cost"]):
        return row_cost.sum(-1), grads
    py = torch.zeros_like(problem.x) if need["x"] else None
    ptx = torch.zeros_like(problem.y) if need["y"] else None
    col_mass = torch.zeros_like(problem.b)
    plan_rows = []
    for start, plan, _ in problem.plan_chunks(f, g, eps):
        stop = start + plan.shape[1]
        col_mass += plan.sum(1)
        if py is not None:
            py[:, start:stop] = plan @ problem.y
        if ptx is not None:
            ptx += plan.transpose(1, 2) @ problem.x[:, start:stop]
        if need["cost"]:
            plan_rows.append(plan)
    if need["x"]:
        grads["x"] = 2.0 * (mass.unsqueeze(-1) * problem.x - py)
    if need["y"]:
        grads["y"] = 2.0 * (col_mass.unsqueeze(-1) * problem.y - ptx)
    if need["cost"]:
        grads["cost"] = torch.cat(plan_rows, dim=1)
    return row_cost.sum(-1), grads


def sinkhorn(x=None, y=None, a=None, b=None, eps=0.05, cost=None, max_iter=1000, tol=1e-6, check_every=10,
             eps_scaling=None, mode="auto"):
    """Entropic optimal transport between ``x`` and ``y`` (see the module docstring).

    Args:
        x, y: points ``(N, D)``, ``(M, D)``, or batches ``(B, N, D)``, ``(B, M, D)`` solved in
            one call (e.g. all consecutive layer pairs). May be None when ``cost`` is given.
        a, b: weights ``(N,)``/``(M,)`` (or ``(B, N)``/``(B, M)``), non-negative, equal totals;
            uniform by default.
        eps: regularisation (> 0, absolute; see "Choosing eps").
        cost: a cost matrix ``(N, M)``/``(B, N, M)`` instead of ``||x_i - y_j||^2``.
        max_iter, tol, check_every: stop when ``marginal_error < tol`` (checked every
            ``check_every`` iterations) or after ``max_iter``; ``tol=0`` runs exactly ``max_iter``.
        eps_scaling: None, or a factor in (0, 1): anneal eps from the squared diameter.
        mode: ``"online"`` (cost recomputed tile by tile, nothing ``N x M`` in memory),
            ``"dense"`` (cost matrix kept), ``"auto"`` (dense when it takes at most 1 GiB).

    Returns:
        SinkhornResult. Computation in float64 if any input is float64, else float32.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    for value, name in ((max_iter, "max_iter"), (check_every, "check_every")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if eps_scaling is not None and not (isinstance(eps_scaling, float) and 0 < eps_scaling < 1):
        raise ValueError(f"eps_scaling must be None or a float in (0, 1), got {eps_scaling!r}")
    eps = float(eps)
    problem = _Problem(x, y, a, b, cost, mode)
    f, g, n_iter, error = _solve(problem, eps, max_iter, tol, check_every, eps_scaling)

    inputs = {"x": x, "y": y, "cost": cost, "a": a, "b": b}
    need = {name: isinstance(t, torch.Tensor) and t.requires_grad for name, t in inputs.items()}
    need["x"] = need["x"] and cost is None
    need["y"] = need["y"] and cost is None
    ot_cost, grads = _reduce_plan(problem, f, g, eps, need)
    grads["a"], grads["b"] = (f if need["a"] else None), (g if need["b"] else None)
    value = (problem.a * f).sum(-1) + (problem.b * g).sum(-1)
    unbatch = (lambda t: t) if problem.batched else (lambda t: t[0])
    if any(need.values()):
        shaped = {}
        for name, t in inputs.items():
            grad = grads.get(name)
            shaped[name] = None if grad is None else unbatch(grad).reshape(t.shape).to(t.dtype)
        value = _EnvelopeGradient.apply(unbatch(value), *(inputs[n] if need[n] else None for n in inputs),
                                        *(shaped[n] for n in inputs))
    else:
        value = unbatch(value)
    return SinkhornResult(f=unbatch(f), g=unbatch(g), cost=unbatch(ot_cost), value=value, n_iter=n_iter,
                          marginal_error=unbatch(error), eps=eps, _problem=problem)


def sinkhorn_divergence(x, y, a=None, b=None, eps=0.05, **kwargs):
    """Debiased Sinkhorn divergence ``S = OT(a, b) - OT(a, a)/2 - OT(b, b)/2`` (Feydy et al. 2019).

    ``OT`` is the entropic value of :func:`sinkhorn` (same keyword arguments); ``S >= 0``, and 0
    when the two measures are equal. Differentiable like ``value``.
    """
    cross = sinkhorn(x, y, a, b, eps, **kwargs).value
    self_x = sinkhorn(x, x, a, a, eps, **kwargs).value
    self_y = sinkhorn(y, y, b, b, eps, **kwargs).value
    return cross - 0.5 * (self_x + self_y)


def wasserstein2(x, y, a=None, b=None, eps=0.05, **kwargs):
    """W2 estimate ``sqrt(max(S, 0))`` from the Sinkhorn divergence ``S``."""
    return sinkhorn_divergence(x, y, a, b, eps, **kwargs).clamp_min(0.0).sqrt()


def median_cost(x, y, max_points=2000):
    """Median of ``||x_i - y_j||^2`` over (a subsample of at most ``max_points`` of) each cloud.

    A scale for ``eps``: ``eps = 0.05 * median_cost(x, y)``.
    """
    x, y = _inputs.as_tensor(x, "x"), _inputs.as_tensor(y, "y")
    gen = torch.Generator().manual_seed(0)
    pick = lambda t: t if t.shape[-2] <= max_points else t[..., torch.randperm(t.shape[-2], generator=gen)[:max_points], :]
    xs, ys = pick(x).double(), pick(y).double()
    return float(torch.cdist(xs, ys, compute_mode="donot_use_mm_for_euclid_dist").pow(2).median())
