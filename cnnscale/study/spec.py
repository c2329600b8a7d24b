"""A study file, validated: :class:`StudySpec` from YAML, and the strong-scaling batch rule.

See :mod:`cnnscale.study.local` for the file format. Every error names the file and, where there are any, the valid
choices; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnscale.config import load_yaml
from cnnscale.errors import UserError
from cnnscale.study.launcher import LAUNCHERS

__all__ = ["StudySpec", "ModelSpec", "load_spec", "parse_spec", "strong_batch", "SCALINGS", "SPEC_KEYS"]

SCALINGS = ("weak", "strong")
PRECISIONS = ("no", "fp16", "bf16")
SPEC_KEYS = ("name", "description", "scaling", "models", "world_sizes", "precisions", "micro_batches",
             "global_batch", "grad_accum", "max_micro_batch", "min_micro_batch", "max_steps", "data", "timeout_s",
             "threads_per_process", "launcher", "overrides", "settings", "max_batch", "allreduce_bench",
             "gpus_per_node")
MODEL_KEYS = ("name", "micro_batches", "global_batch", "max_steps")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    micro_batches: tuple[int, ...] = ()
    """Overrides the study's micro_batches for this model (weak scaling)."""
    global_batch: int = 0
    """Overrides the study's global_batch for this model (strong scaling)."""
    max_steps: int = 0
    """Overrides the study's max_steps for this model."""


@dataclass(frozen=True)
class StudySpec:
    name: str
    models: tuple[ModelSpec, ...]
    scaling: str = "weak"
    world_sizes: tuple[int, ...] = (1, 2)
    precisions: tuple[str, ...] = ("no",)
    micro_batches: tuple[int, ...] = (32,)
    global_batch: int = 0
    grad_accum: int = 1
    max_micro_batch: int = 0
    min_micro_batch: int = 1
    max_steps: int = 20
    data: str = "synthetic"
    timeout_s: float = 900.0
    threads_per_process: int = 1
    launcher: str = "accelerate"
    overrides: tuple[tuple[str, Any], ...] = ()
    settings: tuple[tuple[str, dict[str, Any]], ...] = (("default", {}),)
    max_batch: dict[str, int] | None = None
    allreduce_bench: bool = True
    gpus_per_node: int = 0
    """Devices per machine (0: every point runs on this one); the local backend refuses larger world sizes."""
    source: str = "<study>"
    raw: dict[str, Any] | None = None


def strong_batch(global_batch: int, world_size: int, grad_accum: int = 1, max_micro: int = 0,
                 min_micro: int = 1) -> tuple[int, int]:
    """(micro_batch, grad_accum) for strong scaling: ``micro = G / (N x grad_accum)``, doubling grad_accum while
    ``micro > max_micro`` (when max_micro > 0). Raises UserError when G does not divide or micro < min_micro."""
    ga = grad_accum
    while True:
        if global_batch % (world_size * ga):
            raise UserError(f"strong scaling: global_batch {global_batch} is not divisible by world size "
                            f"{world_size} x grad_accum {ga}")
        micro = global_batch // (world_size * ga)
        if not max_micro or micro <= max_micro:
            break
        ga *= 2
    if micro < min_micro:
        raise UserError(f"strong scaling: global_batch {global_batch} at world size {world_size} gives micro_batch "
                        f"{micro} < min_micro_batch {min_micro}")
    return micro, ga


def _ints(src: str, key: str, value: Any, minimum: int = 1) -> tuple[int, ...]:
    vals = value if isinstance(value, list | tuple) else [value]
    if not vals or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in vals):
        raise UserError(f"{src}: {key} must be integers >= {minimum}, got {value!r}")
    return tuple(vals)


def _flatten(src: str, what: str, d: Any, prefix: str = "") -> dict[str, Any]:
    """``{data: {num_workers: 0}}`` and ``{data.num_workers: 0}`` both give ``{"data.num_workers": 0}``."""
    if not isinstance(d, dict):
        raise UserError(f"{src}: {what} must be a mapping of section.field: value, got {type(d).__name__}")
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(src, what, v, key + "."))
        elif "." not in key and key != "script":
            raise UserError(f"{src}: {what} key {key!r} must be section.field (e.g. dist.comm_hook)")
        else:
            flat[key] = v
    return flat


def _models(src: str, value: Any) -> tuple[ModelSpec, ...]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{src}: models must be a non-empty list of names or {{name: ..}} mappings")
    out = []
    for m in value:
        if isinstance(m, str):
            out.append(ModelSpec(m))
            continue
        if not isinstance(m, dict) or "name" not in m:
            raise UserError(f"{src}: a model entry must be a name or a mapping with 'name', got {m!r}")
        bad = sorted(set(m) - set(MODEL_KEYS))
        if bad:
            raise UserError(f"{src}: unknown model key {bad[0]!r} (valid keys: {', '.join(MODEL_KEYS)})")
        out.append(ModelSpec(str(m["name"]), _ints(src, "micro_batches", m["micro_batches"]) if "micro_batches" in m
                             else (), int(m.get("global_batch", 0)), int(m.get("max_steps", 0))))
    return tuple(out)


def _choices(src: str, key: str, values: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    vals = tuple(str(v) if v is not False else "no" for v in (values if isinstance(values, list) else [values]))
    for v in vals:
        if v not in allowed:
            raise UserError(f"{src}: {key}: unknown value {v!r} (choose from: {', '.join(allowed)})")
    return vals


def _settings(src: str, value: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
    if value is None:
        return (("default", {}),)
    if not isinstance(value, dict) or not value:
        raise UserError(f"{src}: settings must be a mapping of variant name -> overrides")
    out = []
    for name, over in value.items():
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise UserError(f"{src}: settings name {name!r} must be letters, digits, '_' or '-'")
        out.append((str(name), _flatten(src, f"settings.{name}", over or {})))
    return tuple(out)


def parse_spec(raw: dict[str, Any], src: str = "<study>") -> StudySpec:
    """Validate a study mapping. Unknown keys and bad values are one-line UserErrors naming ``src``."""
    bad = sorted(set(raw) - set(SPEC_KEYS))
    if bad:
        raise UserError(f"{src}: unknown key {bad[0]!r} (valid keys: {', '.join(SPEC_KEYS)})")
    for key in ("name", "models"):
        if key not in raw:
            raise UserError(f"{src}: missing required key {key!r}")
    kw: dict[str, Any] = {"name": str(raw["name"]), "models": _models(src, raw["models"]), "source": src, "raw": raw}
    kw["scaling"] = _choices(src, "scaling", raw.get("scaling", "weak"), SCALINGS)[0]
    kw["precisions"] = _choices(src, "precisions", raw.get("precisions", ["no"]), PRECISIONS)
    kw["launcher"] = _choices(src, "launcher", raw.get("launcher", "accelerate"), LAUNCHERS)[0]
    for key in ("world_sizes", "micro_batches"):
        if key in raw:
            kw[key] = _ints(src, key, raw[key])
    for key, minimum in (("global_batch", 1), ("grad_accum", 1), ("max_micro_batch", 0), ("min_micro_batch", 1),
                         ("max_steps", 1), ("threads_per_process", 0), ("timeout_s", 1), ("gpus_per_node", 0)):
        if key in raw:
            kw[key] = _ints(src, key, raw[key], minimum)[0]
    if kw["scaling"] == "strong" and not kw.get("global_batch") and not all(m.global_batch for m in kw["models"]):
        raise UserError(f"{src}: strong scaling needs global_batch (fixed images per optimiser step)")
    kw["data"] = _choices(src, "data", raw.get("data", "synthetic"), ("cifar10", "imagefolder", "synthetic"))[0]
    kw["overrides"] = tuple(_flatten(src, "overrides", raw.get("overrides") or {}).items())
    kw["settings"] = _settings(src, raw.get("settings"))
    kw["allreduce_bench"] = bool(raw.get("allreduce_bench", True))
    if raw.get("max_batch"):
        mb = raw["max_batch"] if isinstance(raw["max_batch"], dict) else {}
        kw["max_batch"] = {"start": _ints(src, "max_batch.start", mb.get("start", 1024))[0],
                           "steps": _ints(src, "max_batch.steps", mb.get("steps", 3))[0]}
    return StudySpec(**kw)


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study YAML file."""
    return parse_spec(load_yaml(path), str(path))
