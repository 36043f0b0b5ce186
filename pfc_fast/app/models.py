"""ResNets for small images: torchvision's ResNet-18/34/50 with a CIFAR-style stem, and a
constant-width ResNet whose blocks all keep the feature dimension.

- :func:`small_image_resnet`: ``torchvision.models.ResNet`` (its BasicBlock/Bottleneck blocks, its
  forward and its initialisation) with the stem of He et al. 2016 for CIFAR: a 3x3 stride-1
  convolution from the data's channels and no max-pool (``maxpool`` is ``nn.Identity``), and
  stage widths ``width, 2 width, 4 width, 8 width`` (torchvision's ImageNet model has
  ``width = 64``).
- :class:`ConstantWidthResNet`: a pre-activation ResNet (He et al. 2016b) without downsampling,
  ``x_{l+1} = x_l + v_l(x_l)`` with ``v_l = conv(relu(bn(conv(relu(bn(x))))))``: every block
  output has the shape of its input, the setting of the Wasserstein-geodesic view of
  ``docs/spec.md`` section 5 (LSS, W-path ratio).

Both expose their PFC layers (stem output, then every residual block output) to
:class:`pfc_fast.PFCMonitor`: torchvision ResNets by their module names, the constant-width
model by ``pfc_layers()``.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .._inputs import positive_int
from .config import MODELS


_RESNETS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
            "resnet50": (Bottleneck, [3, 4, 6, 3])}


def _init_like_torchvision(modules: Iterable[nn.Module]) -> None:
    """torchvision's ResNet initialisation: Kaiming-normal (fan out) convolutions, unit BatchNorm."""
    for module in modules:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)


def small_image_resnet(name: str, num_classes: int, in_channels: int = 3, width: int = 64) -> ResNet:
    """torchvision's ResNet ``name`` (resnet18/34/50) adapted to small images (e.g. 28x28, 32x32).

    The stem is a 3x3 stride-1 convolution from ``in_channels`` to ``width`` channels (then BN,
    ReLU) with no max-pool; the four stages have ``width * (1, 2, 4, 8)`` channels (times 4 at the
    output of ResNet-50's bottlenecks). Returns a ``torchvision.models.ResNet``.
    """
    if name not in _RESNETS:
        raise ValueError(f"model must be one of {', '.join(_RESNETS)}, got {name!r}")
    for value, label in ((num_classes, "num_classes"), (in_channels, "in_channels"), (width, "width")):
        positive_int(value, label)
    block, depths = _RESNETS[name]
    model = ResNet(block, depths, num_classes=num_classes)
    model.inplanes = width  # _make_layer below builds the stages from this width
    model.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.maxpool = nn.Identity()
    model.layer1 = model._make_layer(block, width, depths[0])
    model.layer2 = model._make_layer(block, 2 * width, depths[1], stride=2)
    model.layer3 = model._make_layer(block, 4 * width, depths[2], stride=2)
    model.layer4 = model._make_layer(block, 8 * width, depths[3], stride=2)
    model.fc = nn.Linear(8 * width * block.expansion, num_classes)
    _init_like_torchvision(model.modules())
    return model


class PreActBlock(nn.Module):
    """``x + conv(relu(bn(conv(relu(bn(x))))))``, 3x3 convolutions that keep channels and size."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(out)))


class ConstantWidthResNet(nn.Module):
    """Stem ``conv3x3 + BN`` to ``width`` channels, ``depth`` :class:`PreActBlock` s at that width
    and resolution, then BN, ReLU, global average pooling and a linear classifier."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, depth: int = 8) -> None:
        super().__init__()
        for value, label in ((num_classes, "num_classes"), (in_channels, "in_channels"), (width, "width"),
                             (depth, "depth")):
            positive_int(value, label)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
                                  nn.BatchNorm2d(width))
        self.blocks = nn.Sequential(*(PreActBlock(width) for _ in range(depth)))
        self.head = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)
        _init_like_torchvision(self.modules())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.head(self.blocks(self.stem(x))))
        return out

    def pfc_layers(self) -> OrderedDict[str, str]:
        """The stem and every block, in forward order: ``{display name: module name}``."""
        names = [("stem", "stem")] + [(f"block{i + 1}", f"blocks.{i}") for i in range(len(self.blocks))]
        return OrderedDict(names)


def build_model(name: str, num_classes: int, in_channels: int, width: int | None = None,
                depth: int | None = None) -> nn.Module:
    """The model ``name`` (one of ``MODELS``); ``width`` defaults to 64 for the torchvision
    ResNets and 32 for ``cwresnet``, ``depth`` (``cwresnet`` only, number of blocks) to 8."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    if name == "cwresnet":
        return ConstantWidthResNet(num_classes, in_channels, width=32 if width is None else width,
                                   depth=8 if depth is None else depth)
    if depth is not None:
        raise ValueError(f"depth applies to cwresnet only; {name} has a fixed depth")
    return small_image_resnet(name, num_classes, in_channels, width=64 if width is None else width)
