"""VGG (Simonyan & Zisserman 2015) for 32x32 CIFAR input, plus the seed's two VGG-16 heads.

- ``vgg11/13/16/19`` and their ``_bn`` variants: CIFAR VGG (the kuangliu/pytorch-cifar layout). The five max-pools
  take 32x32 to 1x1, so the features flatten to 512 and a single ``Linear(512, num_classes)`` replaces the
  ImageNet 4096-4096 head (CIFAR change: that head held 90% of the parameters).
- ``vgg16_classic``: the seed's ImageNet-style VGG-16: ``AdaptiveAvgPool2d(7x7)`` (which at 32x32 input just
  replicates the 1x1 map 49 times) and the dropout 4096-4096 head; 134,301,514 parameters at 10 classes.
- ``vgg16_gap``: the seed's global-average-pool variant: VGG-16 features without BatchNorm, global average pool,
  ``Linear(512, num_classes)``: 14,719,818 parameters. (With BatchNorm it would be 14,724,042; the seed's count
  is the one without.)

Naming follows torchvision: ``vgg16`` has no BatchNorm and ``vgg16_bn`` has it, so a name means one thing here
and elsewhere. The seed list's ``vgg16`` is therefore the plain one (14,719,818 parameters, same as
``vgg16_gap``); the "VGG-16-BN (512->10) 14.7M" measured for the seed is ``vgg16_bn`` (14,724,042). Both print
as 14.7M. Without BatchNorm, VGG-16 needs a smaller learning rate than the BN variant to train from scratch.

Convs followed by BatchNorm have no bias (it would be cancelled by the BN mean); torchvision's ``vgg*_bn`` keep
it, which adds 4,224 parameters to VGG-16-BN (14,728,266).
"""

from __future__ import annotations

import torch
from torch import nn

from cnnscale.models._layers import init_weights
from cnnscale.models._registry import register_model

__all__ = [
    "VGG", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "vgg16_classic", "vgg16_gap",
]

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool. Names as in the paper's Table 1.
CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],  # VGG-11
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],  # VGG-13
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],  # VGG-16
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_features(cfg: list[int | str], batch_norm: bool) -> nn.Sequential:
    """The conv stack of a cfg: 3x3 conv (padding 1) [-> BN] -> ReLU per int, 2x2 max-pool per "M"."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        assert isinstance(v, int)
        layers.append(nn.Conv2d(in_channels, v, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers)


def _classic_head(num_classes: int, dropout: float = 0.5) -> nn.Sequential:
    return nn.Sequential(
        nn.AdaptiveAvgPool2d((7, 7)),
        nn.Flatten(),
        nn.Linear(512 * 7 * 7, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(4096, num_classes),
    )


class VGG(nn.Module):
    """VGG features followed by a head: ``"flatten"`` (CIFAR, 512 -> classes), ``"gap"`` (global average pool,
    512 -> classes) or ``"classic"`` (7x7 adaptive pool, 4096-4096 dropout head)."""

    def __init__(self, cfg: list[int | str], batch_norm: bool, head: str = "flatten", num_classes: int = 10) -> None:
        super().__init__()
        self.features = make_features(cfg, batch_norm)
        if head == "flatten":
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(512, num_classes))  # 32x32 input -> 1x1x512 here
        elif head == "gap":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))
        elif head == "classic":
            self.head = _classic_head(num_classes)
        else:
            raise ValueError(f"unknown VGG head {head!r} (choose from: flatten, gap, classic)")
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model
def vgg11(*, num_classes: int = 10) -> VGG:
    """CIFAR VGG-11, no BatchNorm."""
    return VGG(CFGS["A"], batch_norm=False, num_classes=num_classes)


@register_model
def vgg11_bn(*, num_classes: int = 10) -> VGG:
    """CIFAR VGG-11 with BatchNorm."""
    return VGG(CFGS["A"], batch_norm=True, num_classes=num_classes)


@register_model
def vgg13(*, num_classes: int = 10) -> VGG:
    """CIFAR VGG-13, no BatchNorm."""
    return VGG(CFGS["B"], batch_norm=False, num_classes=num_classes)


@register_model
def vgg13_bn(*, num_classes: int = 10) -> VGG:
    """CIFAR VGG-13 with BatchNorm."""
    return VGG(CFGS["B"], batch_norm=True, num_classes=num_classes)


@register_model
def vgg16(*, num_classes: int = 10) -> VGG:
    """CIFAR VGG-16, no BatchNorm (torchvision naming; see the module docstring): 14,719,818 parameters."""
    return VGG(CFGS["D"], batch_norm=False, num_classes=num_classes)


@register_model
def vgg16_bn(*, num_classes: int = 10) -> VGG:
    """CIFAR VGG-16 with BatchNorm: 14,724,042 parameters (the seed's measured "VGG-16-BN (512->10)")."""
    return VGG(CFGS["D"], batch_norm=True, num_classes=num_classes)


@register_model
def vgg19(*, num_classes: int = 10) -> VGG:
    """CIFAR VGG-19, no BatchNorm."""
    return VGG(CFGS["E"], batch_norm=False, num_classes=num_classes)


@register_model
def vgg19_bn(*, num_classes: int = 10) -> VGG:
    """CIFAR VGG-19 with BatchNorm."""
    return VGG(CFGS["E"], batch_norm=True, num_classes=num_classes)


@register_model
def vgg16_classic(*, num_classes: int = 10) -> VGG:
    """The seed's VGG-16 with the ImageNet head (7x7 pool, 4096-4096, dropout): 134,301,514 parameters."""
    return VGG(CFGS["D"], batch_norm=False, head="classic", num_classes=num_classes)


@register_model
def vgg16_gap(*, num_classes: int = 10) -> VGG:
    """The seed's global-average-pool VGG-16 (no BatchNorm, 512 -> classes): 14,719,818 parameters."""
    return VGG(CFGS["D"], batch_norm=False, head="gap", num_classes=num_classes)
