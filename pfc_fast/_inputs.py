"""User input to the tensors the operators take, with errors that name the bad argument.

Accepts torch tensors (CPU or CUDA) and numpy arrays. Non-finite features are detected after the
first pass, from the class sums (free: no extra read of the features).
"""
import numpy as np
import torch

POOLINGS = ("flatten", "gap")
GLOBAL_MEANS = ("unweighted", "weighted")

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def as_tensor(value, name):
    """``value`` as a torch tensor (numpy arrays are wrapped without a copy)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got a numpy array of dtype object")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a torch.Tensor or a numpy.ndarray, got {type(value).__name__}")


def check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def features(value, pooling="flatten", name="feats"):
    """Features as an ``(N, D)`` floating tensor.

    ``(N, C, h, w)`` maps (any number of trailing dimensions) are flattened to ``D = C*h*w``
    (``pooling="flatten"``) or averaged over the spatial dimensions to ``D = C`` (``"gap"``; the
    average is taken in float64, in row chunks, so pooling loses no precision).
    """
    check_choice(pooling, "pooling", POOLINGS)
    feats = as_tensor(value, name)
    if not feats.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {feats.dtype}")
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


def _same_device(tensor, feats, name):
    if tensor.device != feats.device:
        raise ValueError(f"{name} is on {tensor.device} but feats is on {feats.device}; put them on the same device")


def class_indices(value, num_samples, num_classes, feats, name="labels"):
    """Integer class indices ``(N,)`` in ``[0, num_classes)`` as int64 on the features' device."""
    labels = as_tensor(value, name)
    if labels.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != num_samples:
        raise ValueError(f"{name} must have shape ({num_samples},) to match feats, got {tuple(labels.shape)}")
    _same_device(labels, feats, name)
    low, high = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}) (num_classes = {num_classes}); found values in [{low}, {high}]")
    return labels.long()


def check_num_classes(num_classes):
    """``num_classes`` as an int >= 2."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return int(num_classes)


def infer_num_classes(num_classes, labels):
    """``num_classes`` as given (checked), or ``max(labels) + 1``."""
    if num_classes is not None:
        return check_num_classes(num_classes)
    labels = as_tensor(labels, "labels")
    if labels.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.numel() == 0:
        raise ValueError("labels is empty")
    return max(2, int(labels.max()) + 1)


def classifier_weights(classifier, bias, num_classes):
    """Classifier ``W (K, D)`` and bias ``b (K,)`` as float64 (``b`` zeros when None); ``(None, None)`` without W."""
    if classifier is None:
        if bias is not None:
            raise ValueError("bias was given without a classifier")
        return None, None
    weight = as_tensor(classifier, "classifier")
    if not weight.is_floating_point():
        raise TypeError(f"classifier must have a floating dtype, got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[0] != num_classes:
        raise ValueError(f"classifier must have shape (num_classes, D) = ({num_classes}, D), got {tuple(weight.shape)}")
    weight = weight.double()
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("classifier contains NaN or Inf values")
    if not bool(weight.any()):
        raise ValueError("classifier is all zeros; NC3 is undefined")
    if bias is None:
        return weight, torch.zeros(num_classes, dtype=torch.float64, device=weight.device)
    offset = as_tensor(bias, "bias")
    if not offset.is_floating_point():
        raise TypeError(f"bias must have a floating dtype, got {offset.dtype}")
    if tuple(offset.shape) != (num_classes,):
        raise ValueError(f"bias must have shape ({num_classes},), got {tuple(offset.shape)}")
    if offset.device != weight.device:
        raise ValueError(f"bias is on {offset.device} but classifier is on {weight.device}")
    offset = offset.double()
    if not bool(torch.isfinite(offset).all()):
        raise ValueError("bias contains NaN or Inf values")
    return weight, offset


def check_classifier_device(weight, feats):
    if weight is not None:
        _same_device(weight, feats, "classifier")
    if weight is not None and weight.shape[1] != feats.shape[1]:
        raise ValueError(f"classifier has D = {weight.shape[1]} columns but feats has D = {feats.shape[1]}")
