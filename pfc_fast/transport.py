"""Entropic optimal transport by log-domain Sinkhorn iterations (docs/spec.md section 4).

For point clouds ``x (N, D)``, ``y (M, D)`` with weights ``a``, ``b`` and cost
``C_ij = ||x_i - y_j||^2`` (or a given cost matrix), the problem
``min_P <P, C> + eps KL(P | a b^T)`` is solved on its dual potentials:

    f_i = -eps log sum_j b_j exp((g_j - C_ij) / eps)
    g_j = -eps log sum_i a_i exp((f_i - C_ij) / eps)

starting from ``g = 0`` (f first; POT's ``sinkhorn_log`` starts with g, so equal iteration
counts differ before convergence). The plan is ``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)``.
Each update is one call of the fused kernel ``pfc_fast::sinkhorn_softmin`` (cost and
log-sum-exp in one sweep; ``mode="online"`` never allocates ``N x M``). The marginal error
``||P 1 - a||_1`` after a g update, every ``check_every`` iterations (one more sweep per check, read
on the host then only), and the transport cost ``<P, C>`` of the result come from the row sums of
the plan itself, one call of ``pfc_fast::sinkhorn_plan_sums``, which forms the exponent as
``(f_i + g_j - C_ij) / eps`` like :meth:`SinkhornResult.plan`: right at every eps, also where eps
is so small that the f updates change at rounding level only while the plan is no coupling.

Two solvers of the same iterations (``method``). ``"log"``: each half-step is one call of
``pfc_fast::sinkhorn_softmin`` (one exp per entry). ``"scaling"`` (stabilised scaling, Schmitzer
2019; dense mode only): the kernel ``K_ij = exp((f_i + g_j - C_ij) / eps)`` of the current
potentials is kept beside the cost, the plan is ``P = diag(a u) K diag(b v)``, and an iteration is
``u_i = 1 / sum_j K_ij b_j v_j``, ``v_j = 1 / sum_i K_ij a_i u_i``: one call of
``pfc_fast::sinkhorn_scaling_step``, which reads K once for both (each row's ``u_i`` is final
after its dot product and the row then adds to the column sums) and returns the marginal error
``||P 1 - a||_1`` of the plan before the step, so every iteration is checked at no cost. Where a
scaling leaves ``[2^-SAFE_LOG2, 2^SAFE_LOG2]`` (``SAFE_LOG2``: 30 in float32, 100 in float64) the
scalings are absorbed, ``f += eps log u``, ``g += eps log v``, and K is formed again; where one
under- or overflowed (0, inf: small eps, early iterations), the last good scalings are absorbed and
log-domain iterations follow (1, then twice as many at each consecutive failure, at most
``MAX_LOG_STREAK``; halved by every scaling step that stays in range) before K is formed again.
Both solvers start from ``g = 0`` (the scaling one with ``f_i = min_j C_ij``, which puts a 1 in
every row of K, so that its first step is the first iteration, its u in range where that
entry's weight is not 0; after ``eps_scaling``'s stages, with one log-domain iteration) and end
with the potentials
``f + eps log u``, ``g + eps log v``; ``"auto"`` takes the scaling one in dense mode where K fits
in half the free memory, else the log one; both ``"auto"`` and ``"scaling"`` run the log one where eps
is below ``SCALING_MIN_EPS`` machine epsilons of the costs' magnitude (there ``eps log u`` vanishes
in the rounding of the potentials). Both give the same iterates up to rounding.

Choosing eps: ``eps`` is absolute, in the units of the cost. A scale-free choice is a fraction of
the median cost, ``eps = 0.05 * median_cost(x, y)``: about 1 gives a blurred plan, 1e-2 to 1e-3 is
close to unregularised OT (use ``eps_scaling``, e.g. 0.5, there: the iterations start at the range
of the cost, ``max C - min C`` (for points, the squared diagonal of their bounding box), and shrink
eps by that factor, one iteration per step, before iterating to convergence at ``eps``; Schmitzer
2019, Feydy 2020). Below about ``1e-16 max C`` (float64; ``1e-7`` in float32) the plan is set by
rounding and Sinkhorn cannot converge (``marginal_error`` says so); eps for which ``C / eps``
would overflow the compute dtype is refused.

Range: the costs must stay below a quarter of the compute dtype's largest number (for points: the
squared diagonal of their bounding box, up to 8.5e37 in float32; a ValueError names x and y, or
cost, otherwise): give float64 inputs or rescale (points scaled by ``s`` with eps
scaled by ``s^2`` give the same plan).

Gradients: ``value`` is differentiable with respect to ``x``, ``y``, ``a``, ``b`` and a given
``cost`` by the envelope theorem (no back-propagation through the iterations):
``d value / d x_i = 2 sum_j P_ij (x_i - y_j)``, ``d value / d a = f``, ``d value / d C = P``.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from . import _inputs, _ops
from ._inputs import TensorLike
from ._memory import free_bytes

MODES = ("auto", "online", "dense")
METHODS = ("auto", "log", "scaling")
#: The scaling solver absorbs its scalings into the potentials where one leaves [2^-s, 2^s].
SAFE_LOG2 = {torch.float32: 30.0, torch.float64: 100.0}
#: The most log-domain iterations the scaling solver runs after a scaling under- or overflowed.
MAX_LOG_STREAK = 64
#: The most iterations the scaling solver waits, after the plan's error failed ``tol``, to check it again.
MAX_VERIFY_WAIT = 1024
#: The scaling solver runs where eps >= SCALING_MIN_EPS * (machine epsilon) * (the costs' magnitude);
#: below, ``eps log u`` would vanish in the rounding of the potentials, and the log domain runs.
SCALING_MIN_EPS = 8
#: On the CPU the scaling solver takes a batch a few problems at a time, their kernels within this many bytes.
CACHE_BYTES = 4 << 20
#: Dense mode ("auto") when the cost matrix takes at most this many bytes.
DENSE_BYTES = 1 << 30
#: Rows of the plan formed at a time when reducing it (cost, gradients, plan()).
CHUNK_BYTES = 64 << 20


@dataclass
class SinkhornResult:
    """Potentials and values of an entropic OT problem (batched: a leading dimension ``B``).

    ``f (N,)``, ``g (M,)``: dual potentials; ``cost = <P, C>``; ``value = <a, f> + <b, g>`` (the
    entropic OT value, differentiable); ``n_iter``: iterations run (one = an f and a g update);
    ``marginal_error = ||P 1 - a||_1`` after the last g update; ``eps``: the regularisation;
    ``method``: the solver that ran.
    """

    f: torch.Tensor
    g: torch.Tensor
    cost: torch.Tensor
    value: torch.Tensor
    n_iter: int
    marginal_error: torch.Tensor
    eps: float
    method: str = "log"  #: the solver that ran, ``"log"`` or ``"scaling"`` (module docstring)
    _problem: Optional[_Problem] = field(repr=False, default=None)

    def __repr__(self) -> str:
        """One line: ``value`` and ``marginal_error`` (4 significant digits; batched: the first
        two and the last), ``n_iter``, ``eps`` and the sizes ``B`` (batched), ``N`` and ``M``."""
        sizes = f"N={self.f.shape[-1]}, M={self.g.shape[-1]}"
        if self.f.dim() == 2:
            sizes = f"B={self.f.shape[0]}, {sizes}"
        return (f"SinkhornResult(value={_summary(self.value)}, n_iter={self.n_iter}, "
                f"marginal_error={_summary(self.marginal_error)}, eps={self.eps:.4g}, {sizes})")

    def plan(self) -> torch.Tensor:
        """The transport plan ``P`` ``(N, M)`` (or ``(B, N, M)``); raises MemoryError if it cannot fit."""
        p = self._problem
        if p is None:
            raise ValueError("plan() needs the problem the result was solved from (a result of pfc_fast.sinkhorn)")
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


def _summary(tensor: torch.Tensor) -> str:
    """A scalar tensor as ``"0.1234"``, a batch of them as ``"[a, b, c]"`` or ``"[a, b, ..., z]"``."""
    flat = tensor.detach().flatten()
    if tensor.dim() == 0:
        return f"{float(flat[0]):.4g}"
    shown = [f"{v:.4g}" for v in (flat if flat.numel() <= 3 else flat[[0, 1, -1]]).tolist()]
    if flat.numel() > 3:
        shown.insert(2, "...")
    return f"[{', '.join(shown)}]"


def _batched(tensor: torch.Tensor, problem: _Problem) -> torch.Tensor:
    return tensor if problem.batched else tensor.unsqueeze(0)


class ConvergenceWarning(UserWarning):
    """:func:`sinkhorn` reached ``max_iter`` with ``marginal_error`` still at or above ``tol`` (the
    message gives both): the potentials, cost and value are those of an unconverged plan."""


class _Problem:
    """Validated inputs in the compute dtype, with a batch dimension, points centred."""

    x: Optional[torch.Tensor]
    y: Optional[torch.Tensor]
    cost: Optional[torch.Tensor]
    dim: Optional[int]

    def __init__(self, x: object, y: object, a: object, b: object, cost: object, mode: str) -> None:
        _inputs.check_choice(mode, "mode", MODES)
        if cost is not None and (x is not None or y is not None):
            raise ValueError("give x and y (point clouds) or cost (a cost matrix), not both: a given cost replaces "
                             "||x_i - y_j||^2, so x and y would be ignored")
        if cost is not None:
            given = _inputs.cost_matrix(cost)
            if mode == "online":
                raise ValueError("mode='online' computes squared Euclidean costs from x and y; a given cost needs "
                                 "mode='dense' or 'auto'")
            self.batched = given.dim() == 3
            self.device = given.device
            self.dtype = torch.float64 if given.dtype == torch.float64 else torch.float32
            given = _inputs.finite(given.to(self.dtype), "cost")
            self.x = self.y = None
            self.cost = given if self.batched else given.unsqueeze(0)
            self.batch, self.rows, self.cols = self.cost.shape
            self.dim = None
            low, high = (t.double() for t in torch.aminmax(self.cost.reshape(self.batch, -1), dim=1))
            self.cost_range = float((high - low).max())
            self.magnitude = float(torch.maximum(high.abs(), low.abs()).max())
            _check_range(self.magnitude, self.dtype, "cost: its largest magnitude", "the cost and eps by s")
        else:
            xs, ys = _inputs.point_clouds(x, y)
            self.batched = xs.dim() == 3
            self.device = xs.device
            self.dtype = torch.float64 if torch.float64 in (xs.dtype, ys.dtype) else torch.float32
            xb, yb = (xs, ys) if self.batched else (xs.unsqueeze(0), ys.unsqueeze(0))
            xb, yb = _inputs.finite(xb.to(self.dtype), "x"), _inputs.finite(yb.to(self.dtype), "y")
            # The bounding box of both clouds, in float64: its squared diagonal bounds every C_ij.
            low = torch.minimum(xb.amin(1), yb.amin(1)).double()
            high = torch.maximum(xb.amax(1), yb.amax(1)).double()
            squared_diameter = (high - low).square().sum(-1)
            self.cost_range = self.magnitude = float(squared_diameter.max())
            _check_range(self.magnitude, self.dtype, "x and y: the squared diagonal of their bounding box",
                         "the points by s and eps by s^2")
            # C is translation invariant: centring shrinks |x|^2 + |y|^2 - 2 x.y's cancellation. The box's
            # centre first (no overflow), then the points' mean.
            middle = (0.5 * low + 0.5 * high).to(self.dtype).unsqueeze(1)
            xc, yc = xb - middle, yb - middle
            mean = (xc.sum(1, keepdim=True) + yc.sum(1, keepdim=True)) / (xc.shape[1] + yc.shape[1])
            self.x, self.y = (xc - mean).contiguous(), (yc - mean).contiguous()
            self.batch, self.rows, self.dim = self.x.shape
            self.cols = self.y.shape[1]
            dense_bytes = self.batch * self.rows * self.cols * self.dtype.itemsize
            self.cost = None
            if mode == "dense" or (mode == "auto" and dense_bytes <= DENSE_BYTES):
                self.cost = self._cost_rows(0, self.rows)
        self.a, self.b = _inputs.ot_marginals(a, b, self.batch, self.rows, self.cols, self.batched, self.device,
                                              self.dtype)
        self.log_a, self.log_b = self.a.log(), self.b.log()

    def check_eps(self, eps: float) -> None:
        """ValueError where the kernels' ``C / eps`` (and the potentials over eps, at most about
        ``5 max|C| / eps``) would overflow the compute dtype, or eps is outside its normal range."""
        info = torch.finfo(self.dtype)
        name = str(self.dtype).replace("torch.", "")
        smallest = max(info.tiny, 8 * self.magnitude / info.max)
        if not smallest <= eps <= info.max / 1024:
            raise ValueError(f"eps = {eps:g} is out of range for {name} with costs up to {self.magnitude:.3g}: it "
                             f"must lie in [{smallest:.3g}, {info.max / 1024:.3g}] (below, the costs divided by eps "
                             f"overflow {name}); use another eps"
                             + (", or float64 inputs" if self.dtype != torch.float64 else ""))

    def points(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The centred ``x``, ``y`` (B, N, D), (B, M, D) of a problem given by points."""
        assert self.x is not None and self.y is not None, "a problem given by its cost matrix has no points"
        return self.x, self.y

    def _cost_rows(self, start: int, stop: int) -> torch.Tensor:
        """``C[:, start:stop]`` in the kernels' formula ``max(|x|^2 + |y|^2 - 2 x.y, 0)`` (summed as
        ``(|x|^2 - 2 x.y) + |y|^2``: the same up to rounding); on the CPU
        one problem of a batch at a time (its temporaries stay in cache)."""
        if self.cost is not None and self.x is None:
            return self.cost[:, start:stop]
        x, y = self.points()
        out = torch.empty((self.batch, stop - start, self.cols), dtype=self.dtype, device=self.device)
        parts = [slice(k, k + 1) for k in range(self.batch)] if self.device.type == "cpu" else [slice(None)]
        for part in parts:
            xs, ys = x[part, start:stop], y[part]
            # |x|^2 broadcast into the product's output, |y|^2 added in place: no N x M temporary
            torch.baddbmm((xs * xs).sum(-1, keepdim=True), xs, ys.transpose(1, 2), alpha=-2.0, out=out[part])
            out[part].add_((ys * ys).sum(-1).unsqueeze(1)).clamp_min_(0.0)
        return out

    def update_f(self, g: torch.Tensor, eps: float, previous: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The f update from g; ``previous`` (the last f, if any) lets the kernel take one pass."""
        if self.cost is not None:
            return _ops.sinkhorn_softmin(None, None, self.cost, g, self.log_b, eps, previous)
        return _ops.sinkhorn_softmin(self.x, self.y, None, g, self.log_b, eps, previous)

    def update_g(self, f: torch.Tensor, eps: float, previous: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The g update from f (dense: the columns of the same cost matrix)."""
        if self.cost is not None:
            return _ops.sinkhorn_softmin(None, None, self.cost, f, self.log_a, eps, previous, transpose=True)
        return _ops.sinkhorn_softmin(self.y, self.x, None, f, self.log_a, eps, previous)

    def plan_sums(self, f: torch.Tensor, g: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Row mass ``P 1`` and row cost ``(P * C) 1`` (B, N) from the fused kernel."""
        if self.cost is not None:
            return _ops.sinkhorn_plan_sums(None, None, self.cost, f, g, self.log_a, self.log_b, eps)
        return _ops.sinkhorn_plan_sums(self.x, self.y, None, f, g, self.log_a, self.log_b, eps)

    def plan_error(self, f: torch.Tensor, g: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(||P 1 - a||_1 (B,), P 1, (P * C) 1)`` of the plan of ``f``, ``g`` (:meth:`plan_sums`)."""
        mass, row_cost = self.plan_sums(f, g, eps)
        return (mass - self.a).abs().sum(-1), mass, row_cost

    def problems(self, start: int, stop: int) -> _Problem:
        """The problems ``start:stop`` of the batch, as a problem of their own (views, nothing copied)."""
        part = copy.copy(self)
        for name in ("x", "y", "cost", "a", "b", "log_a", "log_b"):
            value = getattr(self, name)
            setattr(part, name, None if value is None else value[start:stop])
        part.batch = stop - start
        return part

    def scaling_fits(self) -> bool:
        """Whether the scaling solver's kernel (the size of the cost matrix) fits in half the free memory."""
        return self.cost is not None and \
            2 * self.batch * self.rows * self.cols * self.dtype.itemsize <= free_bytes(self.device)

    def kernel(self, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
        """``K_ij = exp(((f_i + g_j) - C_ij) / eps)`` (B, N, M), the potentials' sum against the cost
        first (as the plan is formed); one sweep of ``pfc_fast::sinkhorn_kernel``."""
        assert self.cost is not None, "the scaling solver needs the cost matrix"
        return _ops.sinkhorn_kernel(self.cost, f, g, eps)

    def plan_chunks(self, f: torch.Tensor, g: torch.Tensor,
                    eps: float) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
        """Yields ``(start, P[:, start:stop], C[:, start:stop])`` over row chunks of the plan."""
        step = max(1, CHUNK_BYTES // max(1, self.batch * self.cols * self.dtype.itemsize))
        for start in range(0, self.rows, step):
            stop = min(self.rows, start + step)
            cost = self._cost_rows(start, stop)
            log_plan = (self.log_a[:, start:stop, None] + self.log_b[:, None, :]
                        + (f[:, start:stop, None] + g[:, None, :] - cost) / eps)
            yield start, log_plan.exp(), cost


def _check_range(magnitude: float, dtype: torch.dtype, what: str, scaling: str) -> None:
    """ValueError where costs bounded by ``magnitude`` overflow ``dtype`` in the kernels (the
    terms of ``|x|^2 + |y|^2 - 2 x.y`` after centring, and the potentials, reach about ``4 magnitude``)."""
    if not 4 * magnitude <= torch.finfo(dtype).max:
        name = str(dtype).replace("torch.", "")
        raise ValueError(f"{what} ({magnitude:.3g}) is too large for {name}, the dtype of the computation: the costs "
                         f"would overflow; " + ("give float64 inputs, or " if dtype != torch.float64 else "")
                         + f"rescale them (scaling {scaling} leaves the plan unchanged)")


def _solve(problem: _Problem, eps: float, max_iter: int, tol: float, check_every: int,
           eps_scaling: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    """Potentials (f, g), iterations, marginal error and the plan's row mass and row cost; no autograd.

    The marginal error is ``||P 1 - a||_1`` from the row mass of the plan itself (the fused
    kernel), right at every eps, also where f no longer changes at rounding level while the plan is
    not a coupling; its row cost gives the transport cost of the returned potentials.
    """
    g, n_iter = _annealed(problem, eps, max_iter, eps_scaling)
    f = problem.update_f(g, eps)
    previous: Optional[torch.Tensor] = None  # the first g update at eps starts without a shift
    while True:
        g = previous = problem.update_g(f, eps, previous)
        n_iter += 1
        if n_iter % check_every == 0 or n_iter >= max_iter:
            error, mass, row_cost = problem.plan_error(f, g, eps)
            if n_iter >= max_iter or (tol > 0 and float(error.max()) < tol):
                return f, g, n_iter, error, mass, row_cost
        f = problem.update_f(g, eps, f)


def _annealed(problem: _Problem, eps: float, max_iter: int, eps_scaling: Optional[float]) -> Tuple[torch.Tensor, int]:
    """The g of the eps-scaling stages (module docstring; g = 0 without them) and the iterations they took."""
    g = torch.zeros(problem.batch, problem.cols, dtype=problem.dtype, device=problem.device)
    n_iter = 0
    if eps_scaling is not None:
        stage_eps = problem.cost_range  # OT does not change when a constant is added to C
        while stage_eps > eps and n_iter < max_iter - 1:
            g = problem.update_g(problem.update_f(g, stage_eps), stage_eps)
            n_iter += 1
            stage_eps *= eps_scaling
    return g, n_iter


def _solve_scaling(problem: _Problem, eps: float, max_iter: int, tol: float,
                   eps_scaling: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
    """:func:`_solve` by stabilised scaling (module docstring); the same results.

    The marginal error of the state at iteration ``n`` comes with step ``n + 1`` (the status of
    ``sinkhorn_scaling_step``): below ``tol``, that step's scalings are dropped, those of iteration
    ``n`` absorbed, and the error of the plan itself (``plan_sums``, as :func:`_solve` measures it)
    decides. Where that one is not below ``tol`` (in float32 at small eps, the rounding of
    ``f + g - C`` that K was formed with is not that of the plan), K is formed again from the
    absorbed potentials and the iterations go on, the plan checked again after 1, 2, 4, ... (at
    most ``MAX_VERIFY_WAIT``) iterations."""
    assert problem.cost is not None, "the scaling solver needs the cost matrix"
    if eps_scaling is None:  # from g = 0, f = the row minima of C: each row of K holds a 1 (u_i <= 1 / b_j there)
        f, g, n_iter = problem.cost.amin(-1), torch.zeros_like(problem.b), 0
    else:
        g, n_iter = _annealed(problem, eps, max_iter, eps_scaling)
        f = problem.update_f(g, eps)
        g = problem.update_g(f, eps)
        n_iter += 1
    safe = SAFE_LOG2[problem.dtype]
    ones_u, ones_v = torch.ones_like(problem.a), torch.ones_like(problem.b)
    kernel = problem.kernel(f, g, eps)
    u, v = ones_u, ones_v
    streak, wait, verify_at = 1, 1, 1  # the row-minima start is no iterate: its error is not checked
    while n_iter < max_iter:
        new_u, new_v, status = _ops.sinkhorn_scaling_step(kernel, u, v, problem.a, problem.b)
        error, spread = (float(t) for t in status.amax(0))
        if tol > 0 and error < tol and n_iter >= verify_at:
            f, g = f + eps * u.log(), g + eps * v.log()
            plan_error, mass, row_cost = problem.plan_error(f, g, eps)
            if float(plan_error.max()) < tol:
                return f, g, n_iter, plan_error, mass, row_cost
            verify_at, wait = n_iter + wait, min(2 * wait, MAX_VERIFY_WAIT)
        elif spread <= safe:
            u, v, n_iter = new_u, new_v, n_iter + 1
            streak = max(1, streak // 2)
            continue
        elif math.isfinite(spread):  # in range of the dtype still: absorbed, one iteration on
            u, v, n_iter = new_u, new_v, n_iter + 1
            f, g = f + eps * u.log(), g + eps * v.log()
        else:  # a scaling failed: the last good ones absorbed, then log-domain iterations
            f, g = f + eps * u.log(), g + eps * v.log()
            for _ in range(min(streak, max_iter - n_iter)):
                f = problem.update_f(g, eps, f)
                g = problem.update_g(f, eps, g)
                n_iter += 1
            streak = min(2 * streak, MAX_LOG_STREAK)
        del kernel  # not two at once
        kernel = problem.kernel(f, g, eps)
        u, v = ones_u, ones_v
    f, g = f + eps * u.log(), g + eps * v.log()
    return (f, g, n_iter) + problem.plan_error(f, g, eps)


def _solve_scaling_batch(problem: _Problem, eps: float, max_iter: int, tol: float,
                         eps_scaling: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor, int, torch.Tensor,
                                                                torch.Tensor, torch.Tensor]:
    """:func:`_solve_scaling` of a batch; on the CPU a few problems at a time, as many as keep their
    kernels within ``CACHE_BYTES`` (at least one), so that every iteration reads them from cache
    where a problem's kernel fits there (the problems are independent: the same results, ``n_iter``
    the largest of the groups')."""
    per_problem = problem.rows * problem.cols * problem.dtype.itemsize
    step = problem.batch if problem.device.type != "cpu" else max(1, CACHE_BYTES // per_problem)
    if step >= problem.batch:
        return _solve_scaling(problem, eps, max_iter, tol, eps_scaling)
    parts = [_solve_scaling(problem.problems(start, min(problem.batch, start + step)), eps, max_iter, tol, eps_scaling)
             for start in range(0, problem.batch, step)]
    fs, gs, iterations, errors, masses, row_costs = zip(*parts)
    return (torch.cat(fs), torch.cat(gs), max(iterations), torch.cat(errors), torch.cat(masses),
            torch.cat(row_costs))


class _EnvelopeGradient(torch.autograd.Function):
    """Passes ``value`` through; its gradients are the precomputed envelope-theorem ones."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, x: Optional[torch.Tensor], y: Optional[torch.Tensor],
                cost: Optional[torch.Tensor], a: Optional[torch.Tensor], b: Optional[torch.Tensor],
                grad_x: Optional[torch.Tensor], grad_y: Optional[torch.Tensor], grad_cost: Optional[torch.Tensor],
                grad_a: Optional[torch.Tensor], grad_b: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.grads = (grad_x, grad_y, grad_cost, grad_a, grad_b)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_value: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        out: List[Optional[torch.Tensor]] = []
        for grad in ctx.grads:
            if grad is None:
                out.append(None)
            else:
                scale = grad_value.reshape(grad_value.shape + (1,) * (grad.dim() - grad_value.dim()))
                out.append(scale * grad)
        return (None, *out, None, None, None, None, None)


def _envelope_gradients(problem: _Problem, f: torch.Tensor, g: torch.Tensor, eps: float, mass: torch.Tensor,
                        need: Dict[str, bool]) -> Dict[str, torch.Tensor]:
    """The envelope gradients in ``need`` (``mass = P 1``, from the fused kernel).

    ``d value / d x_i = 2 (m_i x_i - sum_j P_ij y_j)`` with ``m = P 1``, likewise for y with
    ``P^T``; ``d value / d C = P``. They take one more sweep over the plan in row chunks.
    """
    grads: Dict[str, torch.Tensor] = {}
    if not (need["x"] or need["y"] or need["cost"]):
        return grads
    if need["x"] or need["y"]:
        x, y = problem.points()
    py = torch.zeros_like(x) if need["x"] else None
    ptx = torch.zeros_like(y) if need["y"] else None
    col_mass = torch.zeros_like(problem.b)
    plan_rows = []
    for start, plan, _ in problem.plan_chunks(f, g, eps):
        stop = start + plan.shape[1]
        col_mass += plan.sum(1)
        if py is not None:
            py[:, start:stop] = plan @ y
        if ptx is not None:
            ptx += plan.transpose(1, 2) @ x[:, start:stop]
        if need["cost"]:
            plan_rows.append(plan)
    if py is not None:
        grads["x"] = 2.0 * (mass.unsqueeze(-1) * x - py)
    if ptx is not None:
        grads["y"] = 2.0 * (col_mass.unsqueeze(-1) * y - ptx)
    if need["cost"]:
        grads["cost"] = torch.cat(plan_rows, dim=1)
    return grads


def sinkhorn(x: Optional[TensorLike] = None, y: Optional[TensorLike] = None, a: Optional[TensorLike] = None,
             b: Optional[TensorLike] = None, eps: float = 0.05, cost: Optional[TensorLike] = None,
             max_iter: int = 1000, tol: float = 1e-6, check_every: int = 10, eps_scaling: Optional[float] = None,
             mode: str = "auto", method: str = "auto") -> SinkhornResult:
    """Entropic optimal transport between ``x`` and ``y`` (see the module docstring).

    Args:
        x, y: points ``(N, D)``, ``(M, D)``, or batches ``(B, N, D)``, ``(B, M, D)``, ``B >= 1``
            (an empty batch is a ValueError), solved in one call (e.g. all consecutive layer
            pairs). May be None when ``cost`` is given.
        a, b: weights ``(N,)``/``(M,)`` (or ``(B, N)``/``(B, M)``), non-negative, uniform by
            default, with equal totals to the resolution of their dtype (``max(1e-5, 4 eps)``
            relative: float16 and bfloat16 weights are rounded), compared in float64; ``b`` is then
            rescaled to ``a``'s total.
        eps: regularisation (> 0, absolute; see "Choosing eps").
        cost: a cost matrix ``(N, M)``/``(B, N, M)`` instead of ``||x_i - y_j||^2``.
        max_iter, tol, check_every: stop when ``marginal_error < tol`` (checked every
            ``check_every`` iterations by the log solver, every iteration by the scaling one) or
            after ``max_iter``; ``tol=0`` runs exactly ``max_iter``.
        eps_scaling: None, or a factor in (0, 1): anneal eps from the range of the cost.
        mode: ``"online"`` (cost recomputed tile by tile, nothing ``N x M`` in memory),
            ``"dense"`` (cost matrix kept), ``"auto"`` (dense when it takes at most 1 GiB).
        method: ``"log"`` (log-domain half-steps), ``"scaling"`` (stabilised scaling on the kept
            kernel ``exp((f + g - C) / eps)``: dense mode only), ``"auto"`` (scaling in dense mode
            where the kernel fits in half the free memory, else log); below about ``1e-15`` of the
            costs (float64; ``1e-6`` in float32) both run log. ``SinkhornResult.method`` says which
            ran; see the module docstring.

    Returns:
        SinkhornResult. Computation in float64 if any input is float64, else float32.
    """
    eps = _inputs.finite_number(eps, "eps", positive=True)
    max_iter = _inputs.positive_int(max_iter, "max_iter")
    check_every = _inputs.positive_int(check_every, "check_every")
    tol = _inputs.finite_number(tol, "tol")
    if eps_scaling is not None:
        eps_scaling = _inputs.finite_number(eps_scaling, "eps_scaling")
        if not 0 < eps_scaling < 1:
            raise ValueError(f"eps_scaling must be None or a number in (0, 1), got {eps_scaling!r}")
    _inputs.check_choice(method, "method", METHODS)
    problem = _Problem(x, y, a, b, cost, mode)
    problem.check_eps(eps)
    if method == "scaling" and problem.cost is None:
        raise ValueError("method='scaling' keeps the kernel exp((f + g - C) / eps) beside the cost matrix, so it needs "
                         "the cost in memory: mode='dense' or 'auto' (mode='online' iterates in the log domain)")
    # below this eps the potentials cannot absorb the scalings (eps log u is under their rounding)
    representable = eps >= SCALING_MIN_EPS * torch.finfo(problem.dtype).eps * problem.magnitude
    solver = "scaling" if representable and (method == "scaling" or (method == "auto" and problem.scaling_fits())) \
        else "log"
    if solver == "scaling":
        f, g, n_iter, error, mass, row_cost = _solve_scaling_batch(problem, eps, max_iter, tol, eps_scaling)
    else:
        f, g, n_iter, error, mass, row_cost = _solve(problem, eps, max_iter, tol, check_every, eps_scaling)
    if tol > 0 and not float(error.max()) < tol:  # tol = 0 asks for max_iter iterations: no check, no sync
        warnings.warn(f"sinkhorn stopped at max_iter = {max_iter} unconverged: marginal_error {float(error.max()):.3g} "
                      f"> tol = {tol:g} (eps = {eps:g}); raise max_iter, or eps, or use eps_scaling", ConvergenceWarning,
                      stacklevel=2)

    inputs = {"x": x, "y": y, "cost": cost, "a": a, "b": b}
    need = {name: isinstance(t, torch.Tensor) and t.requires_grad for name, t in inputs.items()}
    need["x"] = need["x"] and cost is None
    need["y"] = need["y"] and cost is None
    ot_cost = row_cost.sum(-1)
    grads = _envelope_gradients(problem, f, g, eps, mass, need)
    if need["a"]:
        grads["a"] = f
    if need["b"]:
        grads["b"] = g
    value = (problem.a * f).sum(-1) + (problem.b * g).sum(-1)

    def unbatch(t: torch.Tensor) -> torch.Tensor:
        return t if problem.batched else t[0]

    if any(need.values()):
        shaped: Dict[str, Optional[torch.Tensor]] = {}
        for name, t in inputs.items():
            grad = grads.get(name)  # only for the tensors that need one
            shaped[name] = None if grad is None or not isinstance(t, torch.Tensor) else \
                unbatch(grad).reshape(t.shape).to(t.dtype)
        value = _EnvelopeGradient.apply(unbatch(value), *(inputs[n] if need[n] else None for n in inputs),
                                        *(shaped[n] for n in inputs))
    else:
        value = unbatch(value)
    return SinkhornResult(f=unbatch(f), g=unbatch(g), cost=unbatch(ot_cost), value=value, n_iter=n_iter,
                          marginal_error=unbatch(error), eps=eps, method=solver, _problem=problem)


def sinkhorn_divergence(x: TensorLike, y: TensorLike, a: Optional[TensorLike] = None, b: Optional[TensorLike] = None,
                        eps: float = 0.05, **kwargs: Any) -> torch.Tensor:
    """Debiased Sinkhorn divergence ``S = OT(a, b) - OT(a, a)/2 - OT(b, b)/2`` (Feydy et al. 2019).

    ``OT`` is the entropic value of :func:`sinkhorn` (same keyword arguments); ``S >= 0``, and 0
    when the two measures are equal. Differentiable like ``value``.
    """
    cross = sinkhorn(x, y, a, b, eps, **kwargs).value
    self_x = sinkhorn(x, x, a, a, eps, **kwargs).value
    self_y = sinkhorn(y, y, b, b, eps, **kwargs).value
    return cross - 0.5 * (self_x + self_y)


def wasserstein2(x: TensorLike, y: TensorLike, a: Optional[TensorLike] = None, b: Optional[TensorLike] = None,
                 eps: float = 0.05, **kwargs: Any) -> torch.Tensor:
    """W2 estimate ``sqrt(max(S, 0))`` from the Sinkhorn divergence ``S``."""
    return sinkhorn_divergence(x, y, a, b, eps, **kwargs).clamp_min(0.0).sqrt()


def median_cost(x: TensorLike, y: TensorLike, max_points: int = 2000, nonzero: bool = False) -> float:
    """Median of ``||x_i - y_j||^2`` over (a subsample of at most ``max_points`` of) each cloud;
    with ``nonzero``, of its nonzero values only (0 where there are none: both clouds are one point).

    A scale for ``eps``: ``eps = 0.05 * median_cost(x, y)``. Where most pairs coincide (features
    collapsed onto a few points) the median is 0; ``nonzero=True`` still gives a scale.
    """
    max_points = _inputs.positive_int(max_points, "max_points")
    nonzero = _inputs.check_bool(nonzero, "nonzero")
    clouds = _inputs.point_clouds(x, y)  # non-empty, floating, matching D (an empty cloud has no median)
    gen = torch.Generator().manual_seed(0)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[-2] <= max_points else t[..., torch.randperm(t.shape[-2], generator=gen)[:max_points], :]

    xs, ys = (pick(_inputs.finite(t, name)).double() for t, name in zip(clouds, "xy"))
    costs = torch.cdist(xs, ys, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    if nonzero:
        costs = costs[costs > 0]
        if costs.numel() == 0:
            return 0.0
    return float(costs.median())
