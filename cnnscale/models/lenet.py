"""LeNet-5 (LeCun et al. 1998) in its common modern form: ReLU and max-pooling, for 32x32x3 input.

No BatchNorm and no dropout, so a step is deterministic given the data: the distributed tests use it for exact
DDP-versus-single-process parity. 62,006 parameters and 651,720 forward MACs at 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnscale.models._registry import register_model

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    """conv 3->6 5x5, pool, conv 6->16 5x5, pool, fc 400->120->84->num_classes.

    The original takes 32x32x1; the only CIFAR change is three input channels.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, kernel_size=5),  # 32 -> 28
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(6, 16, kernel_size=5),  # 14 -> 10
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 10 -> 5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model
def lenet5(*, num_classes: int = 10) -> LeNet5:
    """LeNet-5, ReLU variant, 62,006 parameters at 10 classes."""
    return LeNet5(num_classes)
