"""Direct float64 pure-PyTorch formulas: the reference the tests and benchmarks compare against.

These follow the definitions of docs/spec.md section 2 literally: explicit ``D x D`` matrices ``Sigma_W``
and ``Sigma_B``, a per-class loop for the means, the pseudo-inverse of ``Sigma_B`` from its
eigendecomposition, pairwise distances for the nearest class centre. They share no code with the
kernels or with :mod:`pfc_fast.metrics`, and are meant for D up to a few thousand. Degenerate
geometry gives the values of docs/spec.md section 2, "Degenerate cases" (cosines with a zero vector
0, a cdnv term of equal means inf, ...), not NaN.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ._inputs import TensorLike


def _as_features(feats: TensorLike, pooling: str) -> torch.Tensor:
    feats = torch.as_tensor(feats).detach().to(torch.float64)
    if feats.dim() > 2:
        feats = feats.mean(dim=tuple(range(2, feats.dim()))) if pooling == "gap" else feats.flatten(1)
    return feats


def _pinv(matrix: torch.Tensor, rank: int, num_classes: int) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD matrix of rank at most ``rank`` from its
    eigendecomposition: the ``rank`` largest eigenvalues, less those below ``(K - 1) eps`` times
    the largest (docs/spec.md section 3, ``K = num_classes``, whatever the size of the matrix) (written here, apart from pfc_fast.metrics, so that the tests compare two
    independent implementations)."""
    evals, evecs = torch.linalg.eigh(matrix)  # ascending
    size = matrix.shape[0]
    cut = (num_classes - 1) * torch.finfo(matrix.dtype).eps
    keep = (evals > cut * evals.max()) & (torch.arange(size) >= size - rank)
    return evecs[:, keep] @ torch.diag(1.0 / evals[keep]) @ evecs[:, keep].T


def _class_means(feats: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    return torch.stack([feats[labels == c].mean(0) for c in classes])


def _cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    """``u . v / (||u|| ||v||)``, 0 where either is the zero vector (docs/spec.md section 2, "Degenerate cases")."""
    nu, nv = float(torch.linalg.vector_norm(u)), float(torch.linalg.vector_norm(v))
    return 0.0 if nu == 0.0 or nv == 0.0 else float(u @ v) / (nu * nv)


def _variation(values: Sequence[float]) -> float:
    """``std / mean`` (ddof = 1), ``inf`` for a mean of 0 (docs/spec.md section 2, "Degenerate cases")."""
    series = torch.tensor(values, dtype=torch.float64)
    return math.inf if float(series.mean()) == 0.0 else float(series.std() / series.mean())


def nc_metrics(feats: TensorLike, labels: TensorLike, num_classes: Optional[int] = None,
               classifier: Optional[TensorLike] = None, bias: Optional[TensorLike] = None,
               predictions: Optional[TensorLike] = None, global_mean: str = "unweighted",
               pooling: str = "flatten", ood_feats: Optional[TensorLike] = None) -> Dict[str, Any]:
    """The metrics of docs/spec.md section 2 as a dict, computed directly in float64."""
    feats = _as_features(feats, pooling)
    labels = torch.as_tensor(labels).to(feats.device).long()
    num_samples, dim = feats.shape
    total = int(labels.max()) + 1 if num_classes is None else num_classes
    counts = torch.bincount(labels, minlength=total)
    classes = [c for c in range(total) if counts[c] > 0]
    k = len(classes)
    means = _class_means(feats, labels, classes)                      # (K, D)
    global_mu = feats.mean(0) if global_mean == "weighted" else means.mean(0)
    m = (means - global_mu).T                                         # (D, K)

    full_means = torch.zeros(total, dim, dtype=torch.float64, device=feats.device)
    full_means[classes] = means
    residuals = feats - full_means[labels]
    sigma_w = residuals.T @ residuals / num_samples
    sigma_b = m @ m.T / k
    sigma_b_pinv = _pinv(sigma_b, rank=min(k - 1, dim), num_classes=k)

    variances = [float(((feats[labels == c] - means[j]) ** 2).sum(1).mean()) for j, c in enumerate(classes)]
    squared_distances = [[float(((means[a] - means[b]) ** 2).sum()) for b in range(k)] for a in range(k)]
    cdnv_terms = [  # two equal means: inf (their classes cannot be told apart)
        (variances[a] + variances[b]) / (2.0 * squared_distances[a][b]) if squared_distances[a][b] > 0 else math.inf
        for a in range(k) for b in range(k) if a != b
    ]
    norms = m.norm(dim=0)
    # centred means within rounding of 0 (64 eps times the largest class mean) have no direction: zeroed
    directed = m * (norms > 64 * torch.finfo(torch.float64).eps * float(means.norm(dim=1).max()))
    cosines = [_cosine(directed[:, a], directed[:, b]) for a in range(k) for b in range(k) if a != b]
    etf = (torch.eye(k, dtype=torch.float64) - torch.ones(k, k, dtype=torch.float64) / k) / (k - 1) ** 0.5
    gram = (m.T @ m).cpu()

    unit = torch.stack([u / u.norm() if bool(u.any()) else u for u in directed.T])  # (K, D); 0 without direction
    first, second = torch.triu_indices(k, k, 1)
    pair_distances = torch.linalg.vector_norm(unit[first] - unit[second], dim=1)
    log_kernel = -torch.log(pair_distances)                           # Liu et al. 2023, log kernel; inf at 0
    riesz: Optional[float] = None  # D = 1: none
    if dim == 2:
        riesz = 0.0  # the kernel d^0 = 1, also at d = 0
    elif dim > 2:  # log of the mean of d^-(D-2), a log-sum-exp (the terms under- or overflow for large D)
        riesz = float(torch.logsumexp(-(dim - 2) * torch.log(pair_distances), 0)) - math.log(len(pair_distances))

    distances = torch.cdist(feats, means, compute_mode="donot_use_mm_for_euclid_dist")  # term by term: exact ties
    nearest = torch.tensor(classes, device=feats.device)[distances.argmin(1)]  # first minimum: lowest index
    result = {
        "nc1": float(torch.trace(sigma_w @ sigma_b_pinv)) / k,
        "nc1_quotient": float(torch.trace(sigma_w) / torch.trace(sigma_b)),
        "cdnv": sum(cdnv_terms) / len(cdnv_terms),
        "nc2_equinorm": float(norms.std() / norms.mean()),
        "nc2_equiangle": sum(abs(c + 1.0 / (k - 1)) for c in cosines) / len(cosines),
        "nc2_etf": float(torch.linalg.norm(gram / torch.linalg.norm(gram) - etf)),
        "gnc2_log": float(log_kernel.mean()),
        "gnc2_log_var": (float(((log_kernel - log_kernel.mean()) ** 2).mean())
                         if bool(torch.isfinite(log_kernel).all()) else math.inf),  # inf - inf: the variance is inf
        "gnc2_riesz_log": riesz,
        "nc3": None,
        "nc3_etf": None,
        "nc3_uniform": None,
        "nc4": None,
        "nc5": None,
        "ncc_accuracy": float((nearest == labels).double().mean()),
        "within_trace": float(torch.trace(sigma_w)),
        "between_trace": float(torch.trace(sigma_b)),
        "num_samples": num_samples,
        "class_counts": counts.tolist(),
        "num_classes": k,
        "dim": dim,
    }
    if classifier is not None:
        weight = torch.as_tensor(classifier).detach().to(feats.device, torch.float64)
        w_present = weight[classes]
        result["nc3"] = float(torch.linalg.norm(w_present.T / torch.linalg.norm(w_present) - m / torch.linalg.norm(m)) ** 2)
        wm = (w_present @ m).cpu()
        wm_unit = wm / torch.linalg.norm(wm) if bool(wm.any()) else wm  # W M = 0: the zero matrix
        result["nc3_etf"] = float(torch.linalg.norm(wm_unit - etf))
        result["nc3_uniform"] = _variation([_cosine(w_present[j], directed[:, j]) for j in range(k)])  # cos(w_c, m_c)
        offset = 0.0 if bias is None else torch.as_tensor(bias).detach().to(feats.device, torch.float64)
        decided = (feats @ weight.T + offset).argmax(1)
    else:
        decided = None
    if predictions is not None:
        decided = torch.as_tensor(predictions).to(feats.device).long()
    if decided is not None:
        result["nc4"] = float((nearest != decided).double().mean())
    if ood_feats is not None:
        ood_direction = _as_features(ood_feats, pooling).to(feats.device).mean(0) - global_mu
        result["nc5"] = sum(abs(_cosine(directed[:, j], ood_direction)) for j in range(k)) / k
    return result


def nc1_projection(feats: TensorLike, labels: TensorLike) -> float:
    """``nc1`` through the projection identity ``Tr(Sigma_W Sigma_B^+)/K = Tr(G^+ A G^+)``.

    ``G = M^T M`` and ``A = (1/N) sum_i z_i z_i^T`` with ``z_i = M^T (h_i - mu_{y_i})``, all explicit
    float64 tensors: the check of the kernels for D too large for a ``D x D`` matrix.
    """
    feats = _as_features(feats, "flatten")
    labels = torch.as_tensor(labels).to(feats.device).long()
    classes = torch.unique(labels).tolist()
    means = _class_means(feats, labels, classes)
    m = (means - means.mean(0)).T
    full_means = torch.zeros(max(classes) + 1, feats.shape[1], dtype=torch.float64, device=feats.device)
    full_means[classes] = means
    z = (feats - full_means[labels]) @ m
    a = z.T @ z / feats.shape[0]
    g_pinv = _pinv(m.T @ m, rank=min(len(classes) - 1, feats.shape[1]), num_classes=len(classes))
    return float(torch.trace(g_pinv @ a @ g_pinv))


def sinkhorn(x: Optional[TensorLike] = None, y: Optional[TensorLike] = None, a: Optional[TensorLike] = None,
             b: Optional[TensorLike] = None, eps: float = 0.05, cost: Optional[TensorLike] = None,
             max_iter: int = 1000, tol: float = 1e-6) -> Dict[str, Any]:
    """Plain log-domain Sinkhorn in float64 with an explicit cost matrix (docs/spec.md section 4).

    Same update order as :func:`pfc_fast.sinkhorn` (f from g = 0, then g), the marginal error
    ``||P 1 - a||_1`` checked after every g update. Returns a dict with ``f``, ``g``, ``plan``,
    ``cost``, ``value``, ``n_iter``, ``marginal_error``.
    """
    if cost is None:
        x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
        cost = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    cost = torch.as_tensor(cost).double()
    n, m = cost.shape
    a = torch.full((n,), 1.0 / n, dtype=torch.float64) if a is None else torch.as_tensor(a).double()
    b = torch.full((m,), 1.0 / m, dtype=torch.float64) if b is None else torch.as_tensor(b).double()
    log_a, log_b = a.log(), b.log()
    g = torch.zeros(m, dtype=torch.float64)
    for n_iter in range(1, max_iter + 1):
        f = -eps * torch.logsumexp(log_b[None, :] + (g[None, :] - cost) / eps, dim=1)
        g = -eps * torch.logsumexp(log_a[:, None] + (f[:, None] - cost) / eps, dim=0)
        plan = torch.exp(log_a[:, None] + log_b[None, :] + (f[:, None] + g[None, :] - cost) / eps)
        error = float((plan.sum(1) - a).abs().sum())
        if error < tol:
            break
    return {"f": f, "g": g, "plan": plan, "cost": float((plan * cost).sum()),
            "value": float((a * f).sum() + (b * g).sum()), "n_iter": n_iter, "marginal_error": error}


def sinkhorn_scaling_step(kernel: torch.Tensor, u: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                          b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stabilised-scaling iteration in float64, ``pfc_fast::sinkhorn_scaling_step`` (csrc/schemas.h).

    With ``K (B, N, M)`` and the plan ``P = diag(a u) K diag(b v)``: ``s = K (b v)``, ``u' = 1 / s``,
    ``v' = 1 / K^T (a u')``; status ``(B, 2)``: ``||P 1 - a||_1 = sum_i a_i |u_i s_i - 1|`` before the
    step, and ``max |log2|`` of ``u'`` and ``v'`` (``inf`` where one is 0, infinite or NaN).
    """
    kernel, u, v, a, b = (t.double() for t in (kernel, u, v, a, b))
    sums = (kernel @ (b * v).unsqueeze(-1)).squeeze(-1)
    new_u = 1.0 / sums
    new_v = 1.0 / (kernel.transpose(1, 2) @ (a * new_u).unsqueeze(-1)).squeeze(-1)
    error = (a * (u * sums - 1.0).abs()).sum(-1)
    scalings = torch.cat([new_u, new_v], dim=1)
    usable = ((scalings > 0) & torch.isfinite(scalings)).all(1)
    spread = torch.where(usable, scalings.log2().abs().amax(1), torch.full_like(error, math.inf))
    return new_u, new_v, torch.stack([error, spread], dim=1)
