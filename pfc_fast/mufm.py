"""Multilayer unconstrained feature model (MUFM), solved to a stationary point (docs/spec.md section 6).

The paper (Wang, Gai & Zhang, arXiv:2405.00985) proposes the MUFM but its objective could not be
recovered; this module implements the reconstruction fixed by ``docs/spec.md`` section 6,
not the paper's own formula. Free features ``H_1..H_L`` ``(N, D)``, fixed input ``H_0 = X``,
classifier ``W (K, D)``, ``b (K,)``:

    F = (1/N) sum_i CE(W h_{L,i} + b, y_i) + lw/2 ||W||^2 + lb/2 ||b||^2 + lh/(2N) ||H_L||^2
        + lot * sum_{l=1..L} c(H_{l-1}, H_l)

with the layer cost ``c`` either

- ``"matched"``: ``(1/N) sum_i ||h_{l,i} - h_{l-1,i}||^2`` (sample i moves from layer to layer), or
- ``"sinkhorn"``: the debiased Sinkhorn divergence ``S(H_{l-1}, H_l)`` between the uniform
  empirical measures (docs/spec.md section 4, :func:`pfc_fast.sinkhorn_divergence`), with
  ``eps = sinkhorn_eps * median_i,j ||x_i - x_j||^2`` (a fraction of the median squared
  distance between input points, fixed for the whole solve so that ``F`` is one function).

``lot = 0`` is the unconstrained feature model of Zhu et al. 2021 ("A geometric analysis of
neural collapse with unconstrained features"; their ``lambda_H`` is ``lh / N`` here): with
balanced classes and ``D >= K - 1`` every global minimiser has ``b = 0`` and a class-collapsed
``H_L`` whose class means, like the rows of ``W``, form a simplex ETF (neural collapse). These
minimisers are one orbit of the rotations ``(H_L, W) -> (H_L Q, W Q)``, ``Q`` orthogonal, which
leave ``F`` unchanged, and the intermediate layers do not enter ``F`` at all. The solver returns
the ``lot -> 0+`` limit of the matched-cost solution: the ETF nearest ``X`` (the rotation that
minimises ``||H_L - X||``, by orthogonal Procrustes) and the straight path
``H_l = X + (l/L)(H_L - X)`` to it, for either cost. So the result at ``lot = 0`` does not
depend on the start, and continues a sweep over ``lot`` towards 0.

Structure of the matched cost: for a fixed ``H_L``, ``sum_l ||H_l - H_{l-1}||^2`` is minimised by
equal steps along the straight path ``H_l = X + (l/L)(H_L - X)``, where it equals
``||H_L - X||^2 / L``. So the problem reduces to ``(H_L, W, b)`` with the coupling
``lot/(L N) ||H_L - X||^2`` (an UFM anchored at ``X``); its stationary points satisfy
``(lh + 2 lot/L) h_{L,i} = (2 lot/L) x_i - W^T (p_i - e_{y_i})``, so for ``lot > 0`` the last
layer keeps part of the within-class spread of ``X`` (no collapse) and ``X``'s class-mean
geometry (no ETF). With ``eliminate_path=True`` (default) the solver works on ``(H_L, W, b)``,
the chain rule through the path giving the gradient; the stationarity reported is still that of
the full objective in all of ``H_1..H_L, W, b``. ``eliminate_path=False`` solves all layers
jointly (the tests check that it finds the same point). The Sinkhorn cost has no such reduction
(its optimal path moves samples along an optimal matching, not the identity) and is solved in
all variables.

Stationarity: the relative gradient norm is

    ||grad F|| / ||grad CE||

over all free variables ``(H_1..H_L, W, b)`` (2-norms of the concatenated gradients), where
``CE = (1/N) sum_i CE(W h_{L,i} + b, y_i)``. At a stationary point the cross-entropy gradient
is cancelled by those of the regularisers and the coupling, so this says how far from
cancellation the terms are. It depends only on the point (not on the start), is unchanged when
``F`` is rescaled, and does not grow with ``N``; ``converged`` means it is at most ``tol``. The
float64 floor is about ``1e-14`` for the matched cost.

Solver: L-BFGS (Nocedal & Wright 2006, Algorithm 7.4: two-loop recursion over ``history_size``
curvature pairs, initial inverse Hessian ``s.y / y.y``) in float64, with a backtracking line
search: Armijo's sufficient decrease, or, once the change of ``F`` is below its rounding noise,
the approximate-Wolfe form of it computed from the gradient (Hager & Zhang 2005), which lets the
solve go on to the float64 floor. ``lr`` is the first trial step of every line search (1 = the
quasi-Newton step; the first iteration, without curvature pairs, tries
``lr * min(1, 1/||grad||)`` along ``-grad``). It stops at ``tol``, after ``steps`` iterations, or
when no step along the L-BFGS direction nor along ``-grad`` passes the test (``stop =
"precision"``). Start: ``H_1 = ... = H_L = X``, ``W = 0``, ``b = 0``, or a previous result
(``init``). Measured on one core (``torch.set_num_threads(1)``, which these small problems
prefer: intra-op threads only add synchronisation), ``tol = 1e-10``: N=120, D=16, K=4, L=3:
about 250 iterations, 0.3 s; N=500, D=64, K=10, L=4: 570 iterations, 4.6 s at ``lot = 0``,
520 iterations, 5.3 s at ``lot = 0.01``.

Sinkhorn cost: the gradients are the envelope-theorem ones of :func:`pfc_fast.sinkhorn`, exact
at Sinkhorn's fixed point; every Sinkhorn solve runs to marginal error ``sinkhorn_tol``
(default 1e-12, at most ``SINKHORN_MAX_ITER`` iterations), which leaves ``F`` and its gradient
accurate enough for the solve to reach ``tol = 1e-10`` on small problems. Each evaluation costs
``3 L`` Sinkhorn solves started cold, and they need more iterations as the layers cluster, so
the solve is slow: measured (one core) N=60, D=8, K=3, L=3, lot=0.1: about 1000 iterations,
70 s to 1e-10; N=60 digits (D=64, K=10), L=4: lot=1: 315 iterations, 10 s, lot=0.1: 970
iterations, 13 min to 1e-8; N=300 digits, L=4: several seconds per evaluation (hours to
converge). Smaller ``sinkhorn_eps`` (below about 0.1) makes Sinkhorn converge very slowly; if it
stops at ``SINKHORN_MAX_ITER`` the gradient is only as accurate as its marginal error, and the
solve ends with ``stop = "precision"`` and a larger ``grad_norm``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch

from . import _inputs
from ._inputs import TensorLike
from .metrics import NCMetrics, nc_metrics
from .transport import median_cost, sinkhorn_divergence

COSTS = ("matched", "sinkhorn")

#: Armijo sufficient-decrease constant and the most step halvings of one line search.
ARMIJO = 1e-4
MAX_HALVINGS = 30
#: Iteration cap of every Sinkhorn solve of the "sinkhorn" cost.
SINKHORN_MAX_ITER = 10000
#: Changes of F below this fraction of |F| are treated as rounding noise (approximate Wolfe test).
VALUE_NOISE = 1e-10


@dataclass
class MUFMResult:
    """A solution of the MUFM (see the module docstring for ``F``).

    ``layers``: ``[H_0 = X, H_1, ..., H_L]`` ``(N, D)`` float64; ``W (K, D)``, ``b (K,)``;
    ``history``: ``F`` at the start and after every iteration (``n_iter + 1`` values);
    ``loss``: the final ``F``;
    ``grad_norm``: the relative gradient norm ``||grad F|| / ||grad CE||`` of the full objective
    at the solution; ``converged``: ``grad_norm <= tol``; ``n_iter``: L-BFGS iterations;
    ``stop``: why the solver stopped (``"tol"``, ``"steps"``, ``"precision"``); ``sinkhorn_eps``:
    the absolute eps of the Sinkhorn cost (None for ``"matched"``); ``metrics``:
    :func:`pfc_fast.nc_metrics` of every layer, with ``W, b`` as classifier (``nc3``,
    ``nc3_etf``) and the final prediction ``argmax(W h_L + b)`` for ``nc4`` (PFC3 of spec
    section 2).
    """

    layers: List[torch.Tensor]
    W: torch.Tensor
    b: torch.Tensor
    history: List[float]
    loss: float
    grad_norm: float
    converged: bool
    n_iter: int
    stop: str
    lot: float
    cost: str
    sinkhorn_eps: Optional[float]
    metrics: List[NCMetrics]


class _Objective:
    """``F`` and its gradient with respect to ``(H_1..H_L, W, b)`` (float64)."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, num_classes: int, lot: float, cost: str, lw: float,
                 lb: float, lh: float, sinkhorn_eps: Optional[float], sinkhorn_tol: float) -> None:
        self.x, self.lot, self.cost = x, lot, cost
        self.lw, self.lb, self.lh = lw, lb, lh
        self.onehot = torch.nn.functional.one_hot(labels, num_classes).double()
        self.num_samples = x.shape[0]
        self.sinkhorn_eps, self.sinkhorn_tol = sinkhorn_eps, sinkhorn_tol

    def __call__(self, layers: List[torch.Tensor], weight: torch.Tensor,
                 bias: torch.Tensor) -> Tuple[float, List[torch.Tensor], torch.Tensor, torch.Tensor, float]:
        """``(F, [dF/dH_1..dF/dH_L], dF/dW, dF/db, ||grad CE||)``; ``layers`` = ``[H_1..H_L]``."""
        n, last = self.num_samples, layers[-1]
        log_p = torch.log_softmax(last @ weight.T + bias, dim=1)
        ce = -(log_p * self.onehot).sum() / n
        dlogits = (log_p.exp() - self.onehot) / n
        ce_grads = (dlogits @ weight, dlogits.T @ last, dlogits.sum(0))
        ce_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in ce_grads))
        value = (ce + 0.5 * self.lw * weight.pow(2).sum() + 0.5 * self.lb * bias.pow(2).sum()
                 + 0.5 * self.lh / n * last.pow(2).sum())
        layer_grads = [torch.zeros_like(h) for h in layers[:-1]] + [ce_grads[0] + (self.lh / n) * last]
        grad_w = ce_grads[1] + self.lw * weight
        grad_b = ce_grads[2] + self.lb * bias
        if self.lot > 0:
            coupling, coupling_grads = (self._matched if self.cost == "matched" else self._sinkhorn)(layers)
            value = value + self.lot * coupling
            layer_grads = [g + self.lot * c for g, c in zip(layer_grads, coupling_grads)]
        return float(value), layer_grads, grad_w, grad_b, ce_norm

    def _matched(self, layers: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``sum_l (1/N) ||H_l - H_{l-1}||^2`` and its gradient ``(2/N)(step_l - step_{l+1})``."""
        steps = [h - prev for prev, h in zip([self.x] + layers[:-1], layers)]
        value = cast(torch.Tensor, sum(s.pow(2).sum() for s in steps)) / self.num_samples  # L >= 1 terms
        after = steps[1:] + [torch.zeros_like(steps[-1])]
        return value, [(2.0 / self.num_samples) * (s - t) for s, t in zip(steps, after)]

    def _sinkhorn(self, layers: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``sum_l S(H_{l-1}, H_l)`` (all pairs in one batched call), envelope-theorem gradient."""
        assert self.sinkhorn_eps is not None  # solve() sets it for cost="sinkhorn"
        free = torch.stack(layers).requires_grad_()
        path = torch.cat([self.x.unsqueeze(0), free])
        value = sinkhorn_divergence(path[:-1], path[1:], eps=self.sinkhorn_eps, tol=self.sinkhorn_tol,
                                    max_iter=SINKHORN_MAX_ITER).sum()
        (grad,) = torch.autograd.grad(value, free)
        return value.detach(), list(grad)


class _Variables:
    """The solver's flat vector ``z`` and the layers, ``W``, ``b`` it stands for.

    ``path=True``: ``z = (H_L, W, b)`` and ``H_l = X + (l/L)(H_L - X)`` (the gradient in ``H_L``
    is ``sum_l (l/L) dF/dH_l``, the chain rule through the path); ``path=False``:
    ``z = (H_1..H_L, W, b)``.
    """

    def __init__(self, x: torch.Tensor, num_classes: int, num_layers: int, path: bool) -> None:
        self.x, self.num_layers, self.path = x, num_layers, path
        n, d = x.shape
        free_layers = 1 if path else num_layers
        self.shapes = [(n, d)] * free_layers + [(num_classes, d), (num_classes,)]
        self.sizes = [math.prod(s) for s in self.shapes]

    def unpack(self, z: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``([H_1..H_L], W, b)`` from ``z`` (views, or the path built from ``H_L``)."""
        parts = [p.view(s) for p, s in zip(z.split(self.sizes), self.shapes)]
        *free, weight, bias = parts
        if self.path:
            last, count = free[0], self.num_layers
            free = [self.x + (l / count) * (last - self.x) for l in range(1, count)] + [last]
        return free, weight, bias

    def pack(self, layers: List[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``z`` from ``[H_1..H_L]``, ``W``, ``b`` (only ``H_L`` with ``path=True``)."""
        free = layers[-1:] if self.path else layers
        return torch.cat([t.reshape(-1) for t in free + [weight, bias]])

    def gradient(self, layer_grads: List[torch.Tensor], grad_w: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
        """The gradient in ``z`` from the gradients in ``H_1..H_L``, ``W``, ``b``."""
        if self.path:
            count = self.num_layers
            layer_grads = [cast(torch.Tensor, sum((l / count) * g for l, g in enumerate(layer_grads, start=1)))]
        return torch.cat([t.reshape(-1) for t in layer_grads + [grad_w, grad_b]])


def _relative_norm(grads: Sequence[torch.Tensor], ce_norm: float) -> float:
    """``||grads|| / ||grad CE||`` (the stationarity measure of the module docstring)."""
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    return total / max(ce_norm, torch.finfo(torch.float64).tiny)


#: The L-BFGS curvature pairs ``(s, y, 1/s.y)``, oldest first.
_Memory = List[Tuple[torch.Tensor, torch.Tensor, float]]
#: ``evaluate(z) -> (F, grad, stationarity)``, what :func:`_lbfgs` minimises.
_Evaluate = Callable[[torch.Tensor], Tuple[float, torch.Tensor, float]]


def _two_loop(grad: torch.Tensor, memory: _Memory) -> torch.Tensor:
    """``-H grad`` for the L-BFGS inverse-Hessian estimate ``H`` of the pairs ``(s, y, 1/s.y)``."""
    q = grad.clone()
    alphas = []
    for s, y, rho in reversed(memory):
        alpha = rho * float(s @ q)
        q -= alpha * y
        alphas.append(alpha)
    s, y, _ = memory[-1]
    q *= float(s @ y) / float(y @ y)
    for (s, y, rho), alpha in zip(memory, reversed(alphas)):
        q += (alpha - rho * float(y @ q)) * s
    return -q


def _sufficient_decrease(value: float, slope: float, trial_value: float, trial_slope: float, step: float) -> bool:
    """Armijo's test, or where F changes by less than its rounding noise, the approximate-Wolfe
    form of it (Hager & Zhang 2005): ``phi'(step) <= -(1 - 2 ARMIJO) phi'(0)``, exact for a
    quadratic and computed from the gradient, which keeps its relative accuracy when F does not.
    False when the trial is not finite."""
    if trial_value <= value + ARMIJO * step * slope:
        return True
    return abs(trial_value - value) <= VALUE_NOISE * abs(value) and trial_slope <= -(1 - 2 * ARMIJO) * slope


def _lbfgs(evaluate: _Evaluate, z: torch.Tensor, steps: int, lr: float, tol: float,
           history_size: int) -> Tuple[torch.Tensor, List[float], int, str]:
    """Minimises ``evaluate(z) -> (F, grad, stationarity)`` from ``z``.

    Returns ``(z, history, iterations, stop)`` with ``stop`` in ``"tol"``, ``"steps"``,
    ``"precision"`` (no step along the L-BFGS direction nor along ``-grad`` passes the test of
    :func:`_sufficient_decrease`).
    """
    value, grad, stationarity = evaluate(z)
    history = [value]
    memory: _Memory = []
    for iteration in range(steps):
        if stationarity <= tol:
            return z, history, iteration, "tol"
        while True:
            if memory:
                direction, step = _two_loop(grad, memory), lr
            else:
                direction, step = -grad, lr * min(1.0, 1.0 / float(grad.norm()))
            slope = float(grad @ direction)
            accepted = None
            for _ in range(MAX_HALVINGS):
                if slope >= 0:
                    break
                trial = z + step * direction
                trial_value, trial_grad, trial_stationarity = evaluate(trial)
                if _sufficient_decrease(value, slope, trial_value, float(trial_grad @ direction), step):
                    accepted = trial, trial_value, trial_grad, trial_stationarity
                    break
                step *= 0.5
            if accepted is not None or not memory:
                break
            memory = []  # the quasi-Newton direction failed: retry once along -grad
        if accepted is None:
            return z, history, iteration, "precision"
        s, y = accepted[0] - z, accepted[2] - grad
        curvature = float(s @ y)
        if curvature > 1e-10 * float(s.norm() * y.norm()):
            memory = (memory + [(s, y, 1.0 / curvature)])[-history_size:]
        z, value, grad, stationarity = accepted
        history.append(value)
    return z, history, steps, "tol" if stationarity <= tol else "steps"


def _nearest_rotation(last: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(H_L Q, W Q)`` with the orthogonal ``Q`` that minimises ``||H_L Q - X||``.

    ``F`` at ``lot = 0`` is invariant under ``(H_L, W) -> (H_L Q, W Q)`` and its minimisers (the
    simplex ETFs, with balanced classes) are one orbit of that action, so this picks, among them,
    the one nearest ``X``: the ``lot -> 0+`` limit of the matched-cost solution. Orthogonal Procrustes:
    ``Q = U V^T`` for ``H_L^T X = U S V^T``.
    """
    u, _, vh = torch.linalg.svd(last.T @ x)
    rotation = u @ vh
    return last @ rotation, weight @ rotation


def _initial_point(init: Optional[MUFMResult], x: torch.Tensor, num_classes: int,
                   num_layers: int) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``[H_1..H_L]``, ``W``, ``b`` to start from: ``init``'s, or ``H_l = X``, ``W = 0``, ``b = 0``."""
    if init is None:
        zeros = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device)
        return [x.clone() for _ in range(num_layers)], zeros, zeros[:, 0].clone()
    if not isinstance(init, MUFMResult):
        raise TypeError(f"init must be an MUFMResult (or None), got {type(init).__name__}")
    if len(init.layers) != num_layers + 1 or tuple(init.layers[0].shape) != tuple(x.shape) \
            or tuple(init.W.shape) != (num_classes, x.shape[1]):
        raise ValueError(f"init must solve a problem of the same shape: {num_layers + 1} layers of "
                         f"{tuple(x.shape)} and W {(num_classes, x.shape[1])}, got {len(init.layers)} layers of "
                         f"{tuple(init.layers[0].shape)} and W {tuple(init.W.shape)}")

    def as_x(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=x.device, dtype=torch.float64).clone()

    return [as_x(h) for h in init.layers[1:]], as_x(init.W), as_x(init.b)


def solve(X: TensorLike, labels: TensorLike, num_layers: int, lot: float, cost: str = "matched", *,
          num_classes: Optional[int] = None, lw: float = 5e-3, lb: float = 5e-3, lh: float = 5e-3,
          steps: int = 5000, lr: float = 1.0, tol: float = 1e-10, history_size: int = 20,
          eliminate_path: bool = True, sinkhorn_eps: float = 0.2, sinkhorn_tol: float = 1e-12,
          init: Optional[MUFMResult] = None, device: Union[torch.device, str, None] = None) -> MUFMResult:
    """Solves the MUFM of docs/spec.md section 6 (module docstring) to a stationary point.

    Args:
        X: input features ``H_0`` ``(N, D)``, torch or numpy, any float dtype (used in float64).
        labels: ``(N,)`` integer classes in ``[0, num_classes)``; at least 2 present.
        num_layers: ``L >= 1``, the number of free layers ``H_1..H_L``.
        lot: coupling weight ``>= 0`` (0: the plain UFM).
        cost: ``"matched"`` or ``"sinkhorn"`` (the layer cost ``c``).
        num_classes: ``K`` (default ``max(labels) + 1``).
        lw, lb, lh: weight decays of ``W`` (> 0), ``b`` (>= 0) and ``H_L`` (> 0). The defaults
            5e-3 give an ETF of norm about 3 at ``lot = 0`` in a few hundred iterations.
        steps: at most this many L-BFGS iterations.
        lr: first trial step of each line search (1 = the quasi-Newton step).
        tol: stop when the relative gradient norm ``||grad F|| / ||grad CE||`` is at most this.
        history_size: L-BFGS memory (curvature pairs).
        eliminate_path: matched cost only: solve for ``(H_L, W, b)`` with ``H_1..H_{L-1}`` on the
            straight path (exact, see the module docstring); False solves all layers jointly.
        sinkhorn_eps: Sinkhorn cost only: eps as a fraction of the median squared distance
            between points of ``X``.
        sinkhorn_tol: marginal-error tolerance of every Sinkhorn solve (limits the gradient's
            accuracy).
        init: a previous :class:`MUFMResult` of the same shapes to start from (warm start).
        device: where to compute (default: ``X``'s device); always float64.

    Returns:
        :class:`MUFMResult`.
    """
    x = _inputs.points(X, "X", device, copy=True)
    num_classes = _inputs.infer_num_classes(num_classes, labels)
    labels_t = _inputs.class_indices(_inputs.as_tensor(labels, "labels").to(x.device), x.shape[0], num_classes, x)
    if torch.unique(labels_t).numel() < 2:
        raise ValueError("labels: at least 2 classes must be present")
    num_layers = _inputs.positive_int(num_layers, "num_layers")
    lot = _inputs.finite_number(lot, "lot")
    _inputs.check_choice(cost, "cost", COSTS)
    lw, lh = _inputs.finite_number(lw, "lw", positive=True), _inputs.finite_number(lh, "lh", positive=True)
    lb = _inputs.finite_number(lb, "lb")
    steps = _inputs.positive_int(steps, "steps", minimum=0)
    lr = _inputs.finite_number(lr, "lr", positive=True)
    tol = _inputs.finite_number(tol, "tol", positive=True)
    history_size = _inputs.positive_int(history_size, "history_size")
    _inputs.check_bool(eliminate_path, "eliminate_path")
    eps = None
    if cost == "sinkhorn":
        eps = _inputs.finite_number(sinkhorn_eps, "sinkhorn_eps", positive=True) * median_cost(x, x)
        if eps == 0:
            raise ValueError("X: at least half of the pairs of points coincide, so the median squared distance, and "
                             "with it the Sinkhorn eps, is 0; use cost='matched'")
        sinkhorn_tol = _inputs.finite_number(sinkhorn_tol, "sinkhorn_tol", positive=True)
    layers, weight, bias = _initial_point(init, x, num_classes, num_layers)

    objective = _Objective(x, labels_t, num_classes, lot, cost, lw, lb, lh, eps, sinkhorn_tol)
    path = lot == 0 or (cost == "matched" and eliminate_path)
    variables = _Variables(x, num_classes, num_layers, path)

    def evaluate(z: torch.Tensor) -> Tuple[float, torch.Tensor, float]:
        value, layer_grads, grad_w, grad_b, ce_norm = objective(*variables.unpack(z))
        grad = variables.gradient(layer_grads, grad_w, grad_b)
        return value, grad, _relative_norm([grad], ce_norm)

    z, history, n_iter, stop = _lbfgs(evaluate, variables.pack(layers, weight, bias), steps, lr, tol, history_size)
    free, weight, bias = variables.unpack(z)
    if lot == 0:
        last, weight = _nearest_rotation(free[-1], weight, x)
        free, weight, bias = variables.unpack(variables.pack([last], weight, bias))
    layers, weight, bias = [h.clone() for h in free], weight.clone(), bias.clone()
    value, layer_grads, grad_w, grad_b, ce_norm = objective(layers, weight, bias)
    grad_norm = _relative_norm(layer_grads + [grad_w, grad_b], ce_norm)
    predictions = (layers[-1] @ weight.T + bias).argmax(1)
    classifier, offset = (weight, bias) if bool(weight.any()) else (None, None)  # W = 0 only before any step
    metrics = [nc_metrics(h, labels_t, num_classes, classifier, offset, predictions) for h in [x] + layers]
    return MUFMResult(layers=[x] + layers, W=weight, b=bias, history=history, loss=value, grad_norm=grad_norm,
                      converged=grad_norm <= tol, n_iter=n_iter, stop=stop, lot=lot, cost=cost,
                      sinkhorn_eps=eps, metrics=metrics)


def sweep(X: TensorLike, labels: TensorLike, num_layers: int, lots: Sequence[float], warm_start: bool = True,
          **kwargs: Any) -> List[MUFMResult]:
    """:func:`solve` for every coupling weight in ``lots``; one :class:`MUFMResult` per lot, in order.

    With ``warm_start`` the lots are solved from the largest down, each started from the
    solution of the next larger one (the largest from the cold start): about 20% fewer
    iterations over a sweep. ``F`` is not convex for ``lot > 0``, but warm and cold starts have
    reached the same point (to 1e-5) in every check of the tests; at ``lot = 0`` the result does
    not depend on the start. ``kwargs`` go to :func:`solve` (not ``init``).
    """
    if "init" in kwargs:
        raise TypeError("sweep() chooses the starting points itself; init is not accepted")
    values = [_inputs.finite_number(lot, f"lots[{i}]") for i, lot in enumerate(lots)]
    if not values:
        raise ValueError("lots is empty")
    results: Dict[int, MUFMResult] = {}
    previous: Optional[MUFMResult] = None
    for index in sorted(range(len(values)), key=lambda i: -values[i]):
        previous = solve(X, labels, num_layers, values[index], init=previous if warm_start else None, **kwargs)
        results[index] = previous
    return [results[i] for i in range(len(values))]
