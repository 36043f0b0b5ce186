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
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(9)
    model = small_image_resnet("resnet18", 5, in_channels=2, width=4)
    images, labels = _data(100, 2, 8, 5, seed=10)
    whole = pfc_fast.PFCMonitor(model, num_classes=5).measure([(images, labels)])
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as handle:
            accuracy, layers = pickle.load(handle)
        assert accuracy == whole.accuracy
        assert len(layers) == len(whole.layers)
        for ours, expected in zip(layers, whole.layers.values()):
            assert ours["num_samples"] == 100
            assert_metrics_close(pfc_fast.NCMetrics(**ours), expected.to_dict(), rtol=1e-9)


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
    with pytest.raises(ValueError, match="^num_classes = 1000000000000 is too many classes for the 2 monitored "
                                         f"layer\\(s\\) .* at least {2 * 32 * 10**24:,} bytes"):
        pfc_fast.PFCMonitor(model, layers=["a", "b"], num_classes=10**12)
    x, y = _two_linear_data(seed_for("memory"))
    needed = 8 * 3 * (3 * 6 + 4 * 3) + 8 * 3 * (3 * 3 + 4 * 3)  # D = 6 (a), 3 (b)
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
