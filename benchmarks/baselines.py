"""The baselines pfc_fast is timed against: neural-collapse metrics the way published code computes
them, in pure PyTorch, and entropic OT by POT and by a plain PyTorch loop.

Neural collapse (definitions: ``docs/spec.md`` section 2; every baseline works through the
features in batches of ``batch_size`` rows, as the published code does through a data loader,
accumulates in float64 like pfc_fast, and assumes every class occurs, as that code does):

- :func:`papyan_nc_metrics`, the code of Papyan, Han & Donoho (PNAS 2020, "Prevalence of neural
  collapse during the terminal phase of deep learning training"): per-class loops within every
  batch, ``Sigma_W = (1/N) sum_batches sum_c sum_{i in c} (h_i - mu_c)(h_i - mu_c)^T`` formed as a
  ``(n_c, D, D)`` tensor of outer products summed over its first axis, ``nc1 = Tr(Sigma_W
  Sigma_B^+) / K`` with ``Sigma_B = (1/K) sum_c (mu_c - mu_G)(mu_c - mu_G)^T``. Their
  nearest-class-centre loop over single samples is replaced by one ``cdist`` per class and batch
  (faster than theirs), their ``scipy.sparse.linalg.svds`` by ``torch.linalg.pinv``.
- :func:`published_nc_metrics` (features in memory) and :func:`published_nc_metrics_stream`
  (batches made on the fly), Wu & Papyan's ``neural-collapse`` package and the code of Zhu et
  al. (2021): ``Sigma_W = (1/N) sum_batches (X - M[y])^T (X - M[y])``, one GEMM per batch, and
  the pseudo-inverse of ``Sigma_B``; in float64 (as pfc_fast) or, as that package by default, in
  float32.

These are re-implementations of the published algorithms, not the published code itself.

Optimal transport (docs/spec.md section 4; each is given its cost matrix, computed before the timing):

- :func:`pot_sinkhorn_log`: POT's ``ot.bregman.sinkhorn_log`` (log domain, like pfc_fast);
- :func:`pot_sinkhorn`: POT's ``ot.sinkhorn`` (Sinkhorn-Knopp on the kernel ``exp(-C/eps)``:
  two matrix-vector products per iteration, and no log-sum-exp, so it underflows for small eps);
- :func:`torch_sinkhorn_log`: the log-domain iterations of pfc_fast written as a plain PyTorch
  loop, ``f_i = -eps log sum_j b_j exp((g_j - C_ij)/eps)`` then ``g`` likewise, from ``g = 0``.

To a tolerance (the time-to-tolerance table), each with its own stopping rule:

- :func:`pot_to_tolerance`: POT's ``sinkhorn``, ``sinkhorn_log`` or ``sinkhorn_stabilized`` with
  a ``stopThr`` (POT's rule: the 2-norm of a marginal's violation, checked every 10 iterations,
  every 20 by ``sinkhorn_stabilized``, which is given ``tau`` by ``POT_TAU`` since its default
  never stops once N >= 1000); returns the plan, whose 1-norm marginal errors :func:`plan_marginal_error` measures;
- :func:`geomloss_potentials`: GeomLoss's ``SamplesLoss("sinkhorn", backend="tensorized")``, which
  anneals eps (``scaling`` per step) instead of testing a tolerance; for ``C = ||x - y||^2`` and
  ``eps`` its problem is ``p = 2`` (cost ``||x - y||^2 / 2``) at ``blur = sqrt(eps / 2)``, its
  potentials half of pfc_fast's.

``tests/test_bench_baselines.py`` checks that each computes the numbers of
:mod:`pfc_fast.reference`, so no speed-up is measured against a wrong baseline.
"""
import torch

try:
    import ot
except ImportError:  # the GPU machine has POT only when benchmarks/wheels is carried along
    ot = None
try:
    import geomloss
except ImportError:
    geomloss = None


def _batches(feats, labels, batch_size, dtype=torch.float64):
    for start in range(0, feats.shape[0], batch_size):
        yield feats[start:start + batch_size].to(dtype), labels[start:start + batch_size]


def _nc1(sigma_w, means, num_classes):
    """``Tr(Sigma_W Sigma_B^+) / K`` and ``Sigma_B``, with torch's default cut-off (``size * eps``
    of the dtype), the convention of pfc_fast's default."""
    centred = means - means.mean(0)
    sigma_b = centred.T @ centred / num_classes
    pinv = torch.linalg.pinv(sigma_b, hermitian=True)
    return torch.trace(sigma_w @ pinv) / num_classes, sigma_b, centred


def papyan_nc_metrics(feats, labels, num_classes, batch_size=1024):
    """nc1, nc2_equinorm, nc2_equiangle and ncc_accuracy as Papyan et al. (2020) compute them.

    Per-class loops in every batch; ``Sigma_W`` from ``(n_c, D, D)`` outer products (see the module
    docstring). Memory ``(max n_c in a batch + a few) * D^2`` float64 values.
    """
    num_samples, dim = feats.shape
    device = feats.device
    means = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    counts = [0] * num_classes
    for h, y in _batches(feats, labels, batch_size):  # pass 1: class means
        for c in range(num_classes):
            idxs = (y == c).nonzero(as_tuple=True)[0]
            if len(idxs) == 0:
                continue
            means[c] += h[idxs].sum(0)
            counts[c] += len(idxs)
    means /= torch.tensor(counts, dtype=torch.float64, device=device)[:, None]
    sigma_w = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    correct = 0
    for h, y in _batches(feats, labels, batch_size):  # pass 2: outer products, NCC
        for c in range(num_classes):
            idxs = (y == c).nonzero(as_tuple=True)[0]
            if len(idxs) == 0:
                continue
            h_c = h[idxs]
            z = h_c - means[c].unsqueeze(0)
            sigma_w += torch.matmul(z.unsqueeze(-1), z.unsqueeze(1)).sum(0)
            correct += int((torch.cdist(h_c, means).argmin(1) == c).sum())
    sigma_w /= num_samples
    nc1, _, centred = _nc1(sigma_w, means, num_classes)
    norms = centred.norm(dim=1)
    cosines = centred @ centred.T / (norms[:, None] * norms[None, :])
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=device)
    return {
        "nc1": float(nc1),
        "nc2_equinorm": float(norms.std() / norms.mean()),
        "nc2_equiangle": float((cosines[off_diagonal] + 1.0 / (num_classes - 1)).abs().mean()),
        "ncc_accuracy": correct / num_samples,
    }


def published_nc_metrics(feats, labels, num_classes, batch_size=4096, dtype=torch.float64):
    """nc1, nc1_quotient, nc2_etf and ncc_accuracy by the algorithm of Wu & Papyan's package, on
    features in memory read in batches of ``batch_size`` rows (:func:`published_nc_metrics_stream`)."""
    return published_nc_metrics_stream(lambda: _batches(feats, labels, batch_size), num_classes, feats.shape[1],
                                       feats.device, dtype)


def published_nc_metrics_stream(batches, num_classes, dim, device, dtype=torch.float64):
    """The algorithm of Wu & Papyan's package (its accumulators) on a stream: ``batches()`` yields
    ``(x, y)`` batches, the same ones each time it is called (once per pass).

    Pass 1: the class sums; pass 2: ``Sigma_W = (1/N) sum_batches (X - M[y])^T (X - M[y])``, one GEMM
    per batch, and the NCC decisions by ``cdist``; then ``pinv(Sigma_B)``; all in ``dtype``: float64
    by default (this re-implementation accumulates in float64, as pfc_fast does), float32 for the
    package's own default accumulators. Memory about ``7 D^2`` values.
    """
    sums = torch.zeros(num_classes, dim, dtype=dtype, device=device)
    counts = torch.zeros(num_classes, dtype=dtype, device=device)
    for x, y in batches():  # pass 1: class means
        sums.index_add_(0, y, x.to(dtype))
        counts += torch.bincount(y, minlength=num_classes).to(dtype)
    means = sums / counts[:, None]
    num_samples = int(counts.sum())
    sigma_w = torch.zeros(dim, dim, dtype=dtype, device=device)
    correct = 0
    for x, y in batches():  # pass 2: within-class covariance, one GEMM per batch, and NCC decisions
        x = x.to(dtype)
        centred = x - means[y]
        sigma_w += centred.T @ centred
        correct += int((torch.cdist(x, means).argmin(1) == y).sum())
    sigma_w /= num_samples
    nc1, sigma_b, centred = _nc1(sigma_w, means, num_classes)
    gram = centred @ centred.T
    etf = (torch.eye(num_classes, dtype=dtype, device=device) - 1.0 / num_classes) / (num_classes - 1) ** 0.5
    return {
        "nc1": float(nc1),
        "nc1_quotient": float(torch.trace(sigma_w) / torch.trace(sigma_b)),
        "nc2_etf": float(torch.linalg.norm(gram / torch.linalg.norm(gram) - etf)),
        "ncc_accuracy": correct / num_samples,
    }


def _uniform(cost, a, b):
    """The weights ``a (..., N)``, ``b (..., M)``, uniform where not given, in ``cost``'s dtype."""
    n, m = cost.shape[-2:]
    if a is None:
        a = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device)
    if b is None:
        b = torch.full((m,), 1.0 / m, dtype=cost.dtype, device=cost.device)
    return a, b


def torch_sinkhorn_log(cost, eps, n_iter, a=None, b=None):
    """``n_iter`` log-domain Sinkhorn iterations in plain PyTorch; returns the potentials ``(f, g)``.

    ``cost (N, M)`` or a batch ``(B, N, M)`` (then ``a (B, N)``, ``b (B, M)`` or uniform). Same
    updates and order as :func:`pfc_fast.sinkhorn` and :func:`pfc_fast.reference.sinkhorn`
    (f first, from ``g = 0``), in the dtype of ``cost``, no stopping test.
    """
    a, b = _uniform(cost, a, b)
    log_a, log_b = a.log(), b.log()
    g = torch.zeros(cost.shape[:-2] + cost.shape[-1:], dtype=cost.dtype, device=cost.device)
    for _ in range(n_iter):
        f = -eps * torch.logsumexp(log_b.unsqueeze(-2) + (g.unsqueeze(-2) - cost) / eps, dim=-1)
        g = -eps * torch.logsumexp(log_a.unsqueeze(-1) + (f.unsqueeze(-1) - cost) / eps, dim=-2)
    return f, g


def _pot():
    if ot is None:
        raise RuntimeError("POT is not installed (pip install pot; the GPU machine needs benchmarks/wheels)")
    return ot


def pot_sinkhorn_log(cost, eps, n_iter, a=None, b=None):
    """POT's ``ot.bregman.sinkhorn_log`` for ``n_iter`` iterations (``stopThr=0``); returns the plan."""
    a, b = _uniform(cost, a, b)
    return _pot().bregman.sinkhorn_log(a, b, cost, eps, numItermax=n_iter, stopThr=0.0, warn=False)


def pot_sinkhorn(cost, eps, n_iter, a=None, b=None):
    """POT's ``ot.sinkhorn`` (Sinkhorn-Knopp) for ``n_iter`` iterations (``stopThr=0``); returns the plan."""
    a, b = _uniform(cost, a, b)
    return _pot().sinkhorn(a, b, cost, eps, method="sinkhorn", numItermax=n_iter, stopThr=0.0, warn=False)


#: POT's ``sinkhorn_stabilized`` absorbs its scalings where one exceeds ``tau`` and then restarts
#: from ``u = 1/N``, ``v = 1/M``, so that the next ``v`` is about ``N``: with its default ``tau =
#: 1e3`` it absorbs at every iteration once ``N >= 1000``, its error stays at that of a plan of mass
#: ``1/(N M)`` and it never stops. It is given ``tau = POT_TAU * max(N, M)`` (the default at N = 1).
POT_TAU = 1e3


def pot_to_tolerance(cost, eps, stop, max_iter, method):
    """POT's ``ot.sinkhorn(method=method)`` with ``stopThr=stop``, at most ``max_iter`` iterations
    (``sinkhorn_stabilized`` with ``tau`` by ``POT_TAU``); returns ``(plan, iterations)`` (NaN in the
    plan where the method broke down)."""
    a, b = _uniform(cost, None, None)
    extra = {"tau": POT_TAU * max(cost.shape[-2:])} if method == "sinkhorn_stabilized" else {}
    plan, log = _pot().sinkhorn(a, b, cost, eps, method=method, numItermax=max_iter, stopThr=stop, warn=False,
                                log=True, **extra)
    return plan, 1 + int(log["niter"] if "niter" in log else log["n_iter"])  # POT logs the last loop index


def plan_marginal_error(plan):
    """``max(||P 1 - a||_1, ||P^T 1 - b||_1)`` of a plan of uniform marginals, in float64 (NaN
    where the plan holds NaN or Inf)."""
    plan = torch.as_tensor(plan)
    n, m = plan.shape[-2:]
    rows = (plan.sum(-1, dtype=torch.float64) - 1.0 / n).abs().sum(-1)
    cols = (plan.sum(-2, dtype=torch.float64) - 1.0 / m).abs().sum(-1)
    error = torch.maximum(rows, cols)
    return float(error) if bool(torch.isfinite(plan).all()) else float("nan")


def geomloss_potentials(x, y, eps, scaling):
    """GeomLoss's tensorized Sinkhorn for ``C = ||x - y||^2`` at ``eps`` (uniform weights, no
    debiasing), with eps annealed by ``scaling``; returns pfc_fast's potentials ``(f, g)``."""
    if geomloss is None:
        raise RuntimeError("GeomLoss is not installed (pip install geomloss)")
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=(eps / 2) ** 0.5, scaling=scaling, debias=False,
                                potentials=True, backend="tensorized")
    n, m = x.shape[-2], y.shape[-2]
    a = torch.full((1, n), 1.0 / n, dtype=x.dtype, device=x.device)
    b = torch.full((1, m), 1.0 / m, dtype=x.dtype, device=x.device)
    f, g = loss(a, x.unsqueeze(0), b, y.unsqueeze(0))
    return 2 * f[0], 2 * g[0]


def potentials_marginal_error(cost, f, g, eps, chunk_rows=256):
    """:func:`plan_marginal_error` of the plan ``exp((f_i + g_j - C_ij) / eps) / (N M)`` of
    potentials, formed in float64 a chunk of rows at a time."""
    cost, f, g = (torch.as_tensor(t).double() for t in (cost, f, g))
    n, m = cost.shape
    rows, cols = 0.0, torch.zeros(m, dtype=torch.float64, device=cost.device)
    for start in range(0, n, chunk_rows):
        part = torch.exp((f[start:start + chunk_rows, None] + g[None] - cost[start:start + chunk_rows]) / eps) / (n * m)
        rows += float((part.sum(1) - 1.0 / n).abs().sum())
        cols += part.sum(0)
    error = max(rows, float((cols - 1.0 / m).abs().sum()))
    return error if torch.isfinite(f).all() and torch.isfinite(g).all() else float("nan")

