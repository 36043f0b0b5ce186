"""Bad input gives a ValueError or TypeError that names the argument, never a crash or a NaN."""
import numpy as np
import pytest
import torch

import pfc_fast

from conftest import assert_metrics_close, make_features

FEATS, LABELS = make_features(200, 8, 4, seed=41)


def _with(value, index, feats=FEATS):
    bad = feats.clone()
    bad[3, index] = value
    return bad


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"feats": _with(float("nan"), 2)}, ValueError, "feats contains NaN"),
        ({"feats": _with(float("inf"), 0)}, ValueError, "feats contains NaN or Inf"),
        ({"feats": _with(float("-inf"), 5).half()}, ValueError, "feats contains NaN or Inf"),
        ({"labels": LABELS - 1, "num_classes": 4}, ValueError, r"labels must lie in \[0, 4\)"),
        ({"labels": LABELS + 1, "num_classes": 4}, ValueError, r"labels must lie in \[0, 4\)"),
        ({"labels": LABELS.float()}, TypeError, "labels must have an integer dtype"),
        ({"labels": LABELS.to(torch.uint64)}, TypeError, "labels has dtype torch.uint64, whose values int64 cannot"),
        ({"labels": LABELS[:-1]}, ValueError, r"labels must have shape \(200,\)"),
        ({"labels": LABELS.view(20, 10)}, ValueError, r"labels must have shape"),
        ({"feats": FEATS[0]}, ValueError, r"feats must have shape \(N, D\)"),
        ({"feats": FEATS[:0], "labels": LABELS[:0], "num_classes": 4}, ValueError, "feats is empty"),
        ({"feats": FEATS[:, :0]}, ValueError, r"D = 0"),
        ({"feats": (FEATS * 10).long()}, TypeError, "feats must have a floating dtype"),
        ({"feats": FEATS.bool()}, TypeError, "feats must have a floating dtype"),
        ({"feats": FEATS.tolist()}, TypeError, "feats must be a torch.Tensor or a numpy.ndarray"),
        ({"labels": torch.zeros(200, dtype=torch.long)}, ValueError, "at least 2 classes must be present"),
        ({"labels": LABELS % 2, "num_classes": 1}, ValueError, "num_classes must be >= 2"),
        ({"num_classes": 2.5}, TypeError, "num_classes must be an integer"),
        ({"feats": torch.ones(200, 8)}, ValueError, "all class means are equal"),
        ({"classifier": torch.randn(3, 8)}, ValueError, r"classifier must have shape \(num_classes, D\)"),
        ({"classifier": torch.randn(4, 7)}, ValueError, "classifier has D = 7"),
        ({"classifier": torch.zeros(4, 8)}, ValueError, "classifier is all zeros"),
        ({"classifier": torch.full((4, 8), float("nan"))}, ValueError, "classifier contains NaN"),
        ({"classifier": torch.randn(4, 8).long()}, TypeError, "classifier must have a floating dtype"),
        ({"classifier": torch.randn(4, 8), "bias": torch.randn(5)}, ValueError, r"bias must have shape \(4,\)"),
        ({"bias": torch.randn(4)}, ValueError, "bias was given without a classifier"),
        ({"predictions": LABELS + 4}, ValueError, r"predictions must lie in \[0, 4\)"),
        ({"predictions": LABELS.double()}, TypeError, "predictions must have an integer dtype"),
        ({"pooling": "max"}, ValueError, "pooling must be one of"),
        ({"global_mean": "median"}, ValueError, "global_mean must be one of"),
        ({"feats": np.array([["a"] * 8] * 200, dtype=object)}, TypeError, "feats must be a numeric array"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"feats": FEATS, "labels": LABELS, **kwargs}
    with pytest.raises(error, match=match):
        pfc_fast.nc_metrics(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: mixed-device case not run")
@pytest.mark.cuda
@pytest.mark.parametrize("moved", ["labels", "classifier", "predictions"])
def test_mixed_devices(moved):
    args = {"feats": FEATS.cuda(), "labels": LABELS.cuda(), "classifier": torch.randn(4, 8).cuda(),
            "predictions": LABELS.cuda()}
    args[moved] = args[moved].cpu()
    with pytest.raises(ValueError, match=f"{moved} is on cpu but feats is on cuda"):
        pfc_fast.nc_metrics(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: mixed-device case not run")
@pytest.mark.cuda
def test_mixed_devices_between_batches():
    acc = pfc_fast.NCAccumulator(4)
    acc.update(FEATS, LABELS)
    with pytest.raises(ValueError, match="feats is on cuda:0 but earlier batches were on cpu"):
        acc.update(FEATS.cuda(), LABELS.cuda())


def _meta(tensor):
    return tensor.to("meta")


@pytest.mark.parametrize("argument,kwargs", [
    ("feats", {"feats": _meta(FEATS)}),
    ("labels", {"labels": _meta(LABELS)}),
    ("labels", {"feats": _meta(FEATS), "labels": _meta(LABELS)}),
    ("labels", {"labels": _meta(LABELS), "num_classes": 4}),
    ("classifier", {"classifier": _meta(torch.randn(4, 8))}),
    ("bias", {"classifier": torch.randn(4, 8), "bias": _meta(torch.randn(4))}),
    ("predictions", {"predictions": _meta(LABELS)}),
    ("ood_feats", {"ood_feats": _meta(FEATS[:10])}),
], ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_meta_tensors_are_refused_naming_the_argument(argument, kwargs):
    """A meta tensor (a shape without data) gave ".item() cannot be called on meta tensors",
    "Cannot copy out of meta tensor" or a device mismatch with the other arguments (issue 14)."""
    args = {"feats": FEATS, "labels": LABELS, **kwargs}
    with pytest.raises(ValueError, match=f"^{argument} is on the meta device; pass a tensor with data$"):
        pfc_fast.nc_metrics(**args)


def test_meta_tensors_are_refused_by_the_accumulator():
    with pytest.raises(ValueError, match="^feats is on the meta device"):
        pfc_fast.NCAccumulator(4).update(_meta(FEATS), _meta(LABELS))
    with pytest.raises(ValueError, match="^classifier is on the meta device"):
        pfc_fast.NCAccumulator(4, classifier=_meta(torch.randn(4, 8)))
    acc = pfc_fast.NCAccumulator(4)
    acc.update(FEATS, LABELS)
    with pytest.raises(ValueError, match="^feats is on the meta device"):  # a later batch (was: a device mismatch)
        acc.update(_meta(FEATS), _meta(LABELS))
    with pytest.raises(ValueError, match="^ood_feats is on the meta device"):
        acc.update_ood(_meta(FEATS))
    acc.next_pass()
    with pytest.raises(ValueError, match="^predictions is on the meta device"):
        acc.update(FEATS, LABELS, predictions=_meta(LABELS))


def _statistics_bytes(k, d):
    """At least three K x D and four K x K float64 matrices (docs/spec.md section 3)."""
    return 8 * k * (3 * d + 4 * k)


@pytest.mark.parametrize("num_classes", [10**7, 10**12, 2**62, 2**63, 10**30])
def test_num_classes_beyond_memory_is_refused_with_the_bytes(num_classes):
    """A huge num_classes with small data gave the allocator's "can't allocate memory: you tried to
    allocate ..." (10**12), "Storage size calculation overflowed" (2**62) or a schema error for
    values beyond int64 (issue 14); 10**7 classes need 3.2e15 bytes for their K x K matrices alone."""
    needed = _statistics_bytes(num_classes, 8)
    with pytest.raises(ValueError, match=f"^num_classes = {num_classes} is too many classes for feats "
                                         f"\\(D = 8\\): .* at least {needed:,} bytes"):
        pfc_fast.nc_metrics(FEATS, LABELS, num_classes=num_classes)
    with pytest.raises(ValueError, match=f"^num_classes = {num_classes} is too many classes for feats \\(the "
                                         f"K x K matrices alone, whatever D\\): .* at least {32 * num_classes**2:,} bytes"):
        pfc_fast.NCAccumulator(num_classes)  # the constructor: its K x K statistics fit no device


def test_num_classes_inferred_from_huge_labels_is_refused_naming_the_labels():
    labels = LABELS * 10**11  # max(labels) + 1 = 3e11 + 1 classes
    k = int(labels.max()) + 1
    with pytest.raises(ValueError, match=f"^labels go up to {k - 1}, so num_classes = max\\(labels\\) \\+ 1 = {k}, "
                                         f"which is too many classes .* at least {_statistics_bytes(k, 8):,} bytes"):
        pfc_fast.nc_metrics(FEATS, labels)


def test_num_classes_memory_rule_at_its_boundary(monkeypatch):
    """The rule is exactly "8 K (3 D + 4 K) bytes must be free": with that much free the metrics are
    computed (and equal to those with the default num_classes), with a byte less they are refused."""
    k = 50  # 46 absent classes
    needed = _statistics_bytes(k, 8)
    expected = pfc_fast.nc_metrics(FEATS, LABELS).to_dict()
    expected["class_counts"] += [0] * 46
    monkeypatch.setattr(pfc_fast._memory, "free_bytes", lambda device: needed)
    assert_metrics_close(pfc_fast.nc_metrics(FEATS, LABELS, num_classes=k), expected, rtol=1e-12)
    monkeypatch.setattr(pfc_fast._memory, "free_bytes", lambda device: needed - 1)
    message = f"num_classes = 50 .* at least {needed:,} bytes .* more than the {needed - 1:,} bytes free on cpu"
    with pytest.raises(ValueError, match=message):
        pfc_fast.nc_metrics(FEATS, LABELS, num_classes=k)
    acc = pfc_fast.NCAccumulator(k)  # 32 K^2 bytes fit: refused at the first batch, which gives D
    with pytest.raises(ValueError, match=message):
        acc.update(FEATS, LABELS)


def test_num_classes_for_an_accumulator_of_unknown_device(monkeypatch):
    """Before its first batch an accumulator does not know its device: its constructor refuses only
    K x K statistics (32 K^2 bytes) that fit neither the CPU's free memory nor the largest CUDA device,
    whose total memory it asks for only then."""
    k = 1000
    monkeypatch.setattr(pfc_fast._memory, "free_bytes", lambda device: 32 * k * k - 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"at least {32 * k * k:,} bytes .* more than the {32 * k * k - 1:,} bytes "
                                         "free on cpu"):
        pfc_fast.NCAccumulator(k)

    class Properties:
        total_memory = 32 * k * k

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties())
    pfc_fast.NCAccumulator(k)  # fits a CUDA device
    Properties.total_memory -= 1
    with pytest.raises(ValueError, match=f"more than the {32 * k * k - 1:,} bytes free on cpu"):
        pfc_fast.NCAccumulator(k)
    Properties.total_memory = 32 * k * k - 2  # below the CPU's free memory too: the CPU's is the larger
    with pytest.raises(ValueError, match="bytes free on cpu"):
        pfc_fast.NCAccumulator(k)


def test_accumulator_arguments():
    with pytest.raises(TypeError, match="num_classes must be an integer"):
        pfc_fast.NCAccumulator(None)
    with pytest.raises(ValueError, match="global_mean must be one of"):
        pfc_fast.NCAccumulator(3, global_mean="x")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, np.uint16, np.uint32], ids=str)
def test_unsigned_labels_are_class_indices(dtype):
    """Unsigned labels (uint16 and uint32 once gave "must have an integer dtype") are the same classes."""
    labels = LABELS.numpy().astype(dtype) if isinstance(dtype, type) else LABELS.to(dtype)
    assert pfc_fast.nc_metrics(FEATS, labels).to_dict() == pfc_fast.nc_metrics(FEATS, LABELS).to_dict()


@pytest.mark.parametrize("eps", [np.float32(0.4), np.float64(0.4), torch.tensor(0.4), torch.tensor(0.4, dtype=torch.float64),
                                 np.array(0.4)], ids=lambda e: type(e).__name__ + str(getattr(e, "dtype", "")))
def test_numbers_as_numpy_scalars_and_0d_tensors(eps):
    """An eps given as a numpy scalar, a 0-d tensor or a 0-d array is that number (0-d tensors and
    arrays were rejected as "not a real number")."""
    x, y = FEATS[:30].double(), FEATS[30:70].double()
    expected = pfc_fast.sinkhorn(x, y, eps=float(eps))  # the number it holds (float32-rounded where float32)
    assert float(pfc_fast.sinkhorn(x, y, eps=eps).value) == float(expected.value)


@pytest.mark.parametrize("eps,match", [(torch.tensor(True), "0-d tensor of dtype torch.bool"),
                                       (torch.tensor(0.4, device="meta"), "on the meta device"),
                                       (torch.tensor(0.4 + 1j), "complex"), (np.array("0.4"), "0-d array"),
                                       (torch.tensor([0.4]), "must be a real number")])
def test_numbers_that_are_not_real_numbers(eps, match):
    with pytest.raises(TypeError, match=match):
        pfc_fast.sinkhorn(FEATS[:30], FEATS[30:70], eps=eps)



def test_optimal_transport_inputs_that_were_silent_or_obscure():
    """A cost given with x and y (x and y were silently ignored), an empty cost (ZeroDivisionError,
    or an obscure error for B = 0), median_cost of an empty cloud (NaN)."""
    x, y = FEATS[:30], FEATS[30:70]
    cost = torch.cdist(x, y).square()
    with pytest.raises(ValueError, match="give x and y .* or cost .*, not both"):
        pfc_fast.sinkhorn(x, y, cost=cost, eps=0.5)
    for empty in (cost[:0], cost[:, :0], cost[None][:0]):
        with pytest.raises(ValueError, match=r"cost is empty \(shape"):
            pfc_fast.sinkhorn(cost=empty, eps=0.5)
    with pytest.raises(ValueError, match="at least one point"):
        pfc_fast.median_cost(x[:0], y)
    with pytest.raises(ValueError, match="y contains NaN"):
        pfc_fast.median_cost(x, torch.full((3, 8), float("nan")))
    with pytest.raises(ValueError, match="max_points"):
        pfc_fast.median_cost(x, y, max_points=0)
