"""Exact neural-collapse metrics in two fused passes, without a ``D x D`` matrix of the features.

Definitions: ``docs/spec.md`` section 2 (README "Metrics"). Method (section 3): the first
pass gives the class sums and counts, hence the centred class means ``M = [mu_c - mu_G]`` (``K x D``
here, rows) and an orthonormal basis ``q_j`` of the directions of ``Sigma_B = M^T M / K`` that its
pseudo-inverse keeps, with the eigenvalues ``lambda_j`` of ``M^T M`` along them (from the smaller of
``G = M M^T`` and ``M^T M``). The second gives, with ``r_i = h_i - mu_{y_i}`` formed in float64,

    basis_sq[j] = sum_i (q_j . r_i)^2,   class_sq[c] = sum_{y_i = c} ||r_i||^2,

and the nearest-class-centre decisions. Then

    nc1 = Tr(Sigma_W Sigma_B^+) / K = (1/N) sum_j basis_sq[j] / lambda_j

and every other metric is ``K x K`` work. The second pass costs ``O(N D (K + min(K, D)))``, memory
is ``O(K D + K^2)`` whatever ``N``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _inputs, _ops
from ._inputs import TensorLike

#: The cut-off of the first releases: eigenvalues of G below this fraction of the largest were
#: treated as 0 (``pinv_rtol=LEGACY_PINV_RTOL`` restores it). It drops real between-class directions
#: of nearly overlapping classes, so the default is now float64's noise level (docs/spec.md section 3).
LEGACY_PINV_RTOL = 1e-10

#: float64 features of magnitude in this range have products that neither underflow nor overflow
#: in the passes' sums; outside it they are rescaled exactly, by a power of two, to magnitude ~1.
_SAFE_MAGNITUDE = (2.0 ** -240, 2.0 ** 240)

#: Pairs of class means closer than this fraction of their squared norms get their squared distance
#: from the difference of the means, not from the Gram matrix (whose expansion cancels there).
_DIRECT_DISTANCE_RATIO = 1e-3

#: A centred class mean ``mu_c - mu_G`` no longer than this many float64 eps times the largest
#: ``||mu_c||`` is at the global mean to rounding: it has no direction (docs/spec.md section 2,
#: "Degenerate cases"); when every one is, all class means are equal and the metrics undefined.
_MEAN_ROUNDING = 64


class FewSamplesWarning(UserWarning):
    """The features have at least as many dimensions as there are samples (``D >= N``): there the
    class means of any labelling, random ones included, separate, so the raw metrics look collapsed;
    compare them with the permutation null (``null_permutations``)."""


#: The fields of :class:`NCMetrics` that are counts of the data, not metrics (left out of the null).
_COUNT_FIELDS = ("num_samples", "class_counts", "num_classes", "dim", "per_class", "null_mean", "null_std")


@dataclass(frozen=True)
class NCClassStatistics:
    """Per-class statistics beside the scalar metrics (``nc_metrics(..., per_class=True)``): row
    ``j`` of each is class ``classes[j]`` (the classes present), float64 CPU tensors.

    ``mean_norms[j] = ||mu_c - mu_G||``, ``within_variances[j] = (1/n_c) sum_{y_i = c} ||h_i - mu_c||^2``,
    ``cdnv[a, b] = (var_a + var_b) / (2 ||mu_a - mu_b||^2)`` (Galanti et al. 2022; 0 on the diagonal,
    ``inf`` for two equal means; the scalar ``cdnv`` is the mean of its off-diagonal entries).
    """

    classes: List[int]
    mean_norms: torch.Tensor
    within_variances: torch.Tensor
    cdnv: torch.Tensor

    def to_dict(self) -> Dict[str, Any]:
        """The statistics as a JSON-serialisable dict (nested lists)."""
        return {"classes": list(self.classes), "mean_norms": self.mean_norms.tolist(),
                "within_variances": self.within_variances.tolist(), "cdnv": self.cdnv.tolist()}


@dataclass(frozen=True)
class NCMetrics:
    """Neural-collapse metrics of one set of features (docs/spec.md section 2; lower = more collapsed).

    ``num_classes`` is the number of classes present (the ``K`` of every formula);
    ``class_counts`` has one entry per class index ``0..num_classes_total-1``, zeros included.
    Fields that need a classifier (``nc3``, ``nc3_etf``, ``nc3_uniform``), a decision (``nc4``) or
    out-of-distribution features (``nc5``) are ``None`` without them; ``gnc2_riesz_log`` is ``None``
    for ``D = 1``. ``per_class`` (:class:`NCClassStatistics`) is set only when asked for, and is
    not part of :meth:`to_dict`.

    ``null_mean`` and ``null_std`` (``None`` unless ``null_permutations > 0``): ``{metric: value}``,
    the mean and the standard deviation (ddof 1; 0 for one permutation) of each metric over ``R``
    permutations of the labels (class counts kept): what these features give for labels that
    carry no information (docs/spec.md section 2, "The permutation null"). The counts
    (``num_samples``, ``num_classes``, ``dim``) and metrics that are ``None`` are left out.

    Degenerate geometry (docs/spec.md section 2, "Degenerate cases") gives these values, never NaN:
    a centred class mean ``m_c = mu_c - mu_G`` at 0 (to rounding: ``||m_c|| <= 64 eps max ||mu_c||``)
    has no direction, so its cosines (``nc2_equiangle``, ``nc3_uniform``, ``nc5``) are 0 and its unit
    vector ``u_c`` is 0 (``||u_c - u_c'|| = 1`` in ``gnc2_*``); two equal class means give
    ``cdnv = inf`` (their term ``(var_a + var_b) / (2 * 0)``, also for ``var = 0``), and two equal
    ``u_c`` (equal means; two means on one side in ``D = 1``) ``gnc2_log = gnc2_log_var = inf`` and, for
    ``D >= 3``, ``gnc2_riesz_log = inf`` (for ``D = 2`` the kernel is ``d^0 = 1``: 0); a classifier
    row ``w_c = 0`` has cosine 0; ``nc3_uniform = inf`` where the mean of its cosines is 0, and
    ``nc3_etf = 1`` (the zero matrix against the unit-norm ETF) where ``W M = 0``. All class means
    equal (to rounding) and classifier rows of the classes present all zero raise ``ValueError``.
    """

    nc1: float
    nc1_quotient: float
    cdnv: float
    nc2_equinorm: float
    nc2_equiangle: float
    nc2_etf: float
    gnc2_log: float
    gnc2_log_var: float
    gnc2_riesz_log: Optional[float]
    nc3: Optional[float]
    nc3_etf: Optional[float]
    nc3_uniform: Optional[float]
    nc4: Optional[float]
    nc5: Optional[float]
    ncc_accuracy: float
    within_trace: float
    between_trace: float
    num_samples: int
    class_counts: List[int]
    num_classes: int
    dim: int
    per_class: Optional[NCClassStatistics] = dataclasses.field(default=None, repr=False, compare=False)
    null_mean: Optional[Dict[str, float]] = dataclasses.field(default=None, compare=False)
    null_std: Optional[Dict[str, float]] = dataclasses.field(default=None, compare=False)

    #: The metrics :meth:`__repr__` shows (those that are not ``None``).
    _REPR_FIELDS = ("nc1", "nc2_etf", "nc3", "nc3_etf", "nc4", "nc5")

    def __repr__(self) -> str:
        """One line: the PFC metrics that are set, to 4 significant digits, then K, D and N."""
        shown = [f"{name}={value:.4g}" for name in self._REPR_FIELDS
                 if (value := getattr(self, name)) is not None]
        return f"NCMetrics({', '.join(shown)}, K={self.num_classes}, D={self.dim}, N={self.num_samples})"

    def to_dict(self) -> Dict[str, Any]:
        """The scalar metrics as a JSON-serialisable dict (``per_class`` has its own ``to_dict``)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if field.name != "per_class"}


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """``2^exponent`` exactly, as float64, for integer exponents (0-d) in ``[-1038, 1007]``:
    ``2^(exponent + 16)``, of the normal range, made from its exponent bits, times ``2^-16``."""
    return torch.bitwise_left_shift(exponent.to(torch.int64) + (1023 + 16), 52).view(torch.float64) * 2.0 ** -16


def _power_of_two_scale(magnitude: torch.Tensor) -> torch.Tensor:
    """1 for features whose largest magnitude (0-d float64) is in ``_SAFE_MAGNITUDE`` (or 0), else
    ``2^-e`` where ``magnitude = m 2^e`` with ``0.5 <= m < 1``: the exact rescaling to a magnitude
    just below 1 (0-d float64; on the device, no host sync)."""
    exponent = torch.frexp(magnitude).exponent  # 0 for 0
    safe = (magnitude >= _SAFE_MAGNITUDE[0]) & (magnitude <= _SAFE_MAGNITUDE[1])
    # subnormal input: up to 2^1000 (~2^-74 after)
    return _power_of_two(torch.where(safe, 0, -exponent).clamp_max(1000))


def _is_one(value: torch.Tensor) -> bool:
    """Whether a multiplication by ``value`` (0-d) can be skipped: in eager mode where it is 1 (one
    host read); never under ``torch.compile``, which reads no host values (multiplying by 1 is exact)."""
    return not torch.compiler.is_compiling() and bool(value == 1.0)


def _etf(k: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The simplex ETF Gram target ``(I - 11^T/K) / sqrt(K - 1)`` (unit Frobenius norm)."""
    return (torch.eye(k, dtype=dtype) - 1.0 / k) / (k - 1) ** 0.5


def default_pinv_rtol(size: int) -> float:
    """The pseudo-inverse cut-off for a ``size x size`` matrix: ``size * eps(float64)``, the
    convention of ``torch.linalg.pinv`` and ``numpy.linalg.pinv`` (eigenvalues closer to 0 than
    this fraction of the largest cannot be told from rounding)."""
    return size * torch.finfo(torch.float64).eps


@functools.lru_cache(maxsize=16)
def _uniform_complement_basis(k: int) -> torch.Tensor:
    """:func:`_complement_basis` of the uniform weights ``(1, ..., 1)`` (cached: it depends on K only)."""
    return _complement_basis(torch.ones(k, dtype=torch.float64))


def _complement_basis(null: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``(K, K - 1)`` of the vectors orthogonal to ``null (K,)``: the
    Householder reflection that maps ``e_1`` to ``null / |null|``, without its first column."""
    k = null.shape[0]
    v = null / torch.linalg.norm(null)
    v = v - torch.eye(k, 1, dtype=null.dtype).flatten()
    reflection = torch.eye(k, dtype=null.dtype)
    if float(torch.linalg.norm(v)) > 0:
        reflection -= 2.0 * torch.outer(v, v) / (v @ v)
    return reflection[:, 1:]


def _between_class_basis(centred: torch.Tensor, gram: torch.Tensor, null: Optional[torch.Tensor],
                         rtol: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis of the directions of ``Sigma_B`` that its pseudo-inverse keeps, and the
    eigenvalues of ``M^T M = K Sigma_B`` along them, from the centred means ``M`` (rows, ``K x D``)
    and their Gram matrix ``G = M M^T``; then ``Sigma_B^+ = K sum_j q_j q_j^T / lambda_j``.

    ``M^T M`` and ``G`` share their nonzero eigenvalues, and there are at most ``r = min(K - 1, D)``:
    ``null`` (the weights of the global mean; ``None``: uniform) is in the kernel of ``G`` exactly.
    The eigendecomposition is of the smaller matrix: for ``K - 1 <= D``, of ``G`` on the complement
    ``C`` of ``null`` (``C^T G C = U diag(lambda) U^T``, directions ``q_j = M^T C u_j / sqrt(lambda_j)``);
    for ``D < K - 1``, of the ``D x D`` scatter ``M^T M`` (directions: its eigenvectors). At most ``r``
    eigenvalues are kept, none below ``rtol`` times the largest (``None``: ``(K - 1)`` float64 eps).

    Returns ``(directions (r', D), eigenvalues (r',))``, ``r' <= r``.
    """
    k, dim = centred.shape
    cut = default_pinv_rtol(k - 1) if rtol is None else rtol
    if k - 1 <= dim:
        complement = (_uniform_complement_basis(k) if null is None else _complement_basis(null)).to(gram.device)
        evals, evecs = torch.linalg.eigh(complement.T @ gram @ complement)
    else:
        evals, evecs = torch.linalg.eigh(centred.T @ centred)
    values = evals.tolist()  # ascending: what is kept is a suffix
    first = max(len(values) - (k - 1), next((i for i, v in enumerate(values) if v > cut * values[-1]), len(values)))
    if k - 1 <= dim:
        directions = ((complement @ evecs[:, first:]).T @ centred) / evals[first:].sqrt().unsqueeze(1)
    else:
        directions = evecs[:, first:].T
    return directions.contiguous(), evals[first:]


def _score_error(centred: torch.Tensor, mean_coords: torch.Tensor, directions: torch.Tensor) -> float:
    """A bound on ``|s_c - m_c . r| / ||r||`` over the classes, where ``s_c = mean_coords[c] . t`` is
    the score the second pass computes from the basis coordinates ``t = directions @ r`` (csrc/schemas.h):
    the span defect ``||m_c - mean_coords[c] @ directions||`` (the part of ``m_c`` outside the basis)
    plus the rounding of the two dot products, ``(D + B) sqrt(B) eps ||mean_coords[c]||`` (Higham's
    ``gamma_n`` for the ``B`` sums of length ``D``, then one of length ``B``), doubled for the
    rounding of the defect itself and of the residuals."""
    dim, basis = centred.shape[1], directions.shape[0]
    defect = torch.linalg.vector_norm(centred - mean_coords @ directions, dim=1)
    rounding = 2.0 * (dim + basis + 8) * math.sqrt(basis) * torch.finfo(torch.float64).eps
    return float((defect + rounding * torch.linalg.vector_norm(mean_coords, dim=1)).max())


def _mean_distances(means: torch.Tensor, gram: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Squared distances ``||mu_a - mu_b||^2`` of the class means (rows of ``means``, ``K x D``),
    accurate to float64 whatever the separation for the classes in ``present`` (a ``(K,)`` mask):
    from ``gram``, the Gram matrix of the centred means, where its expansion is exact enough, from
    the differences of the means themselves where two present means nearly coincide."""
    sq = torch.diagonal(gram)
    distances = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)
    close = distances <= _DIRECT_DISTANCE_RATIO * (sq[:, None] + sq[None, :])
    close = (close & present[:, None] & present[None, :]).triu(1).nonzero()
    chunk = max(1, (1 << 24) // max(1, means.shape[1]))
    for start in range(0, close.shape[0], chunk):
        a, b = close[start:start + chunk].T
        exact = (means[a] - means[b]).pow(2).sum(1)
        distances[a, b] = exact
        distances[b, a] = exact
    return distances.fill_diagonal_(0.0)


def _off_diagonal_mean(matrix: torch.Tensor) -> float:
    k = matrix.shape[0]
    return float(matrix[~torch.eye(k, dtype=torch.bool)].mean())


def _hyperspherical_energies(unit_distances: torch.Tensor, dim: int) -> Tuple[float, float, Optional[float]]:
    """The mean and variance over the pairs ``a < b`` of the logarithmic kernel ``log(1 / d_ab)``,
    and the log of the mean Riesz ``s``-energy ``d_ab^-s``, ``s = D - 2`` (``None`` for ``D = 1``),
    of the distances ``d_ab`` of the normalised centred means (``unit_distances``: their squares).
    The Riesz mean is taken as a log-sum-exp: ``d^-(D-2)`` overflows float64 for ``D`` in the hundreds.
    A pair at distance 0 makes the log energy and its variance ``inf``, the Riesz one too for
    ``D >= 3``; for ``D = 2`` the Riesz kernel is ``d^0 = 1``, so its log mean is 0."""
    k = unit_distances.shape[0]
    a, b = torch.triu_indices(k, k, 1)
    log_distances = 0.5 * torch.log(unit_distances[a, b])
    log_kernel = -log_distances
    mean = float(log_kernel.mean())
    variance = float(((log_kernel - mean) ** 2).mean()) if math.isfinite(mean) else math.inf
    riesz = None
    if dim == 2:
        riesz = 0.0
    elif dim > 2:
        riesz = float(torch.logsumexp(-(dim - 2) * log_distances, 0)) - math.log(log_distances.numel())
    return mean, variance, riesz


def _coefficient_of_variation(values: torch.Tensor) -> float:
    """``std / mean`` (the sample standard deviation, as ``nc2_equinorm``); ``inf`` for a mean of 0."""
    mean = float(values.mean())
    return math.inf if mean == 0.0 else float(values.std()) / mean


def _metrics_from_statistics(gram_means: torch.Tensor, unit_gram: torch.Tensor, mean_distances: torch.Tensor,
                             unit_distances: torch.Tensor,
                             eigenvalues: torch.Tensor, basis_sq: torch.Tensor, class_sq: torch.Tensor,
                             counts: torch.Tensor, classes: List[int], num_samples: int, dim: int,
                             class_counts: List[int], scale: float, per_class: bool = False,
                             classifier_gram: Optional[torch.Tensor] = None, nc3: Optional[float] = None,
                             classifier_cosines: Optional[torch.Tensor] = None,
                             ood_cosines: Optional[torch.Tensor] = None,
                             correct: int = 0, disagree: Optional[int] = None) -> NCMetrics:
    """The metrics from the statistics of the present classes ``classes`` (all float64, CPU).

    gram_means = G = M M^T of the centred means, unit_gram[a, b] = cos(m_a, m_b) = u_a . u_b (the Gram
    matrix of the normalised centred means u_c, 0 for a mean without direction), mean_distances[a, b]
    = ||mu_a - mu_b||^2, unit_distances[a, b] = ||u_a - u_b||^2, eigenvalues lambda_j of M^T M
    along the basis q_j of :func:`_between_class_basis`, basis_sq[j] = sum_i (q_j . r_i)^2,
    class_sq[c] = sum ||r_i||^2, classifier_gram = W M^T (rows of the present classes),
    classifier_cosines[c] = cos(w_c, m_c), ood_cosines[c] = cos(m_c, mu_OOD - mu_G) (cosines with a
    zero vector are 0), nc3 computed on the device. The statistics are those of the features times
    ``scale`` (a power of two): only the traces and the per-class norms and variances depend on it.
    With ``Sigma_B^+ = K sum_j q_j q_j^T / lambda_j``,

        nc1 = Tr(Sigma_W Sigma_B^+) / K = (1/N) sum_j basis_sq[j] / lambda_j,
        cdnv = mean_{a != b} (var_a + var_b) / (2 ||mu_a - mu_b||^2)   (a term of equal means: inf),
        nc3_etf = || W M^T / ||W M^T|| - ETF ||   (1 for W M^T = 0: the normalised zero matrix is 0).
    """
    k = counts.shape[0]
    scaled_within, scaled_between = float(class_sq.sum()) / num_samples, float(torch.trace(gram_means)) / k
    nc1 = float((basis_sq / eigenvalues).sum()) / num_samples

    variances = class_sq / counts
    cdnv_matrix = torch.where(mean_distances > 0, (variances[:, None] + variances[None, :]) / (2.0 * mean_distances),
                              math.inf)
    cdnv = _off_diagonal_mean(cdnv_matrix)

    norms = torch.diagonal(gram_means).sqrt()
    etf = _etf(k)
    nc3_etf = None
    if classifier_gram is not None:
        length = torch.linalg.norm(classifier_gram)
        nc3_etf = float(torch.linalg.norm((classifier_gram / length if length > 0 else classifier_gram) - etf))
    gnc2_log, gnc2_log_var, gnc2_riesz_log = _hyperspherical_energies(unit_distances, dim)
    statistics = None
    if per_class:
        statistics = NCClassStatistics(classes=classes, mean_norms=norms / scale, within_variances=variances / scale ** 2,
                                       cdnv=cdnv_matrix.fill_diagonal_(0.0))
    return NCMetrics(
        nc1=nc1,
        nc1_quotient=scaled_within / scaled_between,
        cdnv=cdnv,
        nc2_equinorm=_coefficient_of_variation(norms),
        nc2_equiangle=_off_diagonal_mean((unit_gram + 1.0 / (k - 1)).abs()),
        nc2_etf=float(torch.linalg.norm(gram_means / torch.linalg.norm(gram_means) - etf)),
        gnc2_log=gnc2_log,
        gnc2_log_var=gnc2_log_var,
        gnc2_riesz_log=gnc2_riesz_log,
        nc3=nc3,
        nc3_etf=nc3_etf,
        nc3_uniform=None if classifier_cosines is None else _coefficient_of_variation(classifier_cosines),
        nc4=None if disagree is None else disagree / num_samples,
        nc5=None if ood_cosines is None else float(ood_cosines.abs().mean()),
        ncc_accuracy=correct / num_samples,
        within_trace=scaled_within / scale / scale,
        between_trace=scaled_between / scale / scale,
        num_samples=num_samples,
        class_counts=class_counts,
        num_classes=k,
        dim=dim,
        per_class=statistics,
    )


def _splitmix64(seed: int, count: int) -> List[int]:
    """``count`` pseudo-random 64-bit integers of ``seed`` (Steele, Lea & Flood's SplitMix64), in
    pure Python: the same numbers everywhere, and constants under ``torch.compile``."""
    mask, state, draws = (1 << 64) - 1, seed, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        draws.append(z ^ (z >> 31))
    return draws


class _PassTally:
    """What identifies the samples of one pass: per-class counts and a per-class fingerprint, the
    sums of ``h_i[columns] . weights`` (float64) over ``WINDOWS`` windows of ``WIDTH`` consecutive
    feature columns at fixed random places, with fixed random weights, and the sums of their
    absolute values (the fingerprint's scale).

    Two passes agree when their fingerprints differ by at most ``4 eps / sqrt(n_c)`` of the scale
    (eps of the coarsest feature dtype, ``n_c`` the class's samples; at least ``1e-12``): room for
    features recomputed by kernels that round each value differently. One sample in place of
    another moves a class's fingerprint by about ``1 / n_c`` of its scale, so it is caught for
    classes of up to about ``(4 eps)^-2`` samples (1,000 in bfloat16, 65,000 in float16, 4e12 in
    float32). Classes whose windows are all zero, or whose fingerprint overflows, are checked by
    their counts only.
    """

    WINDOWS, WIDTH = 4, 4

    def __init__(self, num_classes: int, dim: int, device: torch.device) -> None:
        # drawn in Python from a seed of D alone (no torch.Generator), so that the first batch's
        # update() traces under torch.compile; the weights are uniform in [-1, 1)
        draws = _splitmix64(0x5EED + dim, self.WINDOWS * (1 + self.WIDTH))
        width = min(self.WIDTH, dim)
        starts = [draw % (dim - width + 1) for draw in draws[:self.WINDOWS]]
        columns = sorted({start + offset for start in starts for offset in range(width)})
        self.columns = torch.tensor(columns, dtype=torch.int64, device=device)
        self.weights = torch.tensor([(draw >> 11) * 2.0 ** -52 - 1.0 for draw in draws[self.WINDOWS:][:len(columns)]],
                                    dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.fingerprint = torch.zeros(2, num_classes, dtype=torch.float64, device=device)
        self.eps = 0.0  # the precision of the coarsest feature dtype seen

    def update(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        values = feats[:, self.columns].double() @ self.weights
        self.eps = max(self.eps, torch.finfo(feats.dtype).eps)
        self.counts.index_add_(0, labels, torch.ones_like(labels))  # bincount's shape would depend on the labels
        self.fingerprint[0].index_add_(0, labels, values)
        self.fingerprint[1].index_add_(0, labels, values.abs())

    def tensors(self) -> List[torch.Tensor]:
        return [self.counts, self.fingerprint]

    def differences(self, first: _PassTally) -> Optional[str]:
        """What differs from the tally ``first`` of the first pass, in words (``None``: nothing)."""
        counts = (self.counts != first.counts).nonzero().flatten().tolist()
        if counts:
            shown = ", ".join(f"class {c}: {int(first.counts[c])} then {int(self.counts[c])}" for c in counts[:5])
            return f"the per-class sample counts differ ({shown}{', ...' if len(counts) > 5 else ''})"
        scale = first.fingerprint[1]
        rtol = (4 * max(self.eps, first.eps) / first.counts.clamp_min(1).double().sqrt()).clamp_min(1e-12)
        checked = torch.isfinite(first.fingerprint).all(0) & torch.isfinite(self.fingerprint).all(0) & (scale > 0)
        moved = (checked & ((self.fingerprint[0] - first.fingerprint[0]).abs() > rtol * scale)).nonzero()
        if moved.numel():
            classes = moved.flatten().tolist()
            return (f"the same counts but other feature values in class(es) {classes[:10]}"
                    f"{' ...' if len(classes) > 10 else ''} (per-class fingerprints differ)")
        return None


class _PermutationNull:
    """The labels of ``R`` permutations of the labels, drawn batch by batch: within batch ``b`` of
    either pass, ``R`` random permutations from a generator seeded by ``(seed, b)`` (each keeps the
    batch's class counts, hence the data's). Within one batch (``nc_metrics``) they are uniform
    permutations of all the labels; over batches, of the labels of each batch, so batches that mix
    the classes matter (:meth:`kept_warning`). The second pass must feed the first pass's batches
    in the same order: each batch's size and a signature of its labels are recorded and compared."""

    def __init__(self, permutations: int, seed: int) -> None:
        self.permutations, self.seed = permutations, seed
        self.signatures: Tuple[List[torch.Tensor], List[torch.Tensor]] = ([], [])
        self.kept: Optional[torch.Tensor] = None  # first pass: (sample, permutation) pairs keeping their label

    def labels(self, labels: torch.Tensor, pass_index: int) -> torch.Tensor:
        """``(R, B)``: the batch's labels under each permutation (``pass_index`` 0 or 1)."""
        signatures = self.signatures[pass_index]
        size = labels.shape[0]
        generator = torch.Generator().manual_seed(_splitmix64(self.seed, len(signatures) + 1)[-1] >> 1)
        order = torch.stack([torch.randperm(size, generator=generator) for _ in range(self.permutations)])
        permuted = labels[order.to(labels.device)]
        weights = torch.arange(1, size + 1, device=labels.device)
        signatures.append(torch.stack([labels.new_tensor(size), labels.sum(), (labels * weights).sum()]))
        if pass_index == 0:
            kept = (permuted == labels).sum()
            self.kept = kept if self.kept is None else self.kept + kept
        return permuted

    def check_batches(self) -> None:
        """Raises ``ValueError`` where the second pass's batches are not the first's, in order."""
        first, second = self.signatures
        if len(first) != len(second):
            raise ValueError(f"with null_permutations, the second pass must feed the first pass's batches in the "
                             f"same order; it fed {len(second)} batches, the first {len(first)}")
        if first:
            differ = (torch.stack(first) != torch.stack(second)).any(1).nonzero().flatten().tolist()
            if differ:
                raise ValueError(f"with null_permutations, the second pass must feed the first pass's batches in "
                                 f"the same order (the permutations are drawn batch by batch); batch(es) "
                                 f"{differ[:5]} differ in size or labels (a shuffling loader?)")

    def kept_warning(self, counts: torch.Tensor, name: str) -> Optional[str]:
        """A warning where the permutations kept far more labels than uniform permutations of all
        the labels would (``sum_c (n_c / N)^2`` of them): batches of few classes each."""
        if self.kept is None:
            return None
        total = float(counts.sum())
        expected = float((counts.double() / total).square().sum())
        kept = float(self.kept) / (total * self.permutations)
        if kept <= expected + 0.5 * (1.0 - expected):
            return None
        return (f"{name}: the permutation null kept {kept:.0%} of the labels in place (uniform permutations "
                f"keep {expected:.0%}): the batches hold few classes each, and labels are permuted within "
                "batches; shuffle the loader so that batches mix the classes")


class NCAccumulator:
    """Exact NC metrics of data that arrives in batches, in two passes over the same data.

    Usage (``loader`` yields the same samples in both passes, in any order)::

        acc = NCAccumulator(num_classes=10, classifier=model.fc.weight, bias=model.fc.bias)
        for x, y in loader:
            acc.update(features(x), y)            # pass 1: class sums and counts
        acc.next_pass()
        for x, y in loader:
            acc.update(features(x), y)            # pass 2: residual statistics, NCC decisions
        metrics = acc.compute()                   # NCMetrics, equal to nc_metrics on all the data

    ``nc4`` compares the nearest-class-centre decision with ``predictions`` given to the
    second-pass ``update`` (e.g. the network's own predicted classes), or else with
    ``argmax(W h + b)`` of the constructor's classifier; without either it is ``None``.
    ``update_ood(feats)`` (either pass) adds out-of-distribution features for ``nc5``;
    ``compute(per_class=True)`` adds the per-class statistics.

    ``compute()`` checks that the second pass saw the samples of the first: the per-class counts
    must be equal, and so must a per-class fingerprint of the features (sums of a fixed random
    combination of 16 feature columns, see ``_PassTally`` for its tolerance and reach); otherwise it raises a
    ``ValueError`` that says what differs. After ``compute()``, ``reset()`` starts again.
    ``pinv_rtol``: the pseudo-inverse cut-off of ``nc1`` (see :func:`nc_metrics`). A ``num_classes``
    whose statistics (``8 K (3 D + 4 K)`` bytes at least) exceed the memory free on the features'
    device is refused: by the constructor where its ``32 K^2`` bytes fit no device, else by the
    first ``update`` (in eager mode only: under ``torch.compile`` the constructor's check stands).

    ``update()`` reads no value of the data on the host (no device sync), so it compiles whole,
    first batch included: ``step = torch.compile(acc.update, fullgraph=True)`` serves both passes
    (``next_pass()``, ``compute()`` and ``update_ood()`` stay eager). It checks shapes, dtypes and
    devices at once (under ``fullgraph=True`` such an error found while tracing comes as
    ``torch._dynamo.exc.Unsupported`` quoting the ``ValueError``); the checks that need values run
    at the end of each pass, with the same messages: labels outside ``[0, num_classes)`` (their
    range over the pass) and NaN or Inf features (from the float64 class sums) of the first pass
    by ``next_pass()``, those of the second pass and ``predictions`` out of range by ``compute()``.
    Until then out-of-range indices are clamped, so that no kernel reads out of bounds. float64
    features are rescaled by a power of two on the device, exactly, as in eager mode. Compiled,
    the first and the second batch of each pass compile a graph each (the state is made by the
    first), and so does a new batch size once (then traced with a dynamic size); new accumulators
    of other data reuse the graphs (float64 features rescaled by a power of two other than 1 add
    the second pass's two). Accumulators of a second ``D`` need ``torch.compile(...,
    dynamic=False)``: with a dynamic ``D`` the pass tally's draws (seeded by ``D``) overflow
    inductor's int64 arithmetic (an ``InductorError``; a known limitation). Accumulators of another ``D``, dtype, device or options need graphs
    of their own, and ``torch._dynamo.config.recompile_limit`` (8) bounds those of ``update``
    (one function, whichever accumulator): raise it to compile several kinds.

    Under ``torch.distributed`` call ``all_reduce(group)`` at the end of each pass: it sums the
    statistics of the current pass over the ranks (and takes the range of their class indices), so
    every rank gets the global means and the global result, or the same error.

    ``null_permutations = R > 0`` adds the permutation null (``NCMetrics.null_mean``,
    ``null_std``): the metrics of ``R`` labellings that permute the labels within each batch
    (seeded by ``null_seed`` and the batch's index; class counts kept). Both passes read each
    batch once for all labellings: the first pass's kernel sums the features of the ``R + 1``
    labellings at once, the second projects them on the bases of all ``R`` labellings with one
    product. The second pass must then feed the first pass's batches in the same order (checked
    by ``compute()``), and ``update()`` draws the permutations on the host (not under
    ``torch.compile``). Batches of one class each permute nothing: a warning says so.
    ``compute()`` warns (:class:`FewSamplesWarning`) where ``D >= N``.
    """

    def __init__(self, num_classes: int, classifier: Optional[TensorLike] = None, bias: Optional[TensorLike] = None,
                 global_mean: str = "unweighted", pooling: str = "flatten", pinv_rtol: Optional[float] = None,
                 null_permutations: int = 0, null_seed: int = 0) -> None:
        self.num_classes = _inputs.positive_int(num_classes, "num_classes", minimum=2)
        self.null_permutations = _inputs.positive_int(null_permutations, "null_permutations", minimum=0)
        self.null_seed = _inputs.positive_int(null_seed, "null_seed", minimum=0)
        if self.null_seed >= 2 ** 64:
            raise ValueError(f"null_seed must be < 2**64, got {null_seed}")
        _inputs.check_choice(global_mean, "global_mean", _inputs.GLOBAL_MEANS)
        _inputs.check_choice(pooling, "pooling", _inputs.POOLINGS)
        self.global_mean = global_mean
        self.pooling = pooling
        self.pinv_rtol = None if pinv_rtol is None else _inputs.finite_number(pinv_rtol, "pinv_rtol")
        if self.pinv_rtol is not None and not self.pinv_rtol < 1.0:
            raise ValueError(f"pinv_rtol must be < 1 (a fraction of the largest eigenvalue), got {pinv_rtol!r}")
        self._weight, self._bias = _inputs.classifier_weights(classifier, bias, self.num_classes)
        # the K x K statistics alone, on the classifier's device or any; the first update() checks with D
        _inputs.class_statistics_fit(self.num_classes, [0], None if self._weight is None else self._weight.device,
                                     "feats (the K x K matrices alone, whatever D)",
                                     null_permutations=self.null_permutations)
        self._check_passes = True  # nc_metrics, which feeds one tensor to both passes, turns the check off
        self._name = "feats"  # the features in messages (PFCMonitor: "features of layer 'name'")
        self.reset()

    def reset(self) -> None:
        """Forget every batch: back to the start of the first pass (the options stay)."""
        self._pass = 1
        self._reduced = False
        self._computed = False
        self._device: Optional[torch.device] = None
        self._dim: Optional[int] = None
        self._sums: Optional[torch.Tensor] = None
        self._counts: Optional[torch.Tensor] = None
        # the largest |h| of the float64 features so far, and the power of two that every statistic
        # of the first pass is of the features times (0-d tensors; None: no float64 batch yet, scale 1)
        self._magnitude: Optional[torch.Tensor] = None
        self._scale: Optional[torch.Tensor] = None
        self._tallies: List[_PassTally] = []  # one per pass, made at the first batch
        # the labels of each pass and the predictions, checked by next_pass() and compute()
        self._labels = (_inputs.ClassIndices(self.num_classes), _inputs.ClassIndices(self.num_classes))
        self._predictions = _inputs.ClassIndices(self.num_classes, "predictions")
        self._second: Optional[_SecondPass] = None  # second-pass statistics
        self._null = _PermutationNull(self.null_permutations, self.null_seed) if self.null_permutations else None
        self._null_second: Optional[_NullSecondPass] = None  # the null's second pass (after next_pass())
        # the float64 sum of the out-of-distribution features (unscaled), then their count
        self._ood: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        """One line: ``num_classes``, the state (pass 1, pass 2, computed), the samples seen (in
        the second pass: of those of the first) and ``D`` (``None`` before the first batch)."""
        first = 0 if self._counts is None else int(self._counts.sum())
        samples = str(first)
        if self._pass == 2 and self._tallies:  # the second pass's tally counts its samples
            samples = f"{int(self._tallies[1].counts.sum())} of {first}"
        state = "computed" if self._computed else f"pass={self._pass}"
        return f"NCAccumulator(num_classes={self.num_classes}, {state}, samples={samples}, D={self._dim})"

    @property
    def current_pass(self) -> int:
        """1 or 2."""
        return self._pass

    def _batch(self, feats: TensorLike, labels: TensorLike) -> Tuple[torch.Tensor, torch.Tensor]:
        feats = _inputs.features(feats, self.pooling, name=self._name)
        if self._device is None:
            _inputs.check_classifier_device(self._weight, feats)
            if not torch.compiler.is_compiling():  # it asks the device for its free memory
                _inputs.class_statistics_fit(self.num_classes, [feats.shape[1]], feats.device,
                                             f"{self._name} (D = {feats.shape[1]})",
                                             null_permutations=self.null_permutations)
            self._device, self._dim = feats.device, feats.shape[1]
        elif feats.device != self._device:
            raise ValueError(f"{self._name} is on {feats.device} but earlier batches were on {self._device}")
        elif feats.shape[1] != self._dim:
            raise ValueError(f"{self._name} has D = {feats.shape[1]} but earlier batches had D = {self._dim}")
        labels = self._labels[self._pass - 1].add(labels, feats.shape[0], feats)
        return feats, labels

    def _tally(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the batch to the tally of the current pass (the tallies are made at the first batch)."""
        if not self._check_passes:
            return
        if not self._tallies:
            self._tallies = [_PassTally(self.num_classes, feats.shape[1], feats.device) for _ in range(2)]
        self._tallies[self._pass - 1].update(feats, labels)

    def update(self, feats: TensorLike, labels: TensorLike, predictions: Optional[TensorLike] = None) -> None:
        """Add a batch: ``feats (B, D)`` or ``(B, C, h, w)``, ``labels (B,)``; ``predictions (B,)`` in pass 2.

        No host sync: compiles with ``torch.compile(fullgraph=True)``; the labels, the predictions
        and the finiteness of the features are checked by ``next_pass()`` and ``compute()``."""
        if self._computed:
            raise RuntimeError("update() after compute(); call reset() to measure other data")
        if self._reduced:
            raise RuntimeError("update() after all_reduce() in the same pass; call next_pass() or compute()")
        if self._null is not None and torch.compiler.is_compiling():
            raise RuntimeError("NCAccumulator.update() with null_permutations > 0 draws its permutations on the "
                               "host and does not compile; call it eagerly, or use null_permutations=0")
        feats, labels = self._batch(feats, labels)
        if self._pass == 1:
            if predictions is not None:
                raise ValueError("predictions are used in the second pass only (after next_pass())")
            self._tally(feats, labels)
            if feats.dtype == torch.float64:
                self._rescale(feats.abs().amax())
            # (L, B): the labels, then the null's permutations of them; sums (L, K, D)
            labellings = labels[None] if self._null is None else torch.cat([labels[None], self._null.labels(labels, 0)])
            sums, counts = _ops.class_sums(self._scaled(feats), labellings, self.num_classes)
            if self._sums is None or self._counts is None:
                self._sums, self._counts = sums, counts[0]
            else:
                self._sums += sums
                self._counts += counts[0]
            return
        assert self._second is not None  # set by next_pass()
        if predictions is not None:
            predictions = self._predictions.add(predictions, feats.shape[0], feats)
        self._tally(feats, labels)
        scaled = self._scaled(feats)
        self._second.update(scaled, labels, predictions)
        if self._null is not None and self._null_second is not None:
            self._null_second.update(scaled, self._null.labels(labels, 1), predictions)

    def _scaled(self, feats: torch.Tensor) -> torch.Tensor:
        """The features times the power-of-two scale of the statistics (the features themselves at
        1): the running scale of the first pass, the fixed one of the second (None there at 1)."""
        if self._scale is None or (self._pass == 1 and _is_one(self._scale)):
            return feats
        return feats * self._scale

    def _rescale(self, magnitude: torch.Tensor) -> None:
        """Record the largest feature magnitude (0-d, with those so far); where it calls for another
        power-of-two scale, rescale the sums so far (exactly: by a power of two) to it."""
        if self._magnitude is not None:
            magnitude = torch.maximum(self._magnitude, magnitude)
        scale = _power_of_two_scale(magnitude)
        if self._sums is not None:
            ratio = scale if self._scale is None else scale / self._scale
            if not _is_one(ratio):
                self._sums *= ratio
        self._magnitude, self._scale = magnitude, scale

    def next_pass(self) -> None:
        """End the first pass: check its labels (in ``[0, num_classes)``) and features (finite),
        fix the class means and start the second pass."""
        if self._pass != 1:
            raise RuntimeError("next_pass() was already called")
        if self._sums is None or self._counts is None:
            raise ValueError("no data: call update(feats, labels) before next_pass()")
        self._labels[0].check()
        _inputs.finite(self._sums, self._name)  # NaN and Inf reach the class sums (no overflow: the rescaling)
        scale = 1.0 if self._scale is None else float(self._scale)
        if scale == 1.0:
            self._scale = None  # the second pass multiplies by nothing (and reads no host value)
        self._second = _SecondPass(self._sums[0], self._counts, self._weight, self._bias, self.global_mean,
                                   self.pinv_rtol, scale, self._name)
        if self._null is not None:
            warning = self._null.kept_warning(self._counts, self._name)
            if warning is not None:
                warnings.warn(warning, stacklevel=2)
            nulls = [_SecondPass(sums, self._counts, self._weight, self._bias, self.global_mean, self.pinv_rtol, scale,
                                 f"{self._name} (labels permuted, null {r + 1})") for r, sums in enumerate(self._sums[1:])]
            self._null_second = _NullSecondPass(nulls, self._sums[0].sum(0) / self._second.num_samples, self._weight,
                                                self._bias, scale)
        self._pass, self._reduced = 2, False

    def all_reduce(self, group: Optional[Any] = None) -> None:
        """Sum this pass's statistics over the ranks of ``group`` (``torch.distributed``)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce() needs an initialised torch.distributed process group")
        if self._reduced:
            raise RuntimeError("all_reduce() was already called in this pass")
        if self._pass == 1:
            if self._sums is None or self._counts is None:
                raise ValueError("no data on this rank: call update() before all_reduce()")
            device = self._sums.device
            magnitude = (torch.zeros((), dtype=torch.float64, device=device) if self._magnitude is None
                         else self._magnitude.clone())
            dist.all_reduce(magnitude, op=dist.ReduceOp.MAX, group=group)
            self._rescale(magnitude)  # one scale on every rank
            tensors = [self._sums, self._counts]
            if self._null is not None and self._null.kept is not None:
                tensors.append(self._null.kept)
            indices = [self._labels[0]]
        else:
            assert self._second is not None  # set by next_pass()
            device = self._second.counts.device
            tensors = self._second.tensors() + self._ood_tensors()
            if self._null_second is not None:
                tensors += [t for null in self._null_second.seconds for t in null.tensors()]
            indices = [self._labels[1], self._predictions]
        if self._tallies:
            tensors += self._tallies[self._pass - 1].tensors()
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        for index in indices:  # the range of every rank's class indices: all of them raise alike
            low, high = index.bounds(device)
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        self._reduced = True

    def update_ood(self, feats: TensorLike) -> None:
        """Add a batch of out-of-distribution features ``(B, D)`` (or maps, pooled as ``feats``), in
        either pass: ``nc5`` compares their mean with the class means (docs/spec.md section 2)."""
        if self._computed:
            raise RuntimeError("update_ood() after compute(); call reset() to measure other data")
        if self._pass == 2 and self._reduced:
            raise RuntimeError("update_ood() after the second pass's all_reduce(); feed it before")
        feats = _inputs.features(feats, self.pooling, name="ood_feats")
        if self._dim is not None and feats.shape[1] != self._dim:
            raise ValueError(f"ood_feats has D = {feats.shape[1]} but feats has D = {self._dim}")
        if self._ood is None:
            self._ood = torch.zeros(feats.shape[1] + 1, dtype=torch.float64, device=feats.device)
        elif feats.shape[1] != self._ood.shape[0] - 1 or feats.device != self._ood.device:
            raise ValueError(f"ood_feats has D = {feats.shape[1]} on {feats.device}, earlier batches D = "
                             f"{self._ood.shape[0] - 1} on {self._ood.device}")
        _inputs.finite(feats, "ood_feats")
        self._ood[:-1] += feats.double().sum(0)
        self._ood[-1] += feats.shape[0]
        if not bool(torch.isfinite(self._ood).all()):
            raise ValueError("ood_feats: their float64 sum overflows; rescale them")

    def _ood_tensors(self) -> List[torch.Tensor]:
        """The out-of-distribution sums for all_reduce (zeros where this rank has none)."""
        if self._ood is None:
            assert self._sums is not None  # the second pass has begun
            self._ood = torch.zeros(self._sums.shape[-1] + 1, dtype=torch.float64, device=self._sums.device)
        return [self._ood]

    def compute(self, per_class: bool = False) -> NCMetrics:
        """The metrics (``NCMetrics``) after both passes; ``per_class`` adds :class:`NCClassStatistics`.
        Checks first the second pass's labels, predictions and features, then that it saw the
        samples of the first."""
        _inputs.check_bool(per_class, "per_class")
        if self._pass != 2:
            raise RuntimeError("compute() needs both passes: call next_pass() and feed the data again")
        assert self._second is not None  # set by next_pass()
        self._labels[1].check()
        self._predictions.check()
        _inputs.finite(self._second.class_sq, self._name)  # NaN and Inf of the second pass reach class_sq
        different = self._tallies[1].differences(self._tallies[0]) if self._tallies else None
        if different is not None:
            raise ValueError(f"the second pass did not see the samples of the first: {different}; feed the same "
                             "data in both passes")
        if self._null is not None:
            self._null.check_batches()
        ood_mean = None
        if self._ood is not None and float(self._ood[-1]) > 0:
            if self._ood.shape[0] - 1 != self._dim:
                raise ValueError(f"ood_feats has D = {self._ood.shape[0] - 1} but feats has D = {self._dim}")
            ood_mean = self._ood[:-1] / self._ood[-1]
        self._computed = True
        metrics = self._second.compute(per_class, ood_mean)
        if metrics.dim >= metrics.num_samples:
            hint = ("compare the metrics with their null_mean" if self._null is not None else
                    "measure the permutation null (null_permutations=4)")
            warnings.warn(f"{self._name} has D = {metrics.dim} >= N = {metrics.num_samples} samples: there the class "
                          "means of any labelling separate, random labels too, so the metrics look collapsed; "
                          f"{hint}, pool the maps (pooling='gap') or measure on more samples",
                          FewSamplesWarning, stacklevel=2)
        if self._null_second is None:
            return metrics
        null_mean, null_std = self._null_second.compute(ood_mean)
        return dataclasses.replace(metrics, null_mean=null_mean, null_std=null_std)


class _SecondPass:
    """Class means fixed by the first pass and the statistics of the second (``name``: the
    features in messages)."""

    def __init__(self, sums: torch.Tensor, counts: torch.Tensor, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], global_mean: str, pinv_rtol: Optional[float], scale: float,
                 name: str) -> None:
        self.counts = counts
        self.scale = scale  # the sums and every feature of the second pass are times this
        self.name = name
        self.num_samples = int(counts.sum())
        present = counts > 0
        self.present = present.nonzero().flatten()
        if self.present.numel() < 2:
            raise ValueError(f"labels: at least 2 classes must be present, found {self.present.numel()}")
        if weight is not None and not bool(weight[self.present].any()):
            raise ValueError(f"classifier: the rows of the classes present ({self.present.tolist()[:10]}"
                             f"{' ...' if self.present.numel() > 10 else ''}) are all zeros; NC3 is undefined")
        self.means = sums / counts.clamp_min(1).unsqueeze(1).double()
        if global_mean == "weighted":
            global_mu = sums.sum(0) / self.num_samples
            self.null: Optional[torch.Tensor] = counts[self.present].double()  # sum_c n_c m_c = 0
        else:
            global_mu = self.means[self.present].mean(0)
            self.null = None  # uniform: sum_c m_c = 0
        self.global_mu = global_mu
        centred = (self.means - global_mu) * present.unsqueeze(1)
        gram = centred @ centred.T
        # a centred mean within rounding of 0 has no direction (its unit vector and cosines are 0)
        norms = torch.diagonal(gram).sqrt()
        rounding = (_MEAN_ROUNDING * torch.finfo(torch.float64).eps
                    * float(torch.linalg.vector_norm(self.means[self.present], dim=1).max()))
        if not float(norms.max()) > rounding:
            raise ValueError(f"{name}: all class means are equal (to float64 rounding: Sigma_B = 0); the NC metrics "
                             "are undefined")
        self.mean_distances = _mean_distances(self.means, gram, present)
        # the unit vectors u_c of the present classes (0 without direction): their Gram matrix (the
        # cosines) and their distances
        idx = self.present
        self.directional = (norms > rounding)[idx]
        mask, lengths = self.directional.double(), torch.where(self.directional, norms[idx], 1.0)
        self.unit_gram = gram[idx][:, idx] / torch.outer(lengths, lengths) * torch.outer(mask, mask)
        units = centred[idx] / lengths.unsqueeze(1) * mask.unsqueeze(1)
        self.unit_distances = _mean_distances(units, self.unit_gram, torch.ones_like(self.directional))
        # equal means have one direction (their unit rows can differ by the rounding of two norms of one vector)
        self.unit_distances.masked_fill_(self.mean_distances[idx][:, idx] == 0, 0.0)
        self.ncc_bias = self.mean_distances.masked_fill(~present.unsqueeze(0), float("inf"))
        self.centred, self.gram_means = centred, gram
        directions, self.eigenvalues = _between_class_basis(centred[self.present], gram[self.present][:, self.present],
                                                            self.null, pinv_rtol)
        self.weight = weight
        # The logits of the scaled features h' = scale h, with the argmax of the features' W h + b:
        # W' h' + (W' mu'_y + b') with W' = W / scale, b' = b for tiny features (scale > 1: W h + b
        # itself), W' = W, b' = scale b otherwise (scale (W h + b)), so that neither can overflow.
        logit_weight = None if weight is None else (weight / scale if scale > 1.0 else weight)
        self.logit_offset = None
        if logit_weight is not None and bias is not None:
            self.logit_offset = self.means @ logit_weight.T + (bias if scale > 1.0 else scale * bias)
        # What the second pass projects on (csrc/schemas.h): the basis, then the classifier's rows
        # where its logits decide nc4; the class scores are mean_coords @ t (t: the basis coordinates).
        self.proj = directions if logit_weight is None else torch.cat([directions, logit_weight])
        self.mean_coords = centred @ directions.T
        # a 0-d CPU tensor: a compiled update() takes it as an input (a float would be a constant)
        self.score_error = torch.tensor(_score_error(centred, self.mean_coords, directions), dtype=torch.float64)
        self.basis_sq = torch.zeros_like(self.eigenvalues)
        self.class_sq = torch.zeros(counts.shape[0], dtype=torch.float64, device=counts.device)
        # correct, disagree, samples with a decision source
        self.counters = torch.zeros(3, dtype=torch.int64, device=sums.device)

    def tensors(self) -> List[torch.Tensor]:
        return [self.basis_sq, self.class_sq, self.counters]

    def update(self, feats: torch.Tensor, labels: torch.Tensor, predictions: Optional[torch.Tensor]) -> None:
        logit_offset = self.logit_offset if predictions is None else None
        proj = self.proj if logit_offset is not None else self.proj[:self.mean_coords.shape[1]]
        basis_sq, class_sq, decisions = _ops.residual_stats(feats, labels, self.means, proj, self.mean_coords,
                                                            self.ncc_bias, self.score_error, logit_offset,
                                                            predictions)
        self.basis_sq += basis_sq
        self.class_sq += class_sq
        self.counters[:2] += decisions
        if predictions is not None or logit_offset is not None:
            self.counters[2] += feats.shape[0]

    def compute(self, per_class: bool, ood_mean: Optional[torch.Tensor]) -> NCMetrics:
        """The metrics; ``ood_mean``: the mean of out-of-distribution features (unscaled) for ``nc5``."""
        correct, disagree, decided = (int(v) for v in self.counters.tolist())
        idx = self.present
        centred = self.centred[idx]
        norms = torch.linalg.vector_norm(centred, dim=1)
        directional = self.directional  # the cosines of the others are 0
        nc3 = classifier_gram = classifier_cosines = ood_cosines = None
        if self.weight is not None:
            weight = self.weight[idx]
            nc3 = float(((weight / torch.linalg.norm(weight) - centred / torch.linalg.norm(centred)) ** 2).sum())
            classifier_gram = (weight @ centred.T).cpu()
            weight_norms = torch.linalg.vector_norm(weight, dim=1)
            classifier_cosines = torch.where(directional & (weight_norms > 0),
                                             (weight * centred).sum(1) / (weight_norms * norms), 0.0).cpu()
        if ood_mean is not None:
            ood_mu = ood_mean.to(self.global_mu.device) * self.scale
            direction = ood_mu - self.global_mu
            length = torch.linalg.vector_norm(direction)
            rounding = 64 * torch.finfo(torch.float64).eps * (torch.linalg.vector_norm(ood_mu)
                                                              + torch.linalg.vector_norm(self.global_mu))
            if not float(length) > float(rounding):
                raise ValueError("ood_feats: their mean equals the global mean of feats (to rounding), so nc5 "
                                 "(the cosines with mu_OOD - mu_G) is undefined")
            ood_cosines = torch.where(directional, (centred @ direction) / (norms * length), 0.0).cpu()
        cpu = torch.device("cpu")
        return _metrics_from_statistics(
            gram_means=self.gram_means[idx][:, idx].to(cpu),
            unit_gram=self.unit_gram.to(cpu),
            mean_distances=self.mean_distances[idx][:, idx].to(cpu),
            unit_distances=self.unit_distances.to(cpu),
            eigenvalues=self.eigenvalues.to(cpu),
            basis_sq=self.basis_sq.to(cpu),
            class_sq=self.class_sq[idx].to(cpu),
            counts=self.counts[idx].to(cpu).double(),
            classes=idx.tolist(),
            num_samples=self.num_samples,
            dim=self.means.shape[1],
            class_counts=[int(c) for c in self.counts.tolist()],
            scale=self.scale,
            per_class=per_class,
            classifier_gram=classifier_gram,
            nc3=nc3,
            classifier_cosines=classifier_cosines,
            ood_cosines=ood_cosines,
            correct=correct,
            disagree=disagree if decided == self.num_samples else None,
        )


class _NullSecondPass:
    """The second pass of the permutation null: the statistics of every permuted labelling from one
    product per batch of the centred features with the bases of all of them (docs/spec.md section 3,
    "The permutation null").

    With ``c_i = h_i - mu`` (``mu`` the sample mean, the same for every labelling) and a labelling's
    orthonormal basis ``Q`` (rows), ``u_i = Q c_i`` for all labellings at once; then, as the second
    pass's kernel has it, ``t_i = Q r_i = u_i - Q (mu_{y_i} - mu)``, ``||r_i||^2 = (||c_i||^2 - ||u_i||^2)
    + ||t_i||^2`` (``mu_y - mu`` lies in the span of the centred class means, so ``r_i`` and ``c_i``
    share their part outside it) and the nearest class centre ``argmin_c ncc_bias[y_i, c] - 2 m_c . r_i``
    with ``m_c . r_i = mean_coords[c] . t_i``. Exact ties of the decisions are not broken the kernel's way."""

    def __init__(self, seconds: List[_SecondPass], centre: torch.Tensor, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], scale: float) -> None:
        self.seconds, self.centre = seconds, centre
        self.widths = [second.mean_coords.shape[1] for second in seconds]
        bases = [second.proj[:width] for second, width in zip(seconds, self.widths)]
        self.basis = torch.cat(bases)
        # Q (mu_y - mu) = mean_coords[y] + Q (mu_G - mu), per labelling (K, width)
        self.shifts = [second.mean_coords + basis @ (second.global_mu - centre) for second, basis in zip(seconds, bases)]
        # the classifier's logits of the scaled features, as _SecondPass forms them, for nc4 without predictions
        self.logits: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if weight is not None and bias is not None:
            logit_weight = weight / scale if scale > 1.0 else weight
            self.logits = logit_weight, logit_weight @ centre + (bias if scale > 1.0 else scale * bias)

    def update(self, feats: torch.Tensor, labellings: torch.Tensor, predictions: Optional[torch.Tensor]) -> None:
        """Add a batch (features times the scale) under the labellings ``(R, B)``."""
        centred = feats.double() - self.centre
        coords = (centred @ self.basis.T).split(self.widths, dim=1)
        outside = centred.square().sum(1)
        if predictions is None and self.logits is not None:
            predictions = (centred @ self.logits[0].T + self.logits[1]).argmax(1)
        for second, labels, u, shift in zip(self.seconds, labellings, coords, self.shifts):
            t = u - shift[labels]
            second.basis_sq += t.square().sum(0)
            second.class_sq.index_add_(0, labels, (outside - u.square().sum(1)).clamp_min(0.0) + t.square().sum(1))
            decisions = (second.ncc_bias[labels] - 2.0 * t @ second.mean_coords.T).argmin(1)
            second.counters[0] += (decisions == labels).sum()
            if predictions is not None:
                second.counters[1] += (decisions != predictions).sum()
                second.counters[2] += feats.shape[0]

    def compute(self, ood_mean: Optional[torch.Tensor]) -> Tuple[Dict[str, float], Dict[str, float]]:
        """``(null_mean, null_std)`` over the labellings of every metric they all have."""
        results = [second.compute(False, ood_mean).to_dict() for second in self.seconds]
        names = [field.name for field in dataclasses.fields(NCMetrics) if field.name not in _COUNT_FIELDS
                 and all(result[field.name] is not None for result in results)]
        values = {name: torch.tensor([float(result[name]) for result in results], dtype=torch.float64)
                  for name in names}
        mean = {name: float(v.mean()) for name, v in values.items()}
        std = {name: float(v.std()) if v.numel() > 1 and bool(torch.isfinite(v).all()) else
               (0.0 if v.numel() == 1 else math.inf) for name, v in values.items()}
        return mean, std


def nc_metrics(feats: TensorLike, labels: TensorLike, num_classes: Optional[int] = None,
               classifier: Optional[TensorLike] = None, bias: Optional[TensorLike] = None,
               predictions: Optional[TensorLike] = None, global_mean: str = "unweighted",
               pooling: str = "flatten", pinv_rtol: Optional[float] = None, ood_feats: Optional[TensorLike] = None,
               per_class: bool = False, null_permutations: int = 0, null_seed: int = 0) -> NCMetrics:
    """Exact neural-collapse metrics of one set of features (docs/spec.md sections 2-3).

    Args:
        feats: ``(N, D)`` features, or ``(N, C, h, w)`` maps (``pooling="flatten"`` gives
            ``D = C*h*w``, ``"gap"`` averages to ``D = C``); float16/bfloat16/float32/float64, torch
            (CPU or CUDA) or numpy. Accumulation is in float64 whatever the input dtype.
        labels: ``(N,)`` integer classes in ``[0, num_classes)``.
        num_classes: total number of classes (default ``max(labels) + 1``); classes absent from
            the data are left out of every formula. Refused (``ValueError``, with the bytes) where
            the statistics of that many classes, ``8 K (3 D + 4 K)`` bytes, exceed the free memory.
        classifier, bias: last-layer ``W (num_classes, D)`` and ``b`` for ``nc3``, ``nc3_etf``,
            ``nc3_uniform`` and ``nc4``.
        predictions: ``(N,)`` predicted classes for ``nc4`` (instead of ``argmax(W h + b)``).
        global_mean: ``"unweighted"`` (mean of class means, Papyan) or ``"weighted"`` (sample mean).
        pinv_rtol: eigenvalues of ``Sigma_B`` below this fraction of the largest count as 0 in
            ``nc1``'s pseudo-inverse. Default: float64's noise level, ``size * eps`` for the
            ``(K - 1) x (K - 1)`` matrix inverted (the convention of ``torch.linalg.pinv``);
            ``LEGACY_PINV_RTOL`` (``1e-10``) is the cut-off of the first releases, which drops real
            directions of nearly overlapping classes (docs/spec.md section 3).
        ood_feats: out-of-distribution features ``(M, D)`` (or maps, pooled alike) for ``nc5``.
        per_class: also return the per-class statistics (``NCMetrics.per_class``: class-mean norms,
            within-class variances, the CDNV matrix).
        null_permutations: ``R``, the number of random permutations of the labels (class counts
            kept) whose metrics give ``NCMetrics.null_mean`` and ``null_std``: the value of each
            metric for labels that carry no information (docs/spec.md section 2). 0: none. The
            passes read the features once for all ``R + 1`` labellings.
        null_seed: the seed of the permutations (the same seed, the same permutations).

    Returns:
        ``NCMetrics``. Two passes over ``feats``, float64 accumulation, no ``D x D`` matrix. Degenerate
        geometry (a class mean at the global mean, equal class means) gives the documented values
        of :class:`NCMetrics`, never NaN.
    """
    inferred = num_classes is None
    num_classes = _inputs.infer_num_classes(num_classes, labels)
    feats = _inputs.features(feats, pooling)  # pooled once here, not again in each pass
    # with D and the device known (the accumulator's constructor knows neither)
    null_permutations = _inputs.positive_int(null_permutations, "null_permutations", minimum=0)
    _inputs.class_statistics_fit(num_classes, [feats.shape[1]], feats.device, f"feats (D = {feats.shape[1]})",
                                 inferred=inferred, null_permutations=null_permutations)
    accumulator = NCAccumulator(num_classes, classifier, bias, global_mean, pooling="flatten", pinv_rtol=pinv_rtol,
                                null_permutations=null_permutations, null_seed=null_seed)
    accumulator._check_passes = False  # both passes read feats itself
    accumulator.update(feats, labels)
    accumulator.next_pass()
    accumulator.update(feats, labels, predictions)
    if ood_feats is not None:
        accumulator.update_ood(ood_feats)
    return accumulator.compute(per_class)
