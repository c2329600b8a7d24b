"""DeepSpeed ZeRO through Accelerate: the cnnscale config drives the DeepSpeed JSON, and the two must agree.

The JSONs in ``launch/accelerate/ds_zero*.json`` leave the batch arithmetic, clipping and precision at ``"auto"``.
:func:`configure_deepspeed` fills them from the cnnscale config *before* ``accelerator.prepare`` (Accelerate can
only fill the micro batch from a dataloader prepared in the same call, and cnnscale prepares the data first). An
explicit JSON value that disagrees with the cnnscale config is a one-line :class:`UserError`, since otherwise
DeepSpeed would silently train with a different batch, accumulation or precision than the run records say.

Facts this relies on (accelerate 1.15, deepspeed 0.19):
- ``Accelerator(cpu=True)`` or ``ACCELERATE_USE_CPU=true`` with DeepSpeed silently runs plain DDP, so the
  accelerator is made with ``cpu=False``; DeepSpeed picks its own CPU accelerator when there is no GPU.
- Under DeepSpeed, ``accelerator.mixed_precision`` reads ``"no"`` even in bf16 (DeepSpeed casts the whole model),
  so inputs are cast to :func:`input_dtype` and the effective precision is recorded from the DeepSpeed config.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from cnnscale.config import Config
from cnnscale.errors import UserError

__all__ = ["use_deepspeed", "configure_deepspeed", "deepspeed_env", "input_dtype", "zero_stage"]


def use_deepspeed() -> bool:
    """True when the launcher asked for DeepSpeed (``distributed_type: DEEPSPEED`` or ``--use_deepspeed``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _plugin(accelerator: Any) -> Any:
    return getattr(accelerator.state, "deepspeed_plugin", None)


def _node(ds: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    *path, key = dotted.split(".")
    for p in path:
        ds = ds.setdefault(p, {})
    return ds, key


def _enabled(value: Any) -> bool:
    return str(value).lower() == "true"


def configure_deepspeed(accelerator: Any, cfg: Config) -> None:
    """Fill the active DeepSpeed config's ``"auto"`` values from ``cfg``; refuse explicit values that disagree.

    No-op without DeepSpeed. Call after creating the Accelerator and before ``prepare(model, optimizer)``.
    """
    plugin = _plugin(accelerator)
    if plugin is None:
        if use_deepspeed():
            raise UserError("DeepSpeed was requested but Accelerate left it off and would silently run plain DDP: "
                            "unset ACCELERATE_USE_CPU and do not pass --cpu with a DeepSpeed config")
        return
    if cfg.fast.compile:
        raise UserError("fast.compile is not supported with DeepSpeed in cnnscale (DeepSpeed wraps the model in its "
                        "engine); drop --fast.compile or use a DDP config")
    where = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
    if accelerator.gradient_accumulation_steps != cfg.train.grad_accum:
        raise UserError(f"the launcher set gradient accumulation to {accelerator.gradient_accumulation_steps} but "
                        f"train.grad_accum is {cfg.train.grad_accum}; set it in one place (--grad-accum)")
    ds = plugin.deepspeed_config
    mp = cfg.train.mixed_precision
    want: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch * cfg.train.grad_accum * accelerator.num_processes,
        "gradient_clipping": float(cfg.train.clip_grad),
        "bf16.enabled": mp == "bf16",
        "fp16.enabled": mp == "fp16",
    }
    flag = {"train_micro_batch_size_per_gpu": "--micro-batch", "gradient_accumulation_steps": "--grad-accum",
            "train_batch_size": "--micro-batch x --grad-accum x world size", "gradient_clipping": "--train.clip_grad",
            "bf16.enabled": "--mixed-precision", "fp16.enabled": "--mixed-precision"}
    for key, value in want.items():
        node, leaf = _node(ds, key)
        have = node.get(leaf, "auto")
        if have == "auto":
            node[leaf] = value
            continue
        same = _enabled(have) == value if isinstance(value, bool) else float(have) == float(value)
        if not same:
            raise UserError(f"{where} sets {key}={have} but the cnnscale config gives {value} ({flag[key]}); "
                            f"make them equal or set {key} to \"auto\" in the JSON")
    plugin.gradient_accumulation_steps = cfg.train.grad_accum
    plugin.gradient_clipping = float(cfg.train.clip_grad)


def zero_stage(accelerator: Any) -> int | None:
    """The ZeRO stage of the active DeepSpeed config, None without DeepSpeed."""
    plugin = _plugin(accelerator)
    return None if plugin is None else int(plugin.zero_stage)


def input_dtype(accelerator: Any) -> torch.dtype | None:
    """dtype the model's inputs must have: bf16/fp16 when DeepSpeed runs the whole model in it, else None."""
    plugin = _plugin(accelerator)
    if plugin is None:
        return None
    ds = plugin.deepspeed_config
    if _enabled(ds.get("bf16", {}).get("enabled")):
        return torch.bfloat16
    if _enabled(ds.get("fp16", {}).get("enabled")):
        return torch.float16
    return None


def deepspeed_env(accelerator: Any) -> dict[str, Any]:
    """env.json fields: zero_stage (None without DeepSpeed) and, under DeepSpeed, offload and effective precision."""
    plugin = _plugin(accelerator)
    if plugin is None:
        return {"zero_stage": None}
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    dtype = input_dtype(accelerator)
    return {
        "zero_stage": zero_stage(accelerator),
        "zero_offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none"),
        "zero_offload_param": zero.get("offload_param", {}).get("device", "none"),
        "deepspeed_config_file": os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"),
        # accelerator.mixed_precision reads "no" under DeepSpeed; this is what the run really used.
        "mixed_precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no"),
    }
