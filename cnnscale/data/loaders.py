"""The run's data loaders: the torch DataLoader path or the device-resident path, prepared by Accelerate."""

from __future__ import annotations

from typing import Any

from cnnscale.data.datasets import build_datasets, build_loaders
from cnnscale.data.device import build_device_loaders

__all__ = ["build"]


def build(cfg: Any, accelerator: Any) -> tuple[Any, Any, Any, int]:
    """Prepared (train, val, test) loaders and the number of classes, for either loader kind.

    The torch path's distributed sampler comes from ``accelerator.prepare``; the device path shards itself.
    """
    if cfg.data.loader == "device":
        return build_device_loaders(cfg, accelerator)
    splits = build_datasets(cfg.data, cfg.train.seed)
    train, val, test = build_loaders(cfg.data, cfg.train, splits, accelerator.num_processes,
                                     pin=accelerator.device.type == "cuda")
    if val is None:
        train, test = accelerator.prepare(train, test)
    else:
        train, val, test = accelerator.prepare(train, val, test)
    return train, val, test, splits.num_classes
