"""ResNet (He et al. 2016) with the CIFAR stem.

CIFAR change: the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool, 224 -> 56) becomes a 3x3 stride-1
conv with 64 channels and no max-pool, so the four stages run at 32, 16, 8 and 4 pixels. The stages, widths and
blocks are the paper's; shortcuts are identity, or 1x1 conv + BN where the shape changes (the paper's option B).
``resnet18`` has 11,173,962 parameters at 10 classes (torchvision's ImageNet resnet18 has 11,689,512 at 1000
classes) and 0.556 GMACs per 32x32 image.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnscale.models._layers import ConvBNAct, init_weights
from cnnscale.models._registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return ConvBNAct(in_channels, out_channels, kernel_size=1, stride=stride, activation=None)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). ``expansion``: output channels per ``planes``."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.residual = nn.Sequential(
            ConvBNAct(in_channels, planes, 3, stride),
            ConvBNAct(planes, out_channels, 3, activation=None),
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as in torchvision's "ResNet v1.5"), 1x1 expand x4 (ResNet-50+)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.residual = nn.Sequential(
            ConvBNAct(in_channels, planes, 1),
            ConvBNAct(planes, planes, 3, stride),
            ConvBNAct(planes, out_channels, 1, activation=None),
        )
        self.shortcut = _shortcut(in_channels, out_channels, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.residual(x) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: stem, four stages of ``depths[i]`` blocks at widths 64-128-256-512, global pool, linear."""

    def __init__(
        self, block: type[BasicBlock | Bottleneck], depths: tuple[int, int, int, int], num_classes: int = 10
    ) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 64, 3, stride=1)  # CIFAR: 3x3/1 conv, no max-pool (ImageNet: 7x7/2 + pool)
        stages: list[nn.Module] = []
        in_channels = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            blocks: list[nn.Module] = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_channels, planes, stride))
                in_channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self, linear_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


# depth -> (block, blocks per stage), the paper's Table 1
ARCHS: dict[int, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def _resnet(depth: int, num_classes: int) -> ResNet:
    block, depths = ARCHS[depth]
    return ResNet(block, depths, num_classes)


@register_model
def resnet18(*, num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-18: 11,173,962 parameters at 10 classes."""
    return _resnet(18, num_classes)


@register_model
def resnet34(*, num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-34 (BasicBlock)."""
    return _resnet(34, num_classes)


@register_model
def resnet50(*, num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-50 (Bottleneck)."""
    return _resnet(50, num_classes)


@register_model
def resnet101(*, num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-101 (Bottleneck)."""
    return _resnet(101, num_classes)


@register_model
def resnet152(*, num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-152 (Bottleneck)."""
    return _resnet(152, num_classes)
