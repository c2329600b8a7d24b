"""What the machine can hold, estimated before anything is allocated: the bytes a decoded data set, a model at its
width and a micro-batch imply, against the free memory of the device that would hold them.

- :func:`check_fits` refuses with one line saying how much is needed and how much there is.
- :func:`model_bytes`: weights, gradients and two optimiser buffers per parameter (fp32), plus the activations a
  micro-batch keeps for the backward (every leaf module's output), counted on a ``meta`` copy of the model: no
  memory, no compute. A lower bound of what training takes, so a refusal is never a false alarm.
- :func:`image_count`: the images of a data set without decoding any (ImageFolder: the files with an image
  extension, one directory listing per class), for the data set's bytes (:func:`set_bytes`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from cnnscale.config import Config, DataConfig
from cnnscale.data.images import EXTENSIONS
from cnnscale.errors import UserError
from cnnscale.models import create_model, get_model_builder
from cnnscale.profile.countcache import cached_counts, count_key

__all__ = ["IMAGE_BYTES", "free_memory", "check_fits", "set_bytes", "image_count", "model_bytes", "check_run_fits",
           "gib"]

IMAGE_BYTES = 3 * 32 * 32 + 8  # one decoded uint8 image and its int64 label
_STATE_COPIES = 4  # fp32 weights, gradients, two optimiser buffers (momentum; Adam's two moments)


def gib(n: float) -> str:
    """Bytes as text: MiB below 1 GiB (``176.3 MiB``), else GiB (``12.4 GiB``)."""
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def free_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free, what they are) on ``device``: available RAM on CPU, free memory of the GPU on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory on {device}"
    return int(psutil.virtual_memory().available), "available RAM"


def check_fits(what: str, needed: int, device: torch.device | None = None, share: int = 1) -> None:
    """Refuse, before allocating, what ``device`` (default: host RAM) cannot hold: one line saying needed vs
    available. ``share``: processes of this node each needing as much of the same memory (CPU ranks)."""
    device = device or torch.device("cpu")
    available, _ = free_memory(device)
    total = needed * share
    if total > available:
        each = f" ({share} processes x {gib(needed)})" if share > 1 else ""
        where = f"memory on {device}" if device.type == "cuda" else "memory"
        avail = "free" if device.type == "cuda" else "available"
        raise UserError(f"{what} needs {gib(total)} of {where}{each}, but {gib(available)} is {avail} on this "
                        "machine")


def set_bytes(images: int) -> int:
    """Bytes of ``images`` decoded uint8 images and their labels."""
    return images * IMAGE_BYTES


def _folder_files(split: Path) -> int:
    n = 0
    with os.scandir(split) as classes:
        for c in classes:
            if c.is_dir():
                with os.scandir(c.path) as files:
                    n += sum(1 for f in files if f.name.lower().endswith(EXTENSIONS))
    return n


def image_count(cfg: DataConfig) -> int | None:
    """Training plus test images of the data set (None: an ImageFolder that cannot be listed; the loader will say
    why). No image is decoded."""
    if cfg.name == "synthetic":
        return cfg.synthetic_size + max(cfg.synthetic_size // 5, 1)
    if cfg.name == "cifar10":
        return 60_000
    try:
        return sum(_folder_files(Path(cfg.data_dir) / split) for split in ("train", "test"))
    except OSError:
        return None


def _activation_elements(model: nn.Module) -> int:
    """Elements of every leaf module's output for one 32x32 image (a meta forward: no memory, no compute); 0 when
    the model cannot run on the meta device."""
    total = [0]

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        model(torch.empty(1, 3, 32, 32, device="meta"))
    except Exception:  # a model the meta device cannot run: its activations are not counted (still a lower bound)
        return 0
    finally:
        for h in handles:
            h.remove()
    return total[0]


def model_bytes(name: str, num_classes: int | None, width_mult: float | None, micro_batch: int) -> tuple[int, int]:
    """(parameter state bytes, activation bytes of one micro-batch) for training model ``name`` in fp32. The counts
    of the meta copy (up to 0.5 s of CPU, MobileNetV2) are cached once per host (:mod:`cnnscale.profile.countcache`)."""

    def count() -> dict[str, float]:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no memory; the training RNG is untouched
            model = create_model(name, num_classes=num_classes, width_mult=width_mult)
        return {"params": sum(p.numel() for p in model.parameters()), "activations": _activation_elements(model)}

    key = count_key("fit", name, num_classes, width_mult, (1, 3, 32, 32), get_model_builder(name))
    counts = cached_counts(key, count, names=("params", "activations"))
    return int(counts["params"]) * 4 * _STATE_COPIES, int(counts["activations"]) * 4 * micro_batch


def check_run_fits(cfg: Config, device: torch.device, local_processes: int) -> None:
    """The model at its width with one micro-batch, on the training device, before anything is built: one line
    when it cannot fit. ``local_processes``: ranks of this node sharing the host RAM (CPU)."""
    m = cfg.model
    state, acts = model_bytes(m.name, m.num_classes, m.width_mult, cfg.train.micro_batch)
    width = f" at width_mult {m.width_mult:g}" if m.width_mult is not None else ""
    what = (f"model {m.name}{width} with micro_batch {cfg.train.micro_batch} (weights, gradients and optimiser "
            f"state {gib(state)}, activations {gib(acts)})")
    check_fits(what, state + acts, device, local_processes if device.type == "cpu" else 1)
