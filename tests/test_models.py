"""The small-image torchvision ResNets and the constant-width ResNet."""
import pytest
import torch
import torchvision
from torch import nn

from pfc_fast.app.models import ConstantWidthResNet, build_model, small_image_resnet


@pytest.mark.parametrize("name,blocks,expansion", [("resnet18", [2, 2, 2, 2], 1), ("resnet34", [3, 4, 6, 3], 1),
                                                   ("resnet50", [3, 4, 6, 3], 4)])
def test_small_image_resnet(name, blocks, expansion):
    model = small_image_resnet(name, num_classes=7, in_channels=1, width=4)
    assert isinstance(model, torchvision.models.ResNet)
    assert (model.conv1.in_channels, model.conv1.out_channels) == (1, 4)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(stage) for stage in stages] == blocks
    x = torch.randn(2, 1, 28, 28)
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    assert h.shape == (2, 4, 28, 28)  # no downsampling in the stem
    for stage, width, size in zip(stages, (4, 8, 16, 32), (28, 14, 7, 4)):
        h = stage(h)
        assert h.shape == (2, width * expansion, size, size)
    assert model(x).shape == (2, 7)


def test_constant_width_blocks_keep_the_dimension():
    model = ConstantWidthResNet(num_classes=3, in_channels=3, width=6, depth=4).eval()
    x = torch.randn(2, 3, 10, 10)
    h = model.stem(x)
    assert h.shape == (2, 6, 10, 10)
    for block in model.blocks:
        out = block(h)
        assert out.shape == h.shape
        inner = block.conv2(torch.relu(block.bn2(block.conv1(torch.relu(block.bn1(h))))))
        torch.testing.assert_close(out, h + inner)  # x_{l+1} = x_l + v_l(x_l)
        h = out
    assert model(x).shape == (2, 3)
    assert list(model.pfc_layers().items()) == [("stem", "stem")] + [(f"block{i}", f"blocks.{i - 1}")
                                                                     for i in range(1, 5)]


def test_build_model_arguments():
    assert isinstance(build_model("cwresnet", 10, 1), ConstantWidthResNet)
    assert build_model("resnet18", 10, 3).conv1.out_channels == 64  # torchvision's width
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vgg11", 10, 3)
    with pytest.raises(ValueError, match="width must be >= 1, got 0"):
        build_model("resnet18", 10, 3, width=0)
    with pytest.raises(TypeError, match="width must be an integer, got True"):
        build_model("resnet18", 10, 3, width=True)
    with pytest.raises(ValueError, match="depth applies to cwresnet only"):
        build_model("resnet18", 10, 3, depth=3)
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
        build_model("cwresnet", 10, 3, depth=0)
    with pytest.raises(TypeError, match="depth must be an integer, got 2.0"):
        build_model("cwresnet", 10, 3, depth=2.0)
