"""Model compression: what ``cnnscale distill|prune|quantize`` share.

- :mod:`cnnscale.compress.distill`: train a student from a teacher run through the ordinary training loop.
- :mod:`cnnscale.compress.prune`: global L1 unstructured pruning, optional fine-tuning through the same loop.
- :mod:`cnnscale.compress.quantize`: post-training int8 quantisation (dynamic and static), size, latency, accuracy.

Shared here: loading a trained model from a run directory (safetensors only, never pickle), the commands' parser (the
training flags plus a command's own ``--section.field`` flags, through :mod:`cnnscale.config`'s one parser), and a
plain test-set accuracy loop.

A *source* is a run directory written by ``cnnscale train`` (``config.yaml`` + ``checkpoints/step_*/model.safetensors``)
or by ``cnnscale prune`` / ``distill`` (a top-level ``model.safetensors`` is preferred when present).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from cnnscale.config import CommandParser, Config, train_parser
from cnnscale.data.datasets import build_datasets
from cnnscale.errors import UserError
from cnnscale.models import create_model
from cnnscale.train.checkpoint import latest_checkpoint

__all__ = [
    "load_run_config", "load_run_model", "model_weights_path", "clean_state_dict", "run_overrides", "check_out",
    "command_parser",
    "eval_accuracy", "eval_loader", "save_weights", "WEIGHTS",
]

WEIGHTS = "model.safetensors"


# --------------------------------------------------------------------------------------------- sources
def load_run_config(run_dir: str | Path, role: str = "source") -> dict[str, Any]:
    """The ``config.yaml`` of a run directory as a dict; one-line UserError when it is not a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{role}: no such run directory: {run_dir}")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{role}: {run_dir} is not a run directory (no config.yaml)")
    try:
        cfg = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError:
        raise UserError(f"{role}: {cfg_path} is not valid YAML") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or "name" not in cfg["model"]:
        raise UserError(f"{role}: {cfg_path} has no model.name")
    return cfg


def model_weights_path(run_dir: str | Path, role: str = "source") -> Path:
    """``RUN/model.safetensors`` if present, else the latest complete checkpoint's ``model.safetensors``."""
    run_dir = Path(run_dir)
    if (run_dir / WEIGHTS).is_file():
        return run_dir / WEIGHTS
    ck = latest_checkpoint(run_dir)
    if ck is None or not (ck / WEIGHTS).is_file():
        raise UserError(f"{role}: no checkpoint with {WEIGHTS} in {run_dir} (train it first, or check the path)")
    return ck / WEIGHTS


def clean_state_dict(sd: dict[str, Any]) -> dict[str, Any]:
    """Strip DDP/compile prefixes and fold pruning masks (``w_orig * w_mask`` → ``w``) of a saved state dict."""
    out: dict[str, Any] = {}
    for key, val in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = val
    for key in [k for k in out if k.endswith("_orig")]:
        base = key[: -len("_orig")]
        if base + "_mask" in out:
            out[base] = out.pop(key) * out.pop(base + "_mask")
    return out


def load_run_model(run_dir: str | Path, role: str = "source") -> tuple[nn.Module, dict[str, Any]]:
    """Build the run's model by name and load its weights (safetensors). Returns ``(model in eval mode, config)``."""
    cfg = load_run_config(run_dir, role)
    weights = model_weights_path(run_dir, role)
    m = cfg["model"]
    model = create_model(m["name"], num_classes=int(m.get("num_classes", 10)), width_mult=m.get("width_mult"))
    try:
        sd = clean_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{role}: cannot read {weights}: {str(exc).splitlines()[0]}") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{role}: {weights} does not fit model {m['name']!r} "
                        f"(missing {len(missing)} keys, unexpected {len(unexpected)})")
    return model.eval(), cfg


def run_overrides(run_cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A run's saved config as ``load_config`` overrides, keeping only sections and keys this version knows; never
    the run's own ``train.out`` / ``train.resume`` (a command reading a run writes elsewhere)."""
    out = {}
    for f in dataclasses.fields(Config):
        known = {g.name for g in dataclasses.fields(type(getattr(Config(), f.name)))} - {"out", "resume"}
        vals = run_cfg.get(f.name)
        if isinstance(vals, dict):
            out[f.name] = {k: v for k, v in vals.items() if k in known}
    return out


def check_out(out: str | Path, source: str | Path, command: str) -> None:
    """distill, prune and quantize never write into their source run: ``out`` equal to ``source`` or inside it is a
    one-line UserError (before anything is read or written)."""
    o, s = Path(out).resolve(), Path(source).resolve()
    if o == s or o.is_relative_to(s):
        raise UserError(f"cnnscale {command}: --out {out} is inside the source run {source}; {command} never writes "
                        f"into its source: choose another --out (default: beside it)")


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Plain contiguous tensors to safetensors, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- flags
def command_parser(prog: str, description: str, section: str, cls: type, aliases: dict[str, str],
                   source: str | None = None) -> CommandParser:
    """The training parser (``--config``, the short flags, every ``--section.field``) plus the command's own section
    ``--{section}.field`` with its ``aliases``, and a positional ``RUN_DIR`` when ``source`` (its help) is given.
    ``--help`` lists all of them with their help text and defaults."""
    parser = train_parser(prog, description)
    parser.add_section(section, cls, aliases=aliases)
    if source is not None:
        parser.add_argument("source", nargs="?", metavar="RUN_DIR", default=None, help=source)
    return parser


# --------------------------------------------------------------------------------------------- evaluation
def eval_loader(cfg: Config, batch_size: int = 256, split: str = "test") -> DataLoader:
    """A plain (un-prepared) DataLoader over the run's ``test`` split, or its ``val`` split (held-out training images
    with eval transforms, used for calibration; the train split, augmented, when ``data.val_size`` is 0)."""
    splits = build_datasets(cfg.data, cfg.train.seed)
    ds = splits.test if split == "test" else (splits.val if splits.val is not None else splits.train)
    return DataLoader(ds, batch_size=batch_size, shuffle=split != "test", num_workers=0,
                      generator=torch.Generator().manual_seed(cfg.train.seed))


def eval_accuracy(model: nn.Module, loader: Any, device: Any = "cpu") -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy over ``loader``, in one process (no gather). Cost: one ``.item()`` per
    batch (a sync point), fine for a one-off evaluation."""
    was_training = getattr(model, "training", False)
    model.eval()
    correct, n, loss = 0, 0, 0.0
    with torch.inference_mode():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images).float()
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(1) == labels).sum())
            n += labels.numel()
    if was_training:
        model.train()
    return {"acc": correct / max(n, 1), "loss": loss / max(n, 1), "n": n}
