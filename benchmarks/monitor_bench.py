"""The monitor benchmark: the per-epoch cost of :meth:`pfc_fast.PFCMonitor.measure` (the NC metrics
of every layer on the probe set) against one training epoch, i.e. the overhead of measuring PFC in
``pfc-fast train``.

Inputs: the Fashion-MNIST subset inside the package (``pfc_fast.data.load_dataset("embedded")``,
28x28 images), ``train_per_class`` training images per class for the epoch and, drawn from them as
``pfc-fast train`` draws it (seed 0), the class-balanced probe set of ``probe_per_class`` images
per class; the model of :func:`pfc_fast.models.build_model`. The epoch is that of ``pfc-fast
train`` with its default options (``pfc_fast.train.DEFAULTS``: SGD with momentum and weight
decay, batch 128, cross-entropy, no augmentation, shuffled order); the measurement is
``PFCMonitor(model, num_classes=10).measure`` on the probe set in batches of 512, as ``pfc-fast
train`` calls it (flattened features: ``D = width * 28 * 28`` at the stem).
"""
import torch
import torch.nn.functional as F

import pfc_fast
from pfc_fast.data import balanced_indices, load_dataset, to_float
from pfc_fast.models import build_model
from pfc_fast.train import DEFAULTS

from .cases import Case, Contender, Table, check_size

TABLES = {"monitor": Table("`PFCMonitor.measure` against a training epoch (embedded Fashion-MNIST subset)",
                           (("model", "model"), ("width", "width"), ("depth", "blocks"),
                            ("train_per_class", "train / class"), ("probe_per_class", "probe / class")))}
CONTENDERS = {"train_epoch": Contender("training epoch", "reference"),
              "ours": Contender("PFCMonitor.measure", "ours")}
TARGETS = []

_RESNET18 = {"model": "resnet18", "width": 16, "depth": None, "train_per_class": 500, "probe_per_class": 50}
_CWRESNET = {"model": "cwresnet", "width": 16, "depth": 8, "train_per_class": 500, "probe_per_class": 50}
#: ``{size: {device type: [params]}}``.
_GRIDS = {
    "tiny": {device: [{"model": "cwresnet", "width": 4, "depth": 2, "train_per_class": 20, "probe_per_class": 5}]
             for device in ("cpu", "cuda")},
    "quick": {"cpu": [_RESNET18], "cuda": [_RESNET18]},
    "full": {"cpu": [_RESNET18, _CWRESNET],
             "cuda": [_RESNET18, {**_RESNET18, "width": 64}, _CWRESNET, {**_CWRESNET, "width": 32}]},
}


def cases(device_type, size):
    return [Case("monitor", "monitor", params, (), tuple(CONTENDERS)) for params in _GRIDS[check_size(size)][device_type]]


def make_inputs(case, device):
    """The model, its optimiser, the training images and the probe batches on ``device``."""
    p = case.params
    data = load_dataset("embedded")
    chosen = balanced_indices(data.train_labels, p["train_per_class"], data.num_classes, 0, name="train_per_class")
    images, labels = data.train_images[chosen].to(device), data.train_labels[chosen].to(device)
    probe = balanced_indices(labels.cpu(), p["probe_per_class"], data.num_classes, 0).to(device)
    mean, std = data.normalization()
    torch.manual_seed(0)
    model = build_model(p["model"], data.num_classes, data.channels, p["width"], p["depth"]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=DEFAULTS["lr"], momentum=DEFAULTS["momentum"],
                                weight_decay=DEFAULTS["weight_decay"])
    return {"model": model, "optimizer": optimizer, "images": images, "labels": labels, "mean": mean, "std": std,
            "probe": [(to_float(images[index], mean, std), labels[index]) for index in probe.split(512)],
            "monitor": pfc_fast.PFCMonitor(model, num_classes=data.num_classes)}


def _epoch(inputs):
    model, optimizer, labels = inputs["model"], inputs["optimizer"], inputs["labels"]
    model.train()
    for index in torch.randperm(len(labels), device=labels.device).split(DEFAULTS["batch_size"]):
        loss = F.cross_entropy(model(to_float(inputs["images"][index], inputs["mean"], inputs["std"])),
                               labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def runner(case, inputs, name):
    """The timed call of contender ``name``."""
    return {"train_epoch": lambda: _epoch(inputs), "ours": lambda: inputs["monitor"].measure(inputs["probe"])}[name]


def floor(case, name, rates):
    """No floor: the cost is the network's forward pass."""
    return None
