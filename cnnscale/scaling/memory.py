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

Beside the model states, *working-set* terms (transient or unpartitioned buffers) that matter at this size:
- ``comm_buffers``: DDP keeps its gradient buckets as a second copy of every gradient
  (``gradient_as_bucket_view=False``): pΨ. ZeRO-2/3 reduce-scatter each layer's gradient as it is produced, so the
  full gradient of the largest layer (L parameters) is alive at once: pL; ZeRO-3 also all-gathers that layer's
  weights for forward and backward: pL more. This is what limits ZeRO-3 on ``vgg16_classic``, whose one 25088x4096
  layer holds 77% of its 134M parameters.
- ``optimizer_step``: PyTorch's foreach optimizers allocate fp32 temporaries the size of the parameters the rank
  steps (Ψ for DDP, Ψ/N under ZeRO): Adam's sqrt(v)+eps, RMSprop's sqrt of its average, a copy of the gradient for
  L2 weight decay (Adam, SGD, RMSprop; AdamW decays in place) and for Nesterov.

Activations, framework code (torch, DeepSpeed) and allocator slack are not modelled: measure them on a tiny model
and subtract (``launch/bench_zero_memory.py`` does).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cnnscale.errors import UserError

__all__ = ["predict_rank_bytes", "optimizer_states", "step_temporaries", "param_counts", "memory_env", "memory_rows",
           "STAGES", "PRECISION_BYTES"]

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


def step_temporaries(optimizer: str, weight_decay: float = 0.0, nesterov: bool = False) -> int:
    """fp32 parameter-sized temporaries of one foreach ``optimizer.step()`` (see the module doc)."""
    name = optimizer.lower()
    l2_copy = 1 if weight_decay > 0 and name != "adamw" else 0
    return {"adam": 1, "adamw": 1, "rmsprop": 1}.get(name, 0) + l2_copy + (1 if nesterov and name == "sgd" else 0)


def predict_rank_bytes(params: int, stage: int, world_size: int, optimizer: str = "adam", precision: str = "no", *,
                       momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False,
                       largest_layer_params: int = 0) -> dict[str, int]:
    """Bytes each rank holds for ``params`` parameters at ZeRO ``stage`` (0 = plain DDP) on ``world_size`` ranks.

    Returns the model states ``params``, ``grads``, ``optimizer_states``, ``master_params`` and their sum
    ``model_states`` (the ZeRO paper's figure); the working set ``comm_buffers`` (its largest-layer part is 0
    unless ``largest_layer_params`` is given) and ``optimizer_step``, and their sum ``working_set``; ``total``.
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
    out["comm_buffers"] = {0: p * psi if n > 1 else 0, 1: 0, 2: p * lay, 3: 2 * p * lay}[stage]
    stepped = psi // (n if stage >= 1 else 1)
    out["optimizer_step"] = 4 * step_temporaries(optimizer, weight_decay, nesterov) * stepped
    out["working_set"] = out["comm_buffers"] + out["optimizer_step"]
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


def memory_env(counts: dict[str, int], stage: int | None, world_size: int, optim: Any,
               precision: str) -> dict[str, Any]:
    """env.json fields: the parameter counts and this run's predicted per-rank bytes (stage None: plain DDP).

    ``optim`` is the run's :class:`~cnnscale.config.OptimConfig` (name, momentum, weight_decay, nesterov).
    """
    pred = predict_rank_bytes(counts["param_count"], stage or 0, world_size, optim.name, precision,
                              momentum=optim.momentum, weight_decay=optim.weight_decay,
                              nesterov=optim.nesterov and optim.momentum > 0,
                              largest_layer_params=counts["largest_layer_params"])
    return {**counts, "predicted_rank_bytes": pred}


def memory_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-rank memory by ZeRO stage from run records (mappings with ``summary`` and ``env``), for the report.

    One row per run that recorded per-rank peaks: on GPU the allocator peak of each rank
    (``rank_max_memory_allocated_bytes``), on CPU each rank's peak RSS (``rank_peak_rss_bytes``, which includes the
    framework's own ~0.8 GB), beside env.json's ``predicted_rank_bytes``. Pure: no torch, no files.
    """
    rows = []
    for rec in records:
        s, e = rec.get("summary") or {}, rec.get("env") or {}
        gpu = [b for b in s.get("rank_max_memory_allocated_bytes") or [] if b is not None]
        ranks, kind = (gpu, "gpu allocator") if gpu else (s.get("rank_peak_rss_bytes") or [], "rss")
        if not ranks:
            continue
        stage, world = e.get("zero_stage"), e.get("world_size") or len(ranks)
        offload = any(e.get(k) not in (None, "none") for k in ("zero_offload_optimizer", "zero_offload_param"))
        if stage is not None:
            label = f"ZeRO-{stage}" + (" offload" if offload else "")
        else:
            label = "DDP" if world > 1 else "1 process"
        pred = e.get("predicted_rank_bytes") or {}
        rows.append({"run": rec.get("path"), "model": s.get("model") or e.get("model"), "world_size": world,
                     "config": label, "zero_stage": stage or 0, "mem_kind": kind, "rank_peak_bytes": list(ranks),
                     "max_rank_peak_bytes": max(ranks), "predicted_total_bytes": pred.get("total"),
                     "predicted_model_states_bytes": pred.get("model_states")})
    return sorted(rows, key=lambda r: (str(r["model"]), r["world_size"], r["zero_stage"], r["config"]))
