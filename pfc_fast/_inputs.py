"""User input to the tensors and numbers the library takes, with errors that name the bad argument.

The one home of the library's input checks (metrics, monitor, transport, geodesic, mufm).
Accepts torch tensors (CPU or CUDA) and numpy arrays; the NC metrics' tensors (features, labels,
classifier) must hold data (not on the meta device). Non-finite features are detected after each
pass, from its float64 statistics (free: no extra read of the features), and class indices given in
batches are checked at the end too (:class:`ClassIndices`), so that feeding a batch needs no host sync.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import _memory

#: What the library accepts where it takes an array: a torch tensor or a numpy array.
TensorLike = Union[torch.Tensor, np.ndarray]

POOLINGS = ("flatten", "gap")
GLOBAL_MEANS = ("unweighted", "weighted")

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
#: Unsigned dtypes whose every value int64 holds: class indices in them are widened first.
_WIDENED_DTYPES = (torch.uint16, torch.uint32)


def _integer_labels(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """An integer tensor as one of ``_INTEGER_DTYPES`` (uint16 and uint32 widened to int64)."""
    if tensor.dtype in _WIDENED_DTYPES:
        return tensor.to(torch.int64)
    if tensor.dtype == torch.uint64:
        raise TypeError(f"{name} has dtype torch.uint64, whose values int64 cannot all hold: convert it to int64")
    if tensor.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {tensor.dtype}")
    return tensor


def as_tensor(value: object, name: str) -> torch.Tensor:
    """``value`` as a torch tensor (numpy arrays are wrapped without a copy)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got a numpy array of dtype object")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a torch.Tensor or a numpy.ndarray, got {type(value).__name__}")


def with_data(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` itself, after checking that it holds data: a meta tensor has a shape but no values."""
    if tensor.is_meta:
        raise ValueError(f"{name} is on the meta device; pass a tensor with data")
    return tensor


def floating(value: object, name: str) -> torch.Tensor:
    """``value`` as a torch tensor of a floating dtype (:func:`as_tensor`, then the dtype checked)."""
    tensor = as_tensor(value, name)
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")
    return tensor


def finite(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` itself, after checking that it holds no NaN or Inf."""
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return tensor


def points(value: object, name: str, device: Union[torch.device, str, None] = None, copy: bool = False) -> torch.Tensor:
    """One point set ``(N, D)``, ``N, D >= 1``, of a floating dtype, as a finite float64 tensor on
    ``device`` (default: its own); ``copy`` makes it never share memory with ``value``."""
    tensor = floating(value, name)
    if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, D) with N, D >= 1, got {tuple(tensor.shape)}")
    tensor = tensor.to(device=device if device is not None else tensor.device, dtype=torch.float64, copy=copy)
    return finite(tensor, name)


def positive_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``: TypeError for a bool or a non-integer, ValueError below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def finite_number(value: object, name: str, positive: bool = False) -> float:
    """``value`` as a finite float ``>= 0`` (``> 0`` with ``positive``): a Python, numpy or 0-d
    tensor / array real number; TypeError for a bool or a non-number, ValueError out of range."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        if value.dtype == torch.bool or value.dtype.is_complex or value.is_meta:
            where = " on the meta device" if value.is_meta else ""
            raise TypeError(f"{name} must be a real number, got a 0-d tensor of dtype {value.dtype}{where}")
        value = value.item()
    elif isinstance(value, np.ndarray) and value.ndim == 0:
        if not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
            raise TypeError(f"{name} must be a real number, got a 0-d array of dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {number}")
    return number


def check_bool(value: object, name: str) -> bool:
    """``value``, which must be a bool (TypeError otherwise: no truthy ints or strings)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_choice(value: object, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def features(value: object, pooling: str = "flatten", name: str = "feats") -> torch.Tensor:
    """Features as an ``(N, D)`` floating tensor.

    ``(N, C, h, w)`` maps (any number of trailing dimensions) are flattened to ``D = C*h*w``
    (``pooling="flatten"``) or averaged over the spatial dimensions to ``D = C`` (``"gap"``; the
    average is taken in float64, in row chunks, so pooling loses no precision).
    """
    check_choice(pooling, "pooling", POOLINGS)
    feats = with_data(floating(value, name), name)
    if feats.dim() < 2:
        raise ValueError(f"{name} must have shape (N, D) or (N, C, h, w), got shape {tuple(feats.shape)}")
    if feats.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0 samples)")
    if pooling == "gap" and feats.dim() > 2:
        dims = tuple(range(2, feats.dim()))
        chunk = max(1, (64 << 20) // max(1, feats[0].numel() * 8))
        feats = torch.cat([part.double().mean(dim=dims) for part in feats.split(chunk)])
    elif feats.dim() > 2:
        feats = feats.reshape(feats.shape[0], -1)
    if feats.shape[1] == 0:
        raise ValueError(f"{name} has no feature dimensions (D = 0)")
    return feats


def _same_device(tensor: torch.Tensor, feats: torch.Tensor, name: str) -> None:
    if tensor.device != feats.device:
        raise ValueError(f"{name} is on {tensor.device} but feats is on {feats.device}; put them on the same device")


class ClassIndices:
    """Class indices (``labels``, ``predictions``) that arrive in batches, checked to lie in
    ``[0, num_classes)`` once, by :meth:`check`, with no host sync per batch: :meth:`add` records
    their range on the device (a running least and largest value, 0-d int64 tensors) and returns
    them clamped into range, so that no kernel indexes out of bounds before the check; traceable
    by ``torch.compile(fullgraph=True)``."""

    def __init__(self, num_classes: int, name: str = "labels") -> None:
        self.num_classes = num_classes
        self.name = name
        self._bounds: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # least, largest (None: none added)

    def add(self, value: object, num_samples: int, feats: torch.Tensor) -> torch.Tensor:
        """Integer class indices ``(N,)`` (``N = num_samples``) on the features' device as int64,
        clamped to ``[0, num_classes)``; their range is recorded for :meth:`check`."""
        indices = _integer_labels(with_data(as_tensor(value, self.name), self.name), self.name)
        if indices.dim() != 1 or indices.shape[0] != num_samples:
            raise ValueError(f"{self.name} must have shape ({num_samples},) to match feats, got {tuple(indices.shape)}")
        _same_device(indices, feats, self.name)
        indices = indices.long()
        low, high = torch.aminmax(indices)
        if self._bounds is not None:
            low, high = torch.minimum(self._bounds[0], low), torch.maximum(self._bounds[1], high)
        self._bounds = low, high
        return indices.clamp(0, self.num_classes - 1)

    def bounds(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The least and the largest index added (0-d int64 tensors, updated in place by a
        reduction over ranks: MIN, MAX); with none added, the int64 maximum and minimum (which
        pass :meth:`check`), made on ``device``."""
        if self._bounds is None:
            info = torch.iinfo(torch.int64)
            self._bounds = (torch.tensor(info.max, device=device), torch.tensor(info.min, device=device))
        return self._bounds

    def check(self) -> None:
        """Raises ``ValueError`` where an index added lies outside ``[0, num_classes)`` (one host read)."""
        if self._bounds is None:
            return
        low, high = (int(v) for v in torch.stack(self._bounds).tolist())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"{self.name} must lie in [0, {self.num_classes}) (num_classes = {self.num_classes}); "
                             f"found values in [{low}, {high}]")


def class_indices(value: object, num_samples: int, num_classes: int, feats: torch.Tensor,
                  name: str = "labels") -> torch.Tensor:
    """Integer class indices ``(N,)`` in ``[0, num_classes)`` as int64 on the features' device,
    checked at once (:class:`ClassIndices` checks batches at the end)."""
    indices = ClassIndices(num_classes, name)
    checked = indices.add(value, num_samples, feats)
    indices.check()
    return checked


def infer_num_classes(num_classes: object, labels: object) -> int:
    """``num_classes`` as given (an int >= 2), or ``max(labels) + 1``."""
    if num_classes is not None:
        return positive_int(num_classes, "num_classes", minimum=2)
    tensor = _integer_labels(with_data(as_tensor(labels, "labels"), "labels"), "labels")
    if tensor.numel() == 0:
        raise ValueError("labels is empty")
    return max(2, int(tensor.max()) + 1)


def class_statistics_bytes(num_classes: int, dims: Sequence[int], null_permutations: int = 0) -> int:
    """The bytes that accumulators (``NCAccumulator``) of ``num_classes`` classes keep, one per feature
    dimension in ``dims``, each for its ``1 + null_permutations`` labellings (the labels and their
    permutations, the null), at the least: ``8 K (3 D + 4 K)`` per labelling, for three ``K x D`` float64 matrices
    (the class sums, means and centred means) and four ``K x K`` ones (the Gram matrix of the centred
    means, the distances of the means, the nearest-class-centre offsets; the distances' expansion
    holds a fourth at a time), for every class index ``0..K-1``, present in the data or not."""
    return (1 + null_permutations) * sum(8 * num_classes * (3 * dim + 4 * num_classes) for dim in dims)


def class_statistics_fit(num_classes: int, dims: Sequence[int], device: Optional[torch.device], what: str,
                         inferred: bool = False, null_permutations: int = 0) -> None:
    """Refuses a ``num_classes`` whose class statistics (:func:`class_statistics_bytes`) for ``what``
    (the features, of dimensions ``dims``) exceed the memory free on ``device``, with the bytes they
    would need. ``device`` None (not known yet): only what fits on no device is refused, more than
    the CPU's free memory and the largest CUDA device's total (asked only then, so that a fitting
    ``num_classes`` never initialises CUDA). ``inferred``: ``num_classes`` is ``max(labels) + 1``."""
    needed = class_statistics_bytes(num_classes, dims, null_permutations)
    if device is not None:
        free, where = _memory.free_bytes(device), f"free on {device}"
    else:
        free, where = _memory.free_bytes(torch.device("cpu")), "free on cpu"
        if needed > free and torch.cuda.is_available():
            total = max(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
            if total > free:
                free, where = total, "of the largest CUDA device"
    if needed <= free:
        return
    subject = (f"labels go up to {num_classes - 1}, so num_classes = max(labels) + 1 = {num_classes}, which"
               if inferred else f"num_classes = {num_classes}")
    hint = ("map the labels to 0..K-1 first (torch.unique(labels, return_inverse=True))" if inferred else
            "give the number of classes of the labels (labels must be < num_classes)")
    raise ValueError(f"{subject} is too many classes for {what}: their statistics (K x D and K x K float64 matrices "
                     f"for every class index, present or not) would need at least {needed:,} bytes "
                     f"({needed / 2**30:.3g} GiB), more than the {free:,} bytes {where}; {hint}")


def classifier_weights(classifier: object, bias: object,
                       num_classes: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Classifier ``W (K, D)`` and bias ``b (K,)`` as float64 (``b`` zeros when None); ``(None, None)`` without W."""
    if classifier is None:
        if bias is not None:
            raise ValueError("bias was given without a classifier")
        return None, None
    weight = with_data(floating(classifier, "classifier"), "classifier")
    if weight.dim() != 2 or weight.shape[0] != num_classes:
        raise ValueError(f"classifier must have shape (num_classes, D) = ({num_classes}, D), got {tuple(weight.shape)}")
    weight = finite(weight.double(), "classifier")
    if not bool(weight.any()):
        raise ValueError("classifier is all zeros; NC3 is undefined")
    if bias is None:
        return weight, torch.zeros(num_classes, dtype=torch.float64, device=weight.device)
    offset = with_data(floating(bias, "bias"), "bias")
    if tuple(offset.shape) != (num_classes,):
        raise ValueError(f"bias must have shape ({num_classes},), got {tuple(offset.shape)}")
    if offset.device != weight.device:
        raise ValueError(f"bias is on {offset.device} but classifier is on {weight.device}")
    return weight, finite(offset.double(), "bias")


def check_classifier_device(weight: Optional[torch.Tensor], feats: torch.Tensor) -> None:
    if weight is not None:
        _same_device(weight, feats, "classifier")
    if weight is not None and weight.shape[1] != feats.shape[1]:
        raise ValueError(f"classifier has D = {weight.shape[1]} columns but feats has D = {feats.shape[1]}")


def point_clouds(x: object, y: object) -> Tuple[torch.Tensor, torch.Tensor]:
    """The points ``x``, ``y`` of an OT problem: ``(N, D)``/``(M, D)`` or ``(B, N, D)``/``(B, M, D)``
    with the same ``B`` and ``D``, ``N, M >= 1``, floating, on one device (dtype left as given;
    check finiteness in the compute dtype with :func:`finite`)."""
    if x is None or y is None:
        raise ValueError("give x and y (point clouds) or cost (a cost matrix)")
    xs, ys = floating(x, "x"), floating(y, "y")
    for t, name in ((xs, "x"), (ys, "y")):
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must have shape (N, D) or (B, N, D), got {tuple(t.shape)}")
    if ys.device != xs.device:
        raise ValueError(f"y is on {ys.device} but x is on {xs.device}")
    if xs.dim() != ys.dim() or xs.shape[-1] != ys.shape[-1] or (xs.dim() == 3 and xs.shape[0] != ys.shape[0]):
        raise ValueError(f"x {tuple(xs.shape)} and y {tuple(ys.shape)} must both be (N, D)/(M, D) or "
                         "(B, N, D)/(B, M, D) with the same B and D")
    if xs.shape[-2] == 0 or ys.shape[-2] == 0:
        raise ValueError("x and y must contain at least one point each")
    if xs.dim() == 3 and xs.shape[0] == 0:
        raise ValueError(f"x {tuple(xs.shape)} and y {tuple(ys.shape)} hold B = 0 problems: a batch needs B >= 1")
    return xs, ys


def cost_matrix(value: object) -> torch.Tensor:
    """A given OT cost ``(N, M)`` or ``(B, N, M)`` of a floating dtype (dtype left as given)."""
    cost = floating(value, "cost")
    if cost.dim() not in (2, 3):
        raise ValueError(f"cost must have shape (N, M) or (B, N, M), got {tuple(cost.shape)}")
    if cost.numel() == 0:
        raise ValueError(f"cost is empty (shape {tuple(cost.shape)}): every dimension must be >= 1")
    return cost


def ot_weights(value: object, name: str, batch: int, count: int, batched: bool,
               device: torch.device) -> Tuple[torch.Tensor, float]:
    """OT weights ``(batch, count)`` in float64 and the machine epsilon of their given dtype (0 for
    None: uniform, ``1/count``). Given: ``(count,)`` (or ``(batch, count)`` when ``batched``),
    non-negative, finite, of positive total, on ``device``."""
    if value is None:
        return torch.full((batch, count), 1.0 / count, dtype=torch.float64, device=device), 0.0
    w = floating(value, name)
    if w.device != device:
        raise ValueError(f"{name} is on {w.device} but the points are on {device}")
    allowed = [(count,)] + ([(batch, count)] if batched else [])
    if tuple(w.shape) not in allowed:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, allowed))}, got {tuple(w.shape)}")
    resolution = torch.finfo(w.dtype).eps
    w = w.double()
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name} must be non-negative and finite")
    if not bool((w.sum(-1) > 0).all()):
        raise ValueError(f"{name} must have a positive total mass")
    return w.expand(batch, count), resolution


def ot_marginals(a: object, b: object, batch: int, rows: int, cols: int, batched: bool, device: torch.device,
                 dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The weights ``a (batch, rows)``, ``b (batch, cols)`` of an OT problem in ``dtype`` (each as
    :func:`ot_weights` takes it).

    Their totals must agree to ``rtol = max(1e-5, 4 eps)`` (``eps``: the machine epsilon of the
    coarsest dtype given; float16 weights are rounded to 2^-11, so uniform ones of 1000 points total
    0.99976), compared in float64; ``b`` is then rescaled to ``a``'s total, ``b * sum(a) / sum(b)``,
    so that the problem is balanced to the rounding of ``dtype``.
    """
    wa, res_a = ot_weights(a, "a", batch, rows, batched, device)
    wb, res_b = ot_weights(b, "b", batch, cols, batched, device)
    mass_a, mass_b = wa.sum(-1), wb.sum(-1)
    rtol = max(1e-5, 4 * res_a, 4 * res_b)
    if not bool(((mass_a - mass_b).abs() <= rtol * torch.maximum(mass_a, mass_b)).all()):
        raise ValueError(f"a and b must have the same total mass (to {rtol:.2g} relative, the resolution of their "
                         f"dtypes), got {mass_a.tolist()} and {mass_b.tolist()}")
    weights = (wa.to(dtype), (wb * (mass_a / mass_b).unsqueeze(-1)).to(dtype))
    for w, name in zip(weights, "ab"):
        total = w.sum(-1)
        if not bool((torch.isfinite(total) & (total > 0)).all()):
            raise ValueError(f"{name} does not fit {str(dtype).replace('torch.', '')}, the dtype of the computation: "
                             f"rescale it, or give float64 points")
    return weights
