"""A model's layers in the order the backward reaches them: each one's gradient bytes and backward cost, the input
of the scaling model's term (g) (:mod:`cnnscale.scaling.terms`): when each of DDP's buckets is ready.

One meta-device forward (no memory, no compute) with a hook on every leaf module that owns parameters records,
in execution order, the module's trainable parameters and its cost: multiply-accumulates for a convolution
(output elements x input channels per group x kernel area) or a linear layer (output elements x input features),
output elements for anything else (BatchNorm, LayerNorm: element-wise). Reversed, that is the order the backward
computes their gradients; a convolution's or linear layer's backward is taken as proportional to its forward (two
products, one for the input's gradient and one for the weight's). Not counted: layers without parameters (ReLU,
pooling, the residual adds), whose backward is element-wise and small beside the products on these CNNs. The
cost is MACs, not seconds: a depthwise convolution, memory-bound on CPU, takes longer per MAC than a dense one, so
MobileNet's readiness is the least exact.

:func:`zoo_layers` counts a registered model once per host and caches it (:mod:`cnnscale.profile.countcache`);
about 0.1-0.5 s of CPU per model on a 2-core box.
"""

from __future__ import annotations

import functools
from math import prod

import torch
from torch import nn

from cnnscale.models import create_model, get_model_builder
from cnnscale.profile.countcache import cached_counts, count_key

__all__ = ["layer_table", "zoo_layers"]


def _cost(module: nn.Module, inp: tuple, out: torch.Tensor) -> float:
    out_elems = float(prod(out.shape[1:])) if isinstance(out, torch.Tensor) else 0.0
    if isinstance(module, nn.modules.conv._ConvNd):
        return out_elems * (module.in_channels // module.groups) * float(prod(module.kernel_size))
    if isinstance(module, nn.Linear):
        return out_elems * module.in_features
    return out_elems


def layer_table(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> list[tuple[int, float]]:
    """(trainable parameters, forward cost per image) of every leaf module that owns parameters, in forward
    execution order (a module run twice counts once, at its first run); see the module docstring. ``model`` may
    live on the meta device."""
    seen: dict[int, int] = {}
    rows: list[tuple[int, float]] = []

    def hook(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if id(module) in seen:
            return
        seen[id(module)] = len(rows)
        params = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        rows.append((params, _cost(module, inp, out)))

    leaves = [m for m in model.modules() if not list(m.children()) and any(
        p.requires_grad for p in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.empty(*input_shape, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return rows


@functools.lru_cache(maxsize=32)
def zoo_layers(name: str, num_classes: int | None = 10, width_mult: float | None = None
               ) -> tuple[tuple[float, float], ...]:
    """:func:`layer_table` of registered model ``name`` on CIFAR's 32x32 input, as ``((params, cost), ...)``,
    counted on the meta device once per host (cached)."""

    def count() -> dict[str, float]:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = create_model(name, num_classes=num_classes, width_mult=width_mult)
        rows = layer_table(model)
        return {f"{kind}{i:04d}": float(v) for i, row in enumerate(rows) for kind, v in zip(("p", "c"), row)}

    key = count_key("layers", name, num_classes, width_mult, (1, 3, 32, 32), get_model_builder(name))
    counts = cached_counts(key, count)
    n = len(counts) // 2
    return tuple((counts[f"p{i:04d}"], counts[f"c{i:04d}"]) for i in range(n))
