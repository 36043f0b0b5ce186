"""Checks of the transparent model: a ResNet as a Wasserstein geodesic (docs/spec.md section 5).

For blocks that keep the dimension, ``x_{l+1} = x_l + v_l(x_l)``; a network trained with weight
decay should move its data along a geodesic of Wasserstein space, i.e. every sample along a
straight line, as optimal transport would, at constant speed:

- :func:`line_shape_score` (LSS, Gai & Zhang): straightness of each sample's track.
- :func:`ot_score` (OTS): does the network send each sample where optimal transport would?
- :func:`wasserstein_path_ratio`: ``W2(mu_0, mu_n) / sum_l W2(mu_{l-1}, mu_l)``, 1 on a geodesic,
  below 1 on a detour.
- :func:`transparent_model`: the displacement interpolation ``(1 - t) x + t T(x)`` towards a
  target configuration, and its PFC metrics along ``t``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import _inputs
from ._inputs import TensorLike
from .metrics import NCMetrics, nc_metrics
from .transport import median_cost, wasserstein2

#: Layers of a network's tracks: a sequence of ``(N, D)`` features, or one ``(L+1, N, D)`` tensor.
Layers = Union[List[TensorLike], Tuple[TensorLike, ...], TensorLike]


def _tracks(layers: Layers, name: str = "layers") -> torch.Tensor:
    """``layers`` (a sequence of ``(N, D)`` features, or an ``(L+1, N, D)`` tensor) as one float64 tensor."""
    if isinstance(layers, (list, tuple)):
        if len(layers) < 2:
            raise ValueError(f"{name} needs at least 2 layers, got {len(layers)}")
        points = [_inputs.points(t, f"{name}[{i}]") for i, t in enumerate(layers)]
        if len({tuple(p.shape) for p in points}) != 1:
            raise ValueError(f"every layer in {name} must have the same shape (N, D) (constant width), got "
                             f"{[tuple(p.shape) for p in points]}")
        if len({p.device for p in points}) != 1:
            raise ValueError(f"the layers in {name} are on different devices")
        return torch.stack(points)
    stacked = _inputs.floating(layers, name)
    if stacked.dim() != 3 or stacked.shape[0] < 2:
        raise ValueError(f"{name} must be (L+1, N, D) with L >= 1, got {tuple(stacked.shape)}")
    return _inputs.finite(stacked.double(), name)


def line_shape_score(tracks: Layers) -> float:
    """Mean line-shape score of the samples' tracks ``x_0, ..., x_n`` (Gai & Zhang).

    Per sample: ``u_0 = x_0``, ``u_l = u_{l-1} + (x_l - x_{l-1}) / ||x_l - x_{l-1}||``,
    ``LSS = n / ||u_n - u_0|| >= 1``, equal to 1 for a straight track (every step in the same
    direction). Steps of length 0 are skipped (``n`` counts the others); samples that never move
    are left out. A track whose unit steps cancel, ``u_n = u_0`` (out and back: ``x_2 = x_0``), has
    ``LSS = inf``, the limit of tracks that come closer and closer back, and the mean is then
    ``inf`` (never NaN). Any finite coordinates: the steps are formed as halves, and each is
    divided by its largest component before its norm is taken, so nothing overflows or underflows.
    """
    x = _tracks(tracks, "tracks")
    steps = 0.5 * x[1:] - 0.5 * x[:-1]  # LSS is scale-invariant; halves never overflow
    largest = steps.abs().amax(dim=-1, keepdim=True)
    moving = largest > 0
    scaled = steps / torch.where(moving, largest, torch.ones_like(largest))
    unit = scaled / torch.where(moving, scaled.norm(dim=-1, keepdim=True), torch.ones_like(largest))
    n = moving.squeeze(-1).sum(0).double()
    keep = n > 0
    if not bool(keep.any()):
        raise ValueError("tracks: no sample moves between layers; LSS is undefined")
    return float((n[keep] / unit.sum(0).norm(dim=-1)[keep]).mean())


def _assignment(cost: torch.Tensor) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def _squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) if x.shape[0] * y.shape[0] * x.shape[1] <= 2**25 else \
        torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def ot_score(x0: TensorLike, xn: TensorLike) -> float:
    """OT score: the fraction of samples the exact optimal assignment between ``{x0_i}`` and
    ``{xn_j}`` (uniform weights, squared Euclidean cost) sends to themselves (``i -> i``).

    1 means the network moves every sample where optimal transport would. Exact assignment
    (scipy's ``linear_sum_assignment``), ``O(N^3)``: meant for N up to a few thousand.
    """
    pair = _tracks([x0, xn], "x0/xn")
    perm = _assignment(_squared_distances(pair[0], pair[1]))
    return float((perm == torch.arange(len(perm))).double().mean())


def wasserstein_path_ratio(layers: Layers, eps: Optional[float] = None, **sinkhorn_kwargs: Any) -> float:
    """``W2(mu_0, mu_n) / sum_l W2(mu_{l-1}, mu_l)`` for the empirical measures of the layers.

    Each W2 is the debiased Sinkhorn estimate :func:`pfc_fast.wasserstein2`; all consecutive
    pairs are solved in one batched call. In (0, 1] by the triangle inequality: 1 on a geodesic (a
    displacement interpolation), lower the more the path detours. ``eps`` defaults to 1e-2 times the
    smallest median nonzero squared distance of a consecutive pair (:func:`pfc_fast.median_cost`
    with ``nonzero=True``: positive also where layers collapse onto a few points, which makes most
    distances 0), with eps-scaling 0.5.
    """
    x = _tracks(layers)
    if eps is None:
        scales = [median_cost(x[l - 1], x[l], nonzero=True) for l in range(1, x.shape[0])]
        if max(scales) == 0:  # every layer is one and the same point
            raise ValueError("layers: the measures do not move; the path ratio is undefined")
        eps = 1e-2 * min(scale for scale in scales if scale > 0)
        sinkhorn_kwargs.setdefault("eps_scaling", 0.5)
    steps = wasserstein2(x[:-1], x[1:], eps=eps, **sinkhorn_kwargs)
    total = wasserstein2(x[0], x[-1], eps=eps, **sinkhorn_kwargs)
    path = float(steps.sum())
    if path == 0:
        raise ValueError("layers: the measures do not move; the path ratio is undefined")
    return float(total) / path


def scores(layers: Layers) -> Dict[str, float]:
    """The three geodesic scores of a list of ``(N, D)`` layers (a network's tracks):
    ``{"lss": line_shape_score, "ots": ot_score of the first against the last layer,
    "w_path_ratio": wasserstein_path_ratio}``, as floats."""
    tracks = _tracks(layers)
    return {"lss": float(line_shape_score(tracks)), "ots": float(ot_score(tracks[0], tracks[-1])),
            "w_path_ratio": float(wasserstein_path_ratio(tracks))}


def simplex_etf(num_classes: int, dim: int, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(K, D)`` vertices of a simplex equiangular tight frame of norm ``scale`` (needs D >= K - 1)."""
    if dim < num_classes - 1:
        raise ValueError(f"a simplex ETF of {num_classes} classes needs D >= {num_classes - 1}, got D = {dim}")
    centred = torch.eye(num_classes, dtype=dtype) - 1.0 / num_classes      # rank K-1, rows of norm sqrt((K-1)/K)
    basis, _ = torch.linalg.qr(centred.T)                                    # (K, K) orthonormal columns
    coords = centred @ basis[:, : num_classes - 1]                           # (K, K-1), same Gram matrix
    vertices = torch.zeros(num_classes, dim, dtype=dtype)
    vertices[:, : num_classes - 1] = coords
    return vertices * (scale / ((num_classes - 1) / num_classes) ** 0.5)


@dataclass
class TransparentModel:
    """The displacement interpolation ``h_t = (1 - t) x + t T(x)`` and its PFC metrics."""

    ts: List[float]
    features: List[torch.Tensor]
    metrics: List[NCMetrics]


def transparent_model(x0: TensorLike, labels: TensorLike, target: Union[str, TensorLike] = "etf",
                      ts: Optional[Sequence[float]] = None, num_layers: int = 8) -> TransparentModel:
    """Features and PFC metrics along the displacement interpolation from ``x0`` (docs/spec.md section 5).

    ``target``: an ``(N, D)`` tensor (e.g. the network's last-layer features of the same samples;
    ``T`` is then the exact optimal assignment between the two point sets), or ``"etf"``: the
    class-balanced simplex ETF, scaled to the RMS norm of ``x0``'s centred class means, whose
    vertices are matched to the classes by an optimal assignment of the class means, every sample
    of class ``c`` going to its class's vertex. ``ts`` defaults to ``l / num_layers``,
    ``l = 0..num_layers`` (the depth of a network with that many blocks).
    """
    x = _inputs.points(x0, "x0")
    labels_t = _inputs.class_indices(labels, x.shape[0], _inputs.infer_num_classes(None, labels), x)
    if isinstance(target, str):
        _inputs.check_choice(target, "target", ("etf",))
        classes = torch.unique(labels_t)
        means = torch.stack([x[labels_t == c].mean(0) for c in classes])
        centred = means - means.mean(0)
        vertices = simplex_etf(len(classes), x.shape[1], scale=float(centred.norm(dim=1).pow(2).mean().sqrt()))
        vertices = vertices.to(x.device) + means.mean(0)
        counts = torch.stack([(labels_t == c).sum() for c in classes]).double()
        perm = _assignment(counts[:, None] * _squared_distances(means, vertices))
        index = torch.searchsorted(classes, labels_t)
        mapped = vertices[perm.to(x.device)[index]]
    else:
        goal = _inputs.points(target, "target").to(x.device)
        if goal.shape != x.shape:
            raise ValueError(f"target must have the shape of x0 {tuple(x.shape)}, got {tuple(goal.shape)}")
        mapped = goal[_assignment(_squared_distances(x, goal)).to(x.device)]
    times = [l / num_layers for l in range(num_layers + 1)] if ts is None else [float(t) for t in ts]
    features = [(1.0 - t) * x + t * mapped for t in times]
    metrics = [nc_metrics(h, labels_t) for h in features]
    return TransparentModel(ts=times, features=features, metrics=metrics)
