"""AlexNet (Krizhevsky et al. 2012) adapted to 32x32 CIFAR input.

The seed used torchvision's ImageNet AlexNet unchanged, which fails on 32x32 input ("Output size is too small" at
the last max-pool: the 11x11 stride-4 stem leaves a 7x7 map, the 3x3/2 pools shrink it to 3, 1, then nothing).
This version keeps AlexNet's shape (five convs 64-192-384-256-256 with three max-pools, then the dropout
4096-4096 head) and changes only what the input size forces:

- stem: 11x11 stride 4 padding 2 -> 3x3 stride 2 padding 1 (32 -> 16). An 11x11 kernel would span a third of the
  image; stride 2 rather than 1 keeps the head at the ~23M parameters measured for the seed's adapted AlexNet.
- conv2: 5x5 -> 3x3 (on an 8x8 map a 5x5 kernel sees mostly padding).
- max-pools: 3x3 stride 2 -> 2x2 stride 2, so the maps go 16 -> 8 -> 4 -> 2 and never vanish.
- adaptive pool: 6x6 -> 2x2 (an identity at 32x32 input), so the first linear layer is 256*2*2 -> 4096.

Result: 23,272,266 parameters at 10 classes (the measured "AlexNet (CIFAR-adapted) 23.3M"), about 62.7M forward
MACs. The seed's table quoted 61.1M params / 727M MACs: those are ImageNet AlexNet's at 224x224, 1000 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnscale.models._layers import init_weights
from cnnscale.models._registry import register_model

__all__ = ["AlexNet", "alexnet"]


def _conv_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride, 1), nn.ReLU(inplace=True)]


class AlexNet(nn.Module):
    """AlexNet for 32x32 input: five convs (no BatchNorm, as in the original) and the 4096-4096 dropout head."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_relu(3, 64, stride=2),  # CIFAR: 3x3/2 stem instead of 11x11/4; 32 -> 16
            nn.MaxPool2d(2),  # CIFAR: 2x2 pools instead of 3x3/2; 16 -> 8
            *_conv_relu(64, 192),  # CIFAR: 3x3 instead of 5x5
            nn.MaxPool2d(2),  # 8 -> 4
            *_conv_relu(192, 384),
            *_conv_relu(384, 256),
            *_conv_relu(256, 256),
            nn.MaxPool2d(2),  # 4 -> 2
        )
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))  # CIFAR: 2x2 instead of 6x6; identity at 32x32
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(256 * 2 * 2, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


@register_model
def alexnet(*, num_classes: int = 10) -> AlexNet:
    """AlexNet adapted to 32x32 input (see the module docstring), 23,272,266 parameters at 10 classes."""
    return AlexNet(num_classes)
