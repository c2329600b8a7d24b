"""Model compression: what ``cnnscale distill|prune|quantize`` share.

- :mod:`cnnscale.compress.distill`: train a student from a teacher run through the ordinary training loop.
- :mod:`cnnscale.compress.prune`: global L1 unstructured pruning, optional fine-tuning through the same loop.
- :mod:`cnnscale.compress.quantize`: post-training int8 quantisation (dynamic and static), size, latency, accuracy.

Shared here: loading a trained model from a run directory (safetensors only, never pickle), splitting a command's own
``--section.field`` flags from the training flags, and a plain test-set accuracy loop.

A *source* is a run directory written by ``cnnscale train`` (``config.yaml`` + ``checkpoints/step_*/model.safetensors``)
or by ``cnnscale prune`` / ``distill`` (a top-level ``model.safetensors`` is preferred when present).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from cnnscale.errors import UserError

__all__ = [
    "load_run_config", "load_run_model", "model_weights_path",
    "clean_state_dict", "run_overrides", "split_section", "pop_source", "eval_accuracy", "eval_loader", "save_weights",
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
    from cnnscale.train.checkpoint import latest_checkpoint

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


def load_run_model(run_dir: str | Path, role: str = "source") -> tuple[Any, dict[str, Any]]:
    """Build the run's model by name and load its weights (safetensors). Returns ``(model in eval mode, config)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cnnscale.models import create_model

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
    """A run's saved config as ``load_config`` overrides, keeping only sections and keys this version knows."""
    from cnnscale.config import Config

    out = {}
    for f in dataclasses.fields(Config):
        known = {g.name for g in dataclasses.fields(type(getattr(Config(), f.name)))}
        vals = run_cfg.get(f.name)
        if isinstance(vals, dict):
            out[f.name] = {k: v for k, v in vals.items() if k in known}
    return out


def save_weights(model: Any, path: str | Path) -> Path:
    """Plain contiguous tensors to safetensors, atomically (temp file + rename)."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- flags
def _coerce(key: str, text: str, tp: Any) -> Any:
    if tp is str:
        return text
    value = yaml.safe_load(text) if text != "" else ""
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    kind = {bool: "true/false", int: "an integer", float: "a number"}.get(tp, str(tp))
    raise UserError(f"{key}: expected {kind}, got {text!r}")


def split_section(argv: list[str], section: str, cls: type,
                  short: dict[str, str] | None = None) -> tuple[Any, list[str]]:
    """Take ``--section.field value`` (and the ``short`` aliases) out of ``argv`` into a ``cls`` instance.

    Everything else is returned untouched, for :func:`cnnscale.config.load_config`. Boolean fields also take a bare
    flag (``--prune.include-linear``).
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    short = short or {}
    values: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        key, eq, inline = argv[i].partition("=")
        field = short.get(key)
        if field is None and key.startswith(f"--{section}."):
            field = key[len(section) + 3:].replace("-", "_")
            if field not in names:
                raise UserError(f"unknown option {key} (valid: {', '.join(f'--{section}.{n}' for n in sorted(names))})")
        if field is None:
            rest.append(argv[i])
            i += 1
            continue
        if eq:
            text, i = inline, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            text, i = argv[i + 1], i + 2
        elif hints[field] is bool:
            text, i = "true", i + 1
        else:
            raise UserError(f"{key} needs a value")
        values[field] = _coerce(f"{section}.{field}", text, hints[field])
    return cls(**values), rest


def pop_source(argv: list[str]) -> tuple[str | None, list[str]]:
    """The leading positional ``RUN_DIR`` of ``cnnscale prune|quantize RUN_DIR [flags]``, if there is one."""
    if argv and not argv[0].startswith("--"):
        return argv[0], argv[1:]
    return None, argv


# --------------------------------------------------------------------------------------------- evaluation
def eval_loader(cfg: Any, batch_size: int = 256, split: str = "test") -> Any:
    """A plain (un-prepared) DataLoader over the run's ``test`` split, or its ``val`` split (held-out training images
    with eval transforms, used for calibration; the train split, augmented, when ``data.val_size`` is 0)."""
    import torch
    from torch.utils.data import DataLoader

    from cnnscale.data import datasets as data

    splits = data.build_datasets(cfg.data, cfg.train.seed)
    ds = splits.test if split == "test" else (splits.val if splits.val is not None else splits.train)
    return DataLoader(ds, batch_size=batch_size, shuffle=split != "test", num_workers=0,
                      generator=torch.Generator().manual_seed(cfg.train.seed))


def eval_accuracy(model: Any, loader: Any, device: Any = "cpu") -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy over ``loader``, in one process (no gather)."""
    import torch
    import torch.nn.functional as F

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
