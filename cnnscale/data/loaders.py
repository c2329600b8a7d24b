"""The run's data loaders: the torch DataLoader path or the device-resident path, prepared by Accelerate."""

from __future__ import annotations

from typing import Any

from cnnscale.data.datasets import build_datasets, build_loaders, head_classes
from cnnscale.data.device import build_device_loaders
from cnnscale.data.images import bad_summary

__all__ = ["build", "DataParts", "KNOWN_CLASSES"]

KNOWN_CLASSES = {"cifar10": 10, "synthetic": 10}  # data sets whose class count is known without reading them


class DataParts(tuple):
    """``(train, val, test, num_classes)``, unpacked as before, with :attr:`env`: what env.json records about the
    data (``bad_images_skipped``, ``bad_images``; empty when nothing was left out)."""

    env: dict[str, Any]

    def __new__(cls, parts: tuple[Any, Any, Any, int], env: dict[str, Any]) -> DataParts:
        obj = super().__new__(cls, parts)
        obj.env = env
        return obj


def _report(bad: tuple[str, ...], accelerator: Any) -> dict[str, Any]:
    """Say on the main process how many unreadable files were left out, and what env.json records."""
    if not bad:
        return {}
    if accelerator.is_main_process:
        print(f"data: skipped {len(bad)} unreadable image file(s) (data.skip_bad_images); first: {bad[0]}",
              flush=True)
    return bad_summary(list(bad))


def build(cfg: Any, accelerator: Any) -> DataParts:
    """Prepared (train, val, test) loaders and the model's number of classes, for either loader kind. The data
    decides the class count (a ``model.num_classes`` that disagrees is a one-line error naming both).

    The torch path's distributed sampler comes from ``accelerator.prepare``; the device path shards itself.
    """
    if cfg.data.name in KNOWN_CLASSES:  # before any data is read (or downloaded)
        head_classes(cfg.model, cfg.data.name, KNOWN_CLASSES[cfg.data.name])
    if cfg.data.loader == "device":
        train, val, test, classes = build_device_loaders(cfg, accelerator)
        return DataParts((train, val, test, classes), _report(train.bad, accelerator))
    splits = build_datasets(cfg.data, cfg.train.seed)
    classes = head_classes(cfg.model, cfg.data.name, splits.num_classes)
    train, val, test = build_loaders(cfg.data, cfg.train, splits, accelerator.num_processes,
                                     pin=accelerator.device.type == "cuda")
    if val is None:
        train, test = accelerator.prepare(train, test)
    else:
        train, val, test = accelerator.prepare(train, val, test)
    return DataParts((train, val, test, classes), _report(splits.bad, accelerator))
