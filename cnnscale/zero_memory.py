"""Per-rank memory of data-parallel training by ZeRO stage: the model of Rajbhandari et al. (2020), "ZeRO", Sec. 5.

Model states for Ψ parameters on N ranks, with ``p`` bytes per parameter and gradient element (4 in fp32, 2 in
bf16/fp16 under DeepSpeed) and K fp32 optimizer states per parameter (Adam: 2, SGD with momentum: 1):

===========  ===========  ===========  ===========  ===================
stage        params       grads        opt. states  fp32 master copy
===========  ===========  ===========  ===========  ===================
0 (DDP)      pΨ           pΨ           4KΨ          none (weights are fp32; autocast keeps them)
1            pΨ           pΨ           4KΨ/N        4Ψ/N
2            pΨ           pΨ/N         4KΨ/N        4Ψ/N
3            pΨ/N         pΨ/N         4KΨ/N        4Ψ/N
===========  ===========  ===========  ===========  ===================

DeepSpeed keeps the fp32 master partition in fp32 training too (it clones the flat fp32 weights), so the master
column applies at every ZeRO stage, not only in mixed precision.

Beside the model states, two *working-set* terms that are not partitioned, because they dominate for
``vgg16_classic`` (one 25088x4096 layer holds 77% of its 134M parameters):
- DDP keeps its gradient buckets as a second copy of every gradient (``gradient_as_bucket_view=False``): pΨ.
- ZeRO-2/3 reduce-scatter each layer's gradient as it is produced, so the full gradient of the largest layer (L
  parameters) is alive at once: pL; ZeRO-3 also all-gathers that layer's weights for forward and backward: pL more.

Activations, framework code (torch, DeepSpeed) and allocator slack are not modelled: measure them on a tiny model
and subtract (``launch/bench_zero_memory.py`` does).
"""

from __future__ import annotations

from typing import Any

from cnnscale.errors import UserError

__all__ = ["predict_rank_bytes", "optimizer_states", "param_counts", "memory_env", "STAGES", "PRECISION_BYTES"]

STAGES = (0, 1, 2, 3)
PRECISION_BYTES = {"no": 4, "fp32": 4, "bf16": 2, "fp16": 2}
_MODEL_STATES = ("params", "grads", "optimizer_states", "master_params")


def optimizer_states(optimizer: str, momentum: float = 0.9) -> int:
    """fp32 states per parameter: Adam/AdamW 2 (m, v); SGD 1 with momentum, else 0; RMSprop 1 (+1 with momentum)."""
    name = optimizer.lower()
    if name in ("adam", "adamw"):
        return 2
    if name == "sgd":
        return 1 if momentum > 0 else 0
    if name == "rmsprop":
        return 1 + (1 if momentum > 0 else 0)
    raise UserError(f"unknown optimizer {optimizer!r} for the ZeRO memory model "
                    "(choose from: adam, adamw, rmsprop, sgd)")


def predict_rank_bytes(params: int, stage: int, world_size: int, optimizer: str = "adam", precision: str = "no", *,
                       momentum: float = 0.9, largest_layer_params: int = 0) -> dict[str, int]:
    """Bytes each rank holds for ``params`` parameters at ZeRO ``stage`` (0 = plain DDP) on ``world_size`` ranks.

    Returns ``params``, ``grads``, ``optimizer_states``, ``master_params`` (their sum: ``model_states``),
    ``working_set`` (DDP buckets / the largest layer's gathered weights and full gradient, see the module doc;
    0 unless ``largest_layer_params`` is given for ZeRO-2/3) and ``total``.
    """
    if stage not in STAGES:
        raise UserError(f"unknown ZeRO stage {stage!r} (choose from: {', '.join(map(str, STAGES))})")
    if precision not in PRECISION_BYTES:
        raise UserError(f"unknown precision {precision!r} (choose from: {', '.join(PRECISION_BYTES)})")
    if world_size < 1 or params < 0 or largest_layer_params < 0:
        raise UserError(f"need world_size >= 1 and non-negative counts, got world_size={world_size}, params={params}")
    n, psi, lay = world_size, params, min(largest_layer_params, params)
    p = 4 if stage == 0 else PRECISION_BYTES[precision]  # DDP autocast keeps fp32 weights and fp32 gradients
    k = optimizer_states(optimizer, momentum)
    out = {
        "params": p * psi // (n if stage >= 3 else 1),
        "grads": p * psi // (n if stage >= 2 else 1),
        "optimizer_states": 4 * k * psi // (n if stage >= 1 else 1),
        "master_params": 4 * psi // n if stage >= 1 else 0,
    }
    out["model_states"] = sum(out[key] for key in _MODEL_STATES)
    out["working_set"] = {0: p * psi, 1: 0, 2: p * lay, 3: 2 * p * lay}[stage] if n > 1 or stage else 0
    out["total"] = out["model_states"] + out["working_set"]
    return out


def param_counts(model: Any) -> dict[str, int]:
    """``param_count`` (trainable parameters) and ``largest_layer_params`` (the biggest module's own parameters).

    Count before ``accelerator.prepare``: ZeRO-3 partitions the parameters in place, after which ``numel`` is 0.
    """
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad) for m in model.modules()),
                  default=0)
    return {"param_count": int(total), "largest_layer_params": int(largest)}


def memory_env(counts: dict[str, int], stage: int | None, world_size: int, optimizer: str, momentum: float,
               precision: str) -> dict[str, Any]:
    """env.json fields: the parameter counts and this run's predicted per-rank bytes (stage None: plain DDP)."""
    pred = predict_rank_bytes(counts["param_count"], stage or 0, world_size, optimizer, precision,
                              momentum=momentum, largest_layer_params=counts["largest_layer_params"])
    return {**counts, "predicted_rank_bytes": pred}
