"""MobileNet v1 (Howard et al. 2017) and v2 (Sandler et al. 2018) for 32x32 CIFAR input, with ``width_mult``.

Channel counts under a width multiplier are rounded with ``make_divisible(c * width_mult, 8)``.

MobileNet v1 follows the paper: BN + ReLU after the stem and after every depthwise and every pointwise conv
(Table 1 / Figure 3). It differs from the seed's v1 in two ways:

- The seed left out the BN + ReLU after each depthwise and pointwise conv (only its stem had BN + ReLU), so its
  26 block convs composed into one linear map. The paper's BN adds 2 x (4,960 + 5,952) = 21,824 parameters
  (BN scale and shift on the 4,960 depthwise and 5,952 pointwise channels): 3,217,226 here at 10 classes
  versus the seed's 3,195,402. The convs have no bias, in both.
- CIFAR change: the stem is stride 1, not the seed's (and the paper's) stride 2. With a stride-2 stem a 32x32
  image is 1x1 after the fourth stride-2 block: the five 512-channel blocks run at 2x2 and the last block at
  1x1, where a 3x3 depthwise conv sees mostly padding. Stride 1 runs them at 4x4 and 2x2 and costs 4x the MACs
  (11.6M -> 46.4M per image) for no extra parameters; it is the usual CIFAR choice and matches the MobileNet v2
  stem here.

MobileNet v2 is the seed's CIFAR variant: torchvision's layout (ReLU6, linear bottlenecks, 1280-channel last
conv, dropout 0.2) with the stem and the first 24-channel stage at stride 1 instead of 2 (CIFAR change, so the
maps go 32 -> 16 -> 8 -> 4 instead of 224 -> 7). 2,236,682 parameters and 88.0M MACs at width 1.0.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnscale.models._layers import ConvBNAct, init_weights, make_divisible
from cnnscale.models._registry import register_model

__all__ = ["MobileNetV1", "MobileNetV2", "InvertedResidual", "mobilenet_v1", "mobilenet_v2"]

# MobileNet v1 depthwise-separable blocks: output channels, stride (the paper's Table 1 after the stem)
V1_BLOCKS: list[tuple[int, int]] = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
]

# MobileNet v2 inverted-residual stages: t (expansion), c (channels), n (blocks), s (stride of the first block)
V2_STAGES: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # CIFAR: stride 1 (ImageNet: 2)
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class MobileNetV1(nn.Module):
    """Stem conv, 13 depthwise-separable blocks (3x3 depthwise + BN + ReLU, 1x1 pointwise + BN + ReLU), pool, fc."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        in_channels = make_divisible(32 * width_mult)
        layers: list[nn.Module] = [ConvBNAct(3, in_channels, 3, stride=1)]  # CIFAR: stride 1 (paper, seed: 2)
        for channels, stride in V1_BLOCKS:
            out_channels = make_divisible(channels * width_mult)
            layers.append(ConvBNAct(in_channels, in_channels, 3, stride, groups=in_channels))  # depthwise
            layers.append(ConvBNAct(in_channels, out_channels, 1))  # pointwise
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t = 1) -> 3x3 depthwise -> 1x1 linear projection; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_channels, hidden, 1, activation=nn.ReLU6))
        layers.append(ConvBNAct(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6))
        layers.append(ConvBNAct(hidden, out_channels, 1, activation=None))  # linear bottleneck
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNet v2: stride-1 stem, the ``V2_STAGES`` table, 1x1 conv to 1280, pool, dropout, linear."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        in_channels = make_divisible(32 * width_mult)
        last_channels = make_divisible(1280 * max(1.0, width_mult))  # never narrowed, as in the paper
        layers: list[nn.Module] = [ConvBNAct(3, in_channels, 3, stride=1, activation=nn.ReLU6)]  # CIFAR: stride 1
        for t, c, n, s in V2_STAGES:
            out_channels = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_channels, out_channels, s if i == 0 else 1, t))
                in_channels = out_channels
        layers.append(ConvBNAct(in_channels, last_channels, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model
def mobilenet_v1(*, num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV1:
    """MobileNet v1 as in the paper, CIFAR stride-1 stem: 3,217,226 parameters at width 1.0, 10 classes."""
    return MobileNetV1(num_classes, width_mult)


@register_model
def mobilenet_v2(*, num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV2:
    """CIFAR MobileNet v2: 2,236,682 parameters and 88.0M MACs at width 1.0, 10 classes."""
    return MobileNetV2(num_classes, width_mult)
