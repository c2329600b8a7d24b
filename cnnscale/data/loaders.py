"""The run's data loaders: the torch DataLoader path or the device-resident path, prepared by Accelerate, and the
choice between them (``data.loader auto``, the default).

auto takes the device-resident loader (whole uint8 set on the training device, batched augmentation, evaluation
batched there too, no worker processes) when the decoded set fits ``data.device_budget`` of the free memory: host
RAM on CPU, where every rank of the node holds its own copy, or the GPU's free memory. Otherwise the torch
DataLoader. A resumed run keeps the loader its run directory recorded, so it continues bitwise whatever memory is
free now. The choice and its reason are printed once (main process) and recorded in env.json (``loader``,
``loader_reason``). ``--loader torch|device`` forces one.

Before any data is read, the model at its width with one micro-batch is checked against the device's memory
(:func:`cnnscale.data.fits.check_run_fits`), and the data decides the class count where it is known.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnscale.config import Config
from cnnscale.data.datasets import build_datasets, build_loaders, head_classes
from cnnscale.data.device import build_device_loaders
from cnnscale.data.fits import check_fits, check_run_fits, free_memory, gib, image_count, set_bytes
from cnnscale.data.images import bad_summary

__all__ = ["build", "DataParts", "KNOWN_CLASSES", "LoaderChoice", "choose_loader"]

KNOWN_CLASSES = {"cifar10": 10, "synthetic": 10}  # data sets whose class count is known without reading them


@dataclass(frozen=True)
class LoaderChoice:
    """``kind``: torch or device; ``reason``: why, one line (printed, and env.json's ``loader_reason``)."""

    kind: str
    reason: str


class DataParts(tuple):
    """``(train, val, test, num_classes)``, unpacked as before, with :attr:`env`: what env.json records about the
    data (``loader``, ``loader_reason``, ``decode_cache``; ``bad_images_skipped``, ``bad_images`` when files were
    left out) and :attr:`loader`: the loader used (torch or device)."""

    env: dict[str, Any]
    loader: str

    def __new__(cls, parts: tuple[Any, Any, Any, int], env: dict[str, Any]) -> DataParts:
        obj = super().__new__(cls, parts)
        obj.env, obj.loader = env, env.get("loader", "torch")
        return obj


def _local_processes(accelerator: Any) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def _folder_classes(cfg: Config) -> int | None:
    """An ImageFolder's class folders, counted without reading a file; None below 2 (the loader says why)."""
    try:
        with os.scandir(Path(cfg.data.data_dir) / "train") as it:
            n = sum(1 for e in it if e.is_dir())
    except OSError:
        return None
    return n if n >= 2 else None


def _resumed_loader(cfg: Config) -> str | None:
    """The loader the resumed run directory recorded (None: fresh run, or no readable record)."""
    if not cfg.train.resume:
        return None
    try:
        kind = json.loads((Path(cfg.train.resume) / "env.json").read_text()).get("loader")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in ("torch", "device") else None


def choose_loader(cfg: Config, device: Any, local_processes: int = 1) -> LoaderChoice:
    """The loader for ``data.loader`` on ``device`` (see the module docstring). Costs one listing of an ImageFolder's
    class directories; nothing is decoded."""
    d = cfg.data
    if d.loader != "auto":
        return LoaderChoice(d.loader, f"data.loader {d.loader}, as asked")
    resumed = _resumed_loader(cfg)
    if resumed is not None:
        return LoaderChoice(resumed, f"auto: {resumed}, as the resumed run {cfg.train.resume} used")
    n = image_count(d)
    if n is None:
        return LoaderChoice("torch", f"auto: torch, the images of {d.data_dir} cannot be counted")
    free, kind = free_memory(device)
    share = local_processes if device.type == "cpu" else 1
    need, budget = set_bytes(n) * share, free * d.device_budget
    ranks = f" x {share} processes" if share > 1 else ""
    sizes = (f"the decoded set ({n:,} images, {gib(set_bytes(n))}{ranks}) {{}} {d.device_budget:g} of "
             f"{gib(free)} {kind} (data.device_budget)")
    if need <= budget:
        return LoaderChoice("device", "auto: device, " + sizes.format("fits in"))
    return LoaderChoice("torch", "auto: torch, " + sizes.format("does not fit in"))


def _report(bad: tuple[str, ...], accelerator: Any) -> dict[str, Any]:
    """Say on the main process how many unreadable files were left out, and what env.json records."""
    if not bad:
        return {}
    if accelerator.is_main_process:
        print(f"data: skipped {len(bad)} unreadable image file(s) (data.skip_bad_images); first: {bad[0]}",
              flush=True)
    return bad_summary(list(bad))


def build(cfg: Config, accelerator: Any) -> DataParts:
    """Prepared (train, val, test) loaders and the model's number of classes, for the chosen loader kind. The data
    decides the class count (a ``model.num_classes`` that disagrees is a one-line error naming both).

    The torch path's distributed sampler comes from ``accelerator.prepare``; the device path shards itself.
    """
    known = KNOWN_CLASSES.get(cfg.data.name) or _folder_classes(cfg)
    if known:  # before any data is read (or downloaded, or decoded)
        head_classes(cfg.model, cfg.data.name, known)
    device, local = accelerator.device, _local_processes(accelerator)
    check_run_fits(cfg, device, local)
    choice = choose_loader(cfg, device, local)
    if accelerator.is_main_process:
        print(f"data: {choice.kind} loader ({choice.reason})", flush=True)
    env: dict[str, Any] = {"loader": choice.kind, "loader_reason": choice.reason}
    if choice.kind == "device":
        n = image_count(cfg.data)
        if n is not None:  # forced or chosen: refused in one line when the device cannot hold it
            check_fits(f"the decoded data set for the device loader ({n:,} images)", set_bytes(n), device,
                       local if device.type == "cpu" else 1)
        train, val, test, classes = build_device_loaders(cfg, accelerator)
        env["decode_cache"] = train.cache
        return DataParts((train, val, test, classes), {**env, **_report(train.bad, accelerator)})
    splits = build_datasets(cfg.data, cfg.train.seed)
    classes = head_classes(cfg.model, cfg.data.name, splits.num_classes)
    train, val, test = build_loaders(cfg.data, cfg.train, splits, accelerator.num_processes,
                                     pin=accelerator.device.type == "cuda")
    if val is None:
        train, test = accelerator.prepare(train, test)
    else:
        train, val, test = accelerator.prepare(train, val, test)
    return DataParts((train, val, test, classes), {**env, **_report(splits.bad, accelerator)})
