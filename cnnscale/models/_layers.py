"""Layers and helpers shared by the model families: conv-BN-activation, ``make_divisible``, weight init."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["ConvBNAct", "make_divisible", "init_weights"]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going below ``min_value`` (default ``divisor``)
    and never more than 10% below ``value``. Used for channel counts under a width multiplier (MobileNet)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNAct(nn.Sequential):
    """``Conv2d`` (no bias, "same" padding for odd kernels) -> ``BatchNorm2d`` -> activation.

    ``activation=None`` leaves the activation out (a linear bottleneck, or a residual branch's last conv).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: Callable[..., nn.Module] | None = nn.ReLU,
    ) -> None:
        padding = (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


def init_weights(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """torchvision's init: Kaiming-normal (fan_out) convs, BN to identity, ``N(0, linear_std)`` linears.

    ``linear_std=None`` keeps PyTorch's default init for linear layers (torchvision's ResNet does so).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
