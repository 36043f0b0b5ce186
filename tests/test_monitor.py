"""PFCMonitor against nc_metrics on features computed by hand (explicit forward through the
layers, no hooks), on the project's and on torchvision's own ResNets; the model left as it was;
bad arguments; two gloo processes equal one."""
import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn

import pfc_fast
from pfc_fast import reference
from pfc_fast.app.models import ConstantWidthResNet, small_image_resnet

from conftest import assert_metrics_close, resnet_by_hand, seed_for


def _data(n, channels, size, classes, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randn(n, channels, size, size, generator=gen) + labels.float()[:, None, None, None] * 0.3
    return images, labels


def _batches(images, labels, sizes):
    out, start = [], 0
    for size in sizes:
        out.append((images[start:start + size], labels[start:start + size]))
        start += size
    assert start == len(labels)
    return out


def _trained_a_little(model, images, labels):
    """A few SGD steps so BatchNorm statistics and weights are not at their initial values."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("pooling", ["flatten", "gap"])
@pytest.mark.parametrize("cache_bytes", [pfc_fast.monitor.DEFAULT_CACHE_BYTES, 0], ids=["one-forward", "two-forward"])
def test_matches_nc_metrics_by_hand(pooling, cache_bytes):
    torch.manual_seed(0)
    images, labels = _data(90, 1, 12, 6, seed=1)
    model = _trained_a_little(small_image_resnet("resnet18", 6, in_channels=1, width=4), images, labels)
    monitor = pfc_fast.PFCMonitor(model, num_classes=6, pooling=pooling, cache_bytes=cache_bytes)
    result = monitor.measure(_batches(images, labels, [40, 33, 17]))
    assert result.forward_passes == (1 if cache_bytes else 2)
    model.eval()
    with torch.no_grad():
        feats, logits = resnet_by_hand(model, images)
    predictions = logits.argmax(1)
    assert result.accuracy == pytest.approx(float((predictions == labels).double().mean()))
    assert monitor.layer_names == list(result.layers) == ["stem"] + [f"layer{s}.{b}" for s in range(1, 5)
                                                                     for b in range(2)]
    for name, h in zip(result.layers, feats):
        expected = pfc_fast.nc_metrics(h, labels, num_classes=6, predictions=predictions, pooling=pooling)
        assert_metrics_close(result.layers[name], expected.to_dict(), rtol=1e-9)
    assert [layer["name"] for layer in result.to_list()] == monitor.layer_names


def test_every_layer_against_the_reference(device):
    """Through the kernels of each device (on simt: the CUDA kernels under the SIMT layer), every
    layer's metrics against the float64 reference formulas on features computed by hand."""
    torch.manual_seed(8)
    images, labels = _data(36, 1, 8, 3, seed=9)
    model = _trained_a_little(small_image_resnet("resnet18", 3, in_channels=1, width=4), images, labels).to(device)
    monitor = pfc_fast.PFCMonitor(model, num_classes=3, pooling="gap")
    result = monitor.measure(_batches(images.to(device), labels.to(device), [20, 16]), classifier=model.fc)
    model.eval()
    with torch.no_grad():
        feats, logits = resnet_by_hand(model, images.to(device))
    for name, h in zip(result.layers, feats):
        matches = h.shape[1] == model.fc.in_features  # the monitor applies the classifier where D fits
        weight = dict(classifier=model.fc.weight.cpu(), bias=model.fc.bias.cpu()) if matches else {}
        expected = reference.nc_metrics(h.cpu(), labels, num_classes=3, predictions=logits.argmax(1).cpu(),
                                        pooling="gap", **weight)
        assert_metrics_close(result.layers[name], expected, rtol=1e-8)


def test_torchvision_resnets_default_hooks():
    """Unmodified torchvision ResNets (7x7 stride-2 stem, max-pool): 'stem' is the max-pool output."""
    torch.manual_seed(2)
    images, labels = _data(40, 3, 32, 4, seed=3)
    model = torchvision.models.resnet18(num_classes=4).eval()
    result = pfc_fast.PFCMonitor(model, num_classes=4).measure(_batches(images, labels, [25, 15]))
    with torch.no_grad():
        feats, logits = resnet_by_hand(model, images)
    assert feats[0].shape[-1] == 8  # 32 -> conv stride 2 -> max-pool stride 2
    for name, h in zip(result.layers, feats):
        expected = pfc_fast.nc_metrics(h, labels, predictions=logits.argmax(1))
        assert_metrics_close(result.layers[name], expected.to_dict(), rtol=1e-9)
    bottleneck = pfc_fast.PFCMonitor(torchvision.models.resnet50(num_classes=4), num_classes=4)
    assert bottleneck.layer_names == ["stem"] + [f"layer{s}.{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3))
                                                 for b in range(n)]


def test_constant_width_model_and_named_layers():
    torch.manual_seed(4)
    images, labels = _data(30, 2, 6, 3, seed=5)
    model = ConstantWidthResNet(3, in_channels=2, width=5, depth=3).eval()
    default = pfc_fast.PFCMonitor(model, num_classes=3, pooling="gap").measure([(images, labels)])
    assert list(default.layers) == ["stem", "block1", "block2", "block3"]
    named = pfc_fast.PFCMonitor(model, layers=["blocks.1", "stem"], num_classes=3, pooling="gap")
    result = named.measure([(images, labels)])
    assert list(result.layers) == ["blocks.1", "stem"]  # the order given
    assert result.layers["blocks.1"].to_dict() == default.layers["block2"].to_dict()
    with torch.no_grad():
        h = model.stem(images)
        expected = pfc_fast.nc_metrics(model.blocks[1](model.blocks[0](h)), labels, pooling="gap",
                                       predictions=model(images).argmax(1))
    assert_metrics_close(result.layers["blocks.1"], expected.to_dict(), rtol=1e-9)
    tracks = named.features(images)
    assert list(tracks) == ["blocks.1", "stem"] and tracks["stem"].shape == (30, 5)


def test_classifier_gives_nc3_at_the_matching_layer():
    torch.manual_seed(6)
    images, labels = _data(48, 1, 8, 4, seed=7)
    model = small_image_resnet("resnet18", 4, in_channels=1, width=4).eval()
    result = pfc_fast.PFCMonitor(model, num_classes=4, pooling="gap").measure([(images, labels)],
                                                                              classifier=model.fc)
    with torch.no_grad():
        feats, logits = resnet_by_hand(model, images)
    expected = pfc_fast.nc_metrics(feats[-1], labels, classifier=model.fc.weight, bias=model.fc.bias,
                                   predictions=logits.argmax(1), pooling="gap")
    assert_metrics_close(result.layers["layer4.1"], expected.to_dict(), rtol=1e-9)
    assert result.layers["stem"].nc3 is None and result.layers["layer4.0"].nc3 is not None  # both D = 32


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_model_left_as_it_was_also_after_errors():
    images, labels = _data(20, 1, 8, 2, seed=8)
    model = small_image_resnet("resnet18", 2, in_channels=1, width=4)
    model.train()
    model.layer2.eval()  # mixed modes must come back as they were
    model.fc.weight.requires_grad_(False)
    grads = [p.requires_grad for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    monitor = pfc_fast.PFCMonitor(model, num_classes=2)
    monitor.measure([(images, labels)])
    bad = [(images, labels + 5)]  # labels out of range: the accumulator raises inside the hooked region
    with pytest.raises(ValueError, match="labels must lie in"):
        monitor.measure(bad)
    assert _hook_count(model) == 0
    assert [m.training for m in model.modules()] == [not name.startswith("layer2") for name, _ in
                                                    model.named_modules()]
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # eval mode: BN stats untouched
    assert torch.is_grad_enabled()


class _SharedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(4, 4), nn.Linear(4, 3), nn.ReLU()

    def forward(self, x):
        return self.b(self.act(self.a(self.act(x))))


def test_bad_arguments():
    model = _SharedReLU()
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(TypeError, match="num_classes is required"):
        pfc_fast.PFCMonitor(model, layers=["a"])
    with pytest.raises(ValueError, match="pooling must be one of"):
        pfc_fast.PFCMonitor(model, layers=["a"], num_classes=3, pooling="max")
    with pytest.raises(ValueError, match="layers: 'c' is not a module"):
        pfc_fast.PFCMonitor(model, layers=["c"], num_classes=3)
    with pytest.raises(ValueError, match="layers: no default layers for a _SharedReLU"):
        pfc_fast.PFCMonitor(model, num_classes=3)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        pfc_fast.PFCMonitor(lambda v: v, layers=["a"], num_classes=3)
    with pytest.raises(ValueError, match="'act' ran more than once"):
        pfc_fast.PFCMonitor(model, layers=["act"], num_classes=3).measure([(x, y)])
    with pytest.raises(ValueError, match="logits of shape \\(B, num_classes = 5\\)"):
        pfc_fast.PFCMonitor(model, layers=["a"], num_classes=5).measure([(x, y)])
    monitor = pfc_fast.PFCMonitor(model, layers=["a", "b"], num_classes=3, cache_bytes=0)
    with pytest.raises(ValueError, match="loader yielded no batches"):
        monitor.measure([])
    with pytest.raises(ValueError, match="one-shot iterator"):
        monitor.measure(iter([(x, y)]))
    with pytest.raises(ValueError, match="classifier has D = 7 inputs"):
        monitor.measure([(x, y)], classifier=torch.randn(3, 7))
    assert _hook_count(model) == 0


def _rank_main(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(9)
        model = small_image_resnet("resnet18", 5, in_channels=2, width=4)
        ddp = nn.parallel.DistributedDataParallel(model)  # the monitor measures through the local module
        images, labels = _data(100, 2, 8, 5, seed=10)
        shard = _batches(images[:70], labels[:70], [30, 30, 10]) if rank == 0 else [(images[70:], labels[70:])]
        result = pfc_fast.PFCMonitor(ddp, num_classes=5).measure(shard)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as handle:
            pickle.dump((result.accuracy, [m.to_dict() for m in result.layers.values()]), handle)
        # a rank without batches: every rank raises at once (none is left waiting in an all-reduce)
        with pytest.raises(ValueError, match=f"no batches on {'another' if rank == 0 else 'this'} rank"):
            pfc_fast.PFCMonitor(ddp, num_classes=5).measure(shard if rank == 0 else [])
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(9)
    model = small_image_resnet("resnet18", 5, in_channels=2, width=4)
    images, labels = _data(100, 2, 8, 5, seed=10)
    whole = pfc_fast.PFCMonitor(model, num_classes=5).measure([(images, labels)])
    nulls = []
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as handle:
            accuracy, layers = pickle.load(handle)
        assert accuracy == whole.accuracy
        assert len(layers) == len(whole.layers)
        for ours, expected in zip(layers, whole.layers.values()):
            assert ours["num_samples"] == 100
            # the null permutes within each rank's batches, other batches than one process's
            assert_metrics_close(pfc_fast.NCMetrics(**ours), {**expected.to_dict(), "null_mean": None}, rtol=1e-9)
        nulls.append([(layer["null_mean"], layer["null_std"]) for layer in layers])
    assert nulls[0] == nulls[1] and nulls[0][0][0]["nc1"] > 0  # every rank the same null of the whole probe set


class _TwoLinear(nn.Module):
    """x -> a -> relu -> b (the logits)."""

    def __init__(self, classes=3):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, classes)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _two_linear_data(seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(30) % 3
    return torch.randn(30, 4, generator=gen) + labels[:, None].float(), labels


@pytest.mark.parametrize("cache_bytes", [pfc_fast.monitor.DEFAULT_CACHE_BYTES, 0], ids=["one-forward", "two-forward"])
def test_non_finite_features_name_the_layer(cache_bytes):
    """NaN images, or a layer whose output overflows, gave "feats contains NaN or Inf values", which
    names no layer (issue 14): the error names the first layer (display name) whose features are not finite."""
    torch.manual_seed(11)
    images, labels = _data(24, 1, 8, 3, seed=12)
    images[5, 0, 3, 3] = float("nan")
    model = small_image_resnet("resnet18", 3, in_channels=1, width=4)
    with pytest.raises(ValueError, match="^features of layer 'stem' contains NaN or Inf values$"):
        pfc_fast.PFCMonitor(model, num_classes=3, cache_bytes=cache_bytes).measure([(images, labels)])
    x, y = _two_linear_data(seed_for("non-finite", cache_bytes))
    model = _TwoLinear()
    with torch.no_grad():
        model.b.weight[0, 0] = float("inf")  # 'first' (module a) finite, 'second' (module b) not
    monitor = pfc_fast.PFCMonitor(model, layers={"first": "a", "second": "b"}, num_classes=3, cache_bytes=cache_bytes)
    with pytest.raises(ValueError, match="^features of layer 'second' contains NaN or Inf values$"):
        monitor.measure([(x[:20], y[:20]), (x[20:], y[20:])])
    assert _hook_count(model) == 0


def test_a_layer_of_equal_class_means_is_named():
    """A layer whose class means all coincide (here: constant zero features) named no layer either."""
    x, y = _two_linear_data(seed_for("dead-layer"))
    model = _TwoLinear()
    with torch.no_grad():
        model.b.weight.zero_()
        model.b.bias.zero_()
    monitor = pfc_fast.PFCMonitor(model, layers={"hidden": "a", "logits": "b"}, num_classes=3)
    with pytest.raises(ValueError, match="^features of layer 'logits': all class means are equal"):
        monitor.measure([(x, y)])


def test_num_classes_beyond_memory_is_refused(monkeypatch):
    """num_classes = 10**12 was accepted by the constructor (measure() then failed on the logits'
    shape, or, with K logits, in the allocator): the K x K statistics of the layers, 32 K^2 bytes
    each at least, are refused at once; measure() checks 8 K (3 D + 4 K) bytes per layer with the
    layers' D, here against a patched amount of free memory."""
    model = _TwoLinear()
    for null in (0, 4):  # each labelling of the permutation null keeps statistics of its own
        with pytest.raises(ValueError, match="^num_classes = 1000000000000 is too many classes for the 2 monitored "
                                             f"layer\\(s\\) .* at least {2 * 32 * 10**24 * (1 + null):,} bytes"):
            pfc_fast.PFCMonitor(model, layers=["a", "b"], num_classes=10**12, null_permutations=null)
    x, y = _two_linear_data(seed_for("memory"))
    needed = 5 * (8 * 3 * (3 * 6 + 4 * 3) + 8 * 3 * (3 * 3 + 4 * 3))  # D = 6 (a), 3 (b); the labels and 4 nulls
    monitor = pfc_fast.PFCMonitor(model, layers=["a", "b"], num_classes=3)
    monkeypatch.setattr(pfc_fast._memory, "free_bytes", lambda device: needed - 1)
    with pytest.raises(ValueError, match=f"^num_classes = 3 is too many classes for the 2 monitored layer\\(s\\) "
                                         f"\\(D = 6, 3\\): .* at least {needed:,} bytes"):
        monitor.measure([(x, y)])
    assert _hook_count(model) == 0
    monkeypatch.setattr(pfc_fast._memory, "free_bytes", lambda device: needed)
    assert list(monitor.measure([(x, y)]).layers) == ["a", "b"]


def test_a_model_on_the_meta_device_is_refused():
    with pytest.raises(ValueError, match="^model is on the meta device"):
        pfc_fast.PFCMonitor(_TwoLinear().to("meta"), layers=["a"], num_classes=3)


# PFCResult in plain training loops: to_scalars, log (a writer, TensorBoard), to_frame; the reprs
def _small_result():
    """A measured ResNet (seeded), the classifier at its last blocks (D = 32): nc3 there only."""
    torch.manual_seed(seed_for("scalars"))
    images, labels = _data(48, 1, 8, 4, seed=seed_for("scalars", "data"))
    model = small_image_resnet("resnet18", 4, in_channels=1, width=4).eval()
    monitor = pfc_fast.PFCMonitor(model, num_classes=4, pooling="gap")
    return monitor, monitor.measure([(images[:30], labels[:30]), (images[30:], labels[30:])], classifier=model.fc)


class _RecordingWriter:
    """Stands in for a SummaryWriter: records every add_scalar call."""

    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, scalar_value, global_step):
        self.calls.append((tag, scalar_value, global_step))


def test_to_scalars_are_the_numeric_fields_of_every_layer():
    _, result = _small_result()
    scalars = result.to_scalars()
    expected = {}
    for layer, m in result.layers.items():
        for name in ("nc1", "nc1_quotient", "cdnv", "nc2_equinorm", "nc2_equiangle", "nc2_etf", "gnc2_log",
                     "gnc2_log_var", "gnc2_riesz_log", "nc3", "nc3_etf", "nc3_uniform", "nc4", "nc5",
                     "ncc_accuracy", "within_trace", "between_trace", "num_samples", "num_classes", "dim"):
            if getattr(m, name) is not None:
                expected[f"pfc/{layer}/{name}"] = getattr(m, name)
        for name in m.null_mean:  # the permutation null (PFCMonitor's default: 4 permutations)
            expected[f"pfc/{layer}/{name}_null_mean"] = m.null_mean[name]
        for name in m.null_std:
            expected[f"pfc/{layer}/{name}_null_std"] = m.null_std[name]
    expected["pfc/accuracy"] = result.accuracy
    assert scalars == expected
    assert list(scalars) == list(expected)  # layers in forward order, then the accuracy
    assert all(type(value) is float for value in scalars.values())
    assert "pfc/layer4.1/nc3" in scalars and "pfc/stem/nc3" not in scalars and "pfc/stem/nc5" not in scalars
    assert not any(key.endswith(("class_counts", "per_class")) for key in scalars)
    assert scalars["pfc/stem/nc1"] == result.layers["stem"].nc1
    assert scalars["pfc/layer4.1/dim"] == 32.0 and scalars["pfc/stem/num_samples"] == 48.0
    assert result.to_scalars("probe") == {"probe" + key[3:]: value for key, value in scalars.items()}
    assert result.to_scalars("") == {key[4:]: value for key, value in scalars.items()}


def test_to_scalars_keeps_degenerate_values_and_leaves_out_per_class():
    import dataclasses
    import math

    _, result = _small_result()
    stem = dataclasses.replace(result.layers["stem"], cdnv=math.inf,
                               per_class=pfc_fast.metrics.NCClassStatistics([0, 1], torch.ones(2), torch.ones(2), torch.eye(2)))
    degenerate = pfc_fast.PFCResult({"stem": stem}, accuracy=0.5, forward_passes=1)
    scalars = degenerate.to_scalars()
    assert scalars["pfc/stem/cdnv"] == math.inf and scalars["pfc/accuracy"] == 0.5
    assert not any("per_class" in key or "mean_norms" in key for key in scalars)


def test_log_writes_every_scalar_at_the_step():
    _, result = _small_result()
    writer = _RecordingWriter()
    assert result.log(writer, step=7) is None
    assert writer.calls == [(tag, value, 7) for tag, value in result.to_scalars().items()]
    writer = _RecordingWriter()
    result.log(writer, 3, prefix="probe")
    assert writer.calls == [(tag, value, 3) for tag, value in result.to_scalars("probe").items()]


def test_log_to_a_tensorboard_summary_writer(tmp_path):
    import dataclasses
    import math

    pytest.importorskip("tensorboard", reason="tensorboard is not installed (torch.utils.tensorboard needs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    _, result = _small_result()
    later = pfc_fast.PFCResult({name: dataclasses.replace(m, cdnv=math.inf) for name, m in result.layers.items()},
                               accuracy=1.0, forward_passes=1)
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        result.log(writer, 0)
        later.log(writer, 1)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(result.to_scalars())
    for step, res in enumerate((result, later)):
        for tag, value in res.to_scalars().items():
            (event,) = [e for e in events.Scalars(tag) if e.step == step]
            assert event.value == pytest.approx(value, rel=1e-6)  # stored as float32
    assert events.Scalars("pfc/stem/cdnv")[1].value == math.inf


def test_to_frame_is_to_scalars_by_layer():
    import math

    pandas = pytest.importorskip("pandas")
    _, result = _small_result()
    frame = result.to_frame()
    assert isinstance(frame, pandas.DataFrame)
    assert list(frame.index) == list(result.layers) and frame.index.name == "layer"
    assert list(frame.columns)[:3] == ["nc1", "nc1_quotient", "cdnv"]
    assert list(frame.columns).index("nc3") == list(frame.columns).index("nc3_etf") - 1  # field order
    columns = list(frame.columns)
    assert columns.index("nc1_null_mean") > columns.index("between_trace") and columns[-1] == "between_trace_null_std"
    assert "nc5" not in frame.columns and "accuracy" not in frame.columns
    assert all(dtype == float for dtype in frame.dtypes)
    scalars = result.to_scalars()
    for layer in frame.index:
        for metric in frame.columns:
            value = frame.loc[layer, metric]
            tag = f"pfc/{layer}/{metric}"
            assert value == scalars[tag] if tag in scalars else math.isnan(value)
    assert frame.notna().sum().sum() == len(scalars) - 1  # every scalar but the accuracy


def test_to_frame_without_pandas_names_the_install(monkeypatch):
    import builtins

    _, result = _small_result()
    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ModuleNotFoundError("No module named 'pandas'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(ImportError, match=r"needs pandas.*pip install pandas"):
        result.to_frame()


def test_reprs_are_short_lines_with_the_key_numbers():
    import dataclasses
    import math

    monitor, result = _small_result()
    last = result.layers["layer4.1"]
    for text in (repr(monitor), repr(result), repr(last)):
        assert "\n" not in text and len(text) < 200 and "0x" not in text and "tensor(" not in text
    assert repr(monitor) == ("PFCMonitor(ResNet, 9 layers: stem, layer1.0, ..., layer4.1, num_classes=4, "
                             "pooling='gap')")
    assert repr(result) == (f"PFCResult(9 layers: stem, layer1.0, ..., layer4.1, accuracy={result.accuracy:.4g}, "
                            "forward_passes=1)")
    assert repr(last) == (f"NCMetrics(nc1={last.nc1:.4g}, nc2_etf={last.nc2_etf:.4g}, nc3={last.nc3:.4g}, "
                          f"nc3_etf={last.nc3_etf:.4g}, nc4={last.nc4:.4g}, K=4, D=32, N=48)")
    assert str(result.layers["stem"]).startswith("NCMetrics(nc1=") and "nc3" not in repr(result.layers["stem"])
    degenerate = dataclasses.replace(last, nc1=math.inf, nc2_etf=math.inf, nc3=math.inf, nc4=0.0)
    assert repr(degenerate) == (f"NCMetrics(nc1=inf, nc2_etf=inf, nc3=inf, nc3_etf={last.nc3_etf:.4g}, nc4=0, "
                                "K=4, D=32, N=48)")
    long_names = pfc_fast.PFCResult({f"{'block' * 10}.{i}": last for i in range(50)}, math.inf, 2)
    assert len(repr(long_names)) < 200 and "50 layers" in repr(long_names) and "accuracy=inf" in repr(long_names)


def _by_hand_metrics(feats, labels, predictions, pooling="flatten"):
    return [pfc_fast.nc_metrics(h, labels, predictions=predictions, pooling=pooling).to_dict() for h in feats]


def test_timm_resnet_default_layers_match_features_by_hand():
    """timm's ResNet (conv1, bn1, act1, maxpool, layer1..4, fc): found by its stages, not its class."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed_for("timm resnet"))
    images, labels = _data(36, 3, 32, 3, seed=seed_for("timm resnet data"))
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    monitor = pfc_fast.PFCMonitor(model, num_classes=3, pooling="gap")
    assert monitor.layer_names == ["stem"] + [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    result = monitor.measure(_batches(images, labels, [20, 16]))
    with torch.no_grad():
        feats, logits = resnet_by_hand(model, images)
        predictions = logits.argmax(1)
    for (name, metrics), expected in zip(result.layers.items(), _by_hand_metrics(feats, labels, predictions, "gap")):
        assert_metrics_close(metrics, expected, rtol=1e-9)


class _Wrapper(nn.Module):
    """A LightningModule-like wrapper: the network under an attribute, a loss beside it."""

    def __init__(self, net):
        super().__init__()
        self.loss, self.net = nn.CrossEntropyLoss(), net

    def forward(self, x):
        return self.net(x)


def test_a_resnet_inside_a_wrapper_keeps_its_layer_names():
    images, labels = _data(24, 1, 8, 3, seed=seed_for("wrapped"))
    net = small_image_resnet("resnet18", 3, in_channels=1, width=4).eval()
    wrapped = pfc_fast.PFCMonitor(_Wrapper(net), num_classes=3)
    plain = pfc_fast.PFCMonitor(net, num_classes=3)
    assert wrapped.layer_names == plain.layer_names
    assert [module is plain.layers[name] for name, module in wrapped.layers.items()] == [True] * 9
    a, b = wrapped.measure([(images, labels)]), plain.measure([(images, labels)])
    assert [m.to_dict() for m in a.layers.values()] == [m.to_dict() for m in b.layers.values()]


def _tiny_vit(num_classes=3):
    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=3, num_heads=2,
                                                hidden_dim=8, mlp_dim=16, num_classes=num_classes).eval()


def _vit_tokens_by_hand(vit, images):
    """Every encoder block's output tokens (B, S, C) of torchvision's VisionTransformer, step by step."""
    x = vit._process_input(images)
    x = torch.cat([vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    h = vit.encoder.dropout(x + vit.encoder.pos_embedding)
    tokens = []
    for block in vit.encoder.layers:
        h = block(h)
        tokens.append(h)
    return tokens


def test_torchvision_vision_transformer_blocks_by_default():
    torch.manual_seed(seed_for("vit"))
    images, labels = _data(30, 3, 16, 3, seed=seed_for("vit data"))
    vit = _tiny_vit()
    flat = pfc_fast.PFCMonitor(vit, num_classes=3)
    assert flat.layer_names == [f"layers.encoder_layer_{i}" for i in range(3)]
    class_token = pfc_fast.PFCMonitor(vit, num_classes=3, layer_transform=lambda name, out: out[:, 0])
    with torch.no_grad():
        tokens, predictions = _vit_tokens_by_hand(vit, images), vit(images).argmax(1)
    batches = _batches(images, labels, [17, 13])
    for monitor, feats in ((flat, tokens), (class_token, [t[:, 0] for t in tokens])):
        result = monitor.measure(batches)
        assert [m.dim for m in result.layers.values()] == [f[0].numel() for f in feats]
        for metrics, expected in zip(result.layers.values(), _by_hand_metrics(feats, labels, predictions)):
            assert_metrics_close(metrics, expected, rtol=1e-9)


class _DictNet(nn.Module):
    """A model of keyword inputs that returns a dict with logits (Hugging Face style)."""

    def __init__(self, vocabulary=11, width=6, classes=3, logits_key="logits"):
        super().__init__()
        self.logits_key = logits_key
        self.embed = nn.Embedding(vocabulary, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask):
        h = (self.embed(input_ids) * attention_mask[..., None]).sum(1)
        for block in self.blocks:
            h = h + block(h)
        return {self.logits_key: self.head(h), "hidden": h}


def _token_batches(seed, sizes=(9, 7)):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        ids = torch.randint(0, 11, (size, 5), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": (torch.rand(size, 5, generator=gen) > 0.2).float(),
                        "labels": ids[:, 0] % 3})
    return batches


def test_dict_batches_and_dict_outputs_by_default():
    torch.manual_seed(seed_for("dict model"))
    model = _DictNet().eval()
    batches = _token_batches(seed_for("dict batches"))
    monitor = pfc_fast.PFCMonitor(model, num_classes=3)
    assert monitor.layer_names == ["blocks.0", "blocks.1"]
    result = monitor.measure(batches)
    # the blocks' own outputs, recomputed plainly
    with torch.no_grad():
        block_out, labels, predictions = [[], []], [], []
        for batch in batches:
            h = (model.embed(batch["input_ids"]) * batch["attention_mask"][..., None]).sum(1)
            for i, block in enumerate(model.blocks):
                out = block(h)
                block_out[i].append(out)
                h = h + out
            labels.append(batch["labels"])
            predictions.append(model.head(h).argmax(1))
    expected = _by_hand_metrics([torch.cat(f) for f in block_out], torch.cat(labels), torch.cat(predictions))
    for metrics, want in zip(result.layers.values(), expected):
        assert_metrics_close(metrics, want, rtol=1e-9)
    # the same through explicit transforms: tuples in, the logits taken by the caller
    tuples = [((b["input_ids"], b["attention_mask"]), b["labels"]) for b in batches]
    explicit = pfc_fast.PFCMonitor(
        model, num_classes=3, batch_transform=lambda b: ({"input_ids": b[0][0], "attention_mask": b[0][1]}, b[1]),
        output_transform=lambda out: out["logits"]).measure(tuples)
    assert [m.to_dict() for m in explicit.layers.values()] == [m.to_dict() for m in result.layers.values()]


class _TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x), x  # (hidden, residual), as Hugging Face layers return tuples


class _TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_TupleBlock() for _ in range(3))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)[0]
        return self.head(x)


def test_image_dicts_and_layers_that_return_tuples():
    gen = torch.Generator().manual_seed(seed_for("tuple layers"))
    x, y = torch.randn(12, 4, generator=gen), torch.arange(12) % 3
    model = _TupleNet().eval()
    with pytest.raises(TypeError, match=r"layers: 'blocks.0' returned a tuple, not a tensor; pass layer_transform="):
        pfc_fast.PFCMonitor(model, num_classes=3).measure([(x, y)])
    monitor = pfc_fast.PFCMonitor(model, num_classes=3, layer_transform=lambda name, out: out[0])
    result = monitor.measure([{"image": x, "label": y, "index": torch.arange(12)}])  # extra keys are ignored
    with torch.no_grad():
        h, feats = x, []
        for block in model.blocks:
            h = block(h)[0]
            feats.append(h)
        predictions = model(x).argmax(1)
    for metrics, expected in zip(result.layers.values(), _by_hand_metrics(feats, y, predictions)):
        assert_metrics_close(metrics, expected, rtol=1e-9)
    assert list(monitor.features({"x": x})) == ["blocks.0", "blocks.1", "blocks.2"]
    with pytest.raises(TypeError, match="layer_transform returned a tuple for layer 'blocks.0', not a tensor"):
        pfc_fast.PFCMonitor(model, num_classes=3, layer_transform=lambda name, out: out).measure([(x, y)])


def test_transform_errors_name_what_to_pass():
    model = _DictNet().eval()
    batches = _token_batches(seed_for("transform errors"), sizes=(6,))
    with pytest.raises(TypeError, match=r"keys 'input_ids', 'attention_mask', none of which holds the labels"):
        pfc_fast.PFCMonitor(model, num_classes=3).measure([{k: v for k, v in batches[0].items() if k != "labels"}])
    with pytest.raises(TypeError, match=r"returned a dict with the keys 'scores', 'hidden' and no 'logits'; pass "
                                        r"output_transform="):
        pfc_fast.PFCMonitor(_DictNet(logits_key="scores"), num_classes=3).measure(batches)
    with pytest.raises(TypeError, match="returned a tuple, not logits; pass output_transform"):
        pfc_fast.PFCMonitor(nn.Sequential(_TupleBlock()), layers=["0.linear"], num_classes=4).measure([(torch.randn(
            2, 4), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match=r"^output_transform must return logits of shape \(B, num_classes = 3\), "
                                         r"got dict$"):
        pfc_fast.PFCMonitor(model, num_classes=3, output_transform=lambda out: out).measure(batches)
    with pytest.raises(TypeError, match="batch_transform must return \\(inputs, labels\\), got a dict"):
        pfc_fast.PFCMonitor(model, num_classes=3, batch_transform=lambda b: b).measure(batches)
    with pytest.raises(TypeError, match="labels of a batch must be a tensor, got a list"):
        pfc_fast.PFCMonitor(model, num_classes=3, batch_transform=lambda b: (b["input_ids"], [0])).measure(batches)
    with pytest.raises(TypeError, match="loader must yield \\(inputs, labels\\) batches or dicts"):
        pfc_fast.PFCMonitor(model, num_classes=3).measure([torch.zeros(3)])
    for name in ("batch_transform", "output_transform", "layer_transform"):
        with pytest.raises(TypeError, match=f"{name} must be callable, got str"):
            pfc_fast.PFCMonitor(model, num_classes=3, **{name: "logits"})


def test_block_lists_and_the_error_that_lists_candidates():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))  # layers, not blocks
            self.short = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(2))
            self.long = nn.Sequential(*(nn.Sequential(nn.Linear(4, 4)) for _ in range(3)))

    mixed = Mixed()
    with pytest.raises(ValueError, match=r"a Mixed has 2 lists of blocks \(short, long\), so which of them make its "
                                         r"depth is not clear; pass layers="):
        pfc_fast.monitor.default_layers(mixed)
    del mixed.short
    assert pfc_fast.monitor.default_layers(mixed) == {f"long.{i}": f"long.{i}" for i in range(3)}
    # the stages of a hierarchical model: which make the depth is the caller's choice
    with pytest.raises(ValueError, match=r"has 4 lists of blocks \(features.1, features.3, features.5, features.7\)"):
        pfc_fast.PFCMonitor(torchvision.models.convnext_tiny(num_classes=3), num_classes=3)
    flat = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"no default layers for a Sequential .* pass layers=\[module names\], e.g. "
                                         r"of the containers 0, 1, 2"):
        pfc_fast.PFCMonitor(flat, num_classes=3)
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"of the containers 0$"):
        pfc_fast.PFCMonitor(nested, num_classes=3)


class _SequenceFirst(nn.Module):
    """A layer whose output has the samples second, (S, B, C), as nn.Transformer's default layout."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):  # x (B, S, 4)
        h = self.embed(x.transpose(0, 1))  # (S, B, 6)
        return self.head(h.mean(0))


def test_a_layer_without_the_samples_first_is_named():
    gen = torch.Generator().manual_seed(seed_for("sequence first"))
    x, y = torch.randn(30, 10, 4, generator=gen), torch.arange(30) % 3
    with pytest.raises(ValueError, match=r"layers: 'embed' gives 10 rows of features for a batch of 30 samples"):
        pfc_fast.PFCMonitor(_SequenceFirst(), layers=["embed"], num_classes=3).measure([(x, y)])
    result = pfc_fast.PFCMonitor(_SequenceFirst(), layers=["embed"], num_classes=3,
                                 layer_transform=lambda name, out: out.transpose(0, 1)).measure([(x, y)])
    assert result.layers["embed"].dim == 60
