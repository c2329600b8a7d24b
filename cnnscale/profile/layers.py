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

:func:`cnnscale.train.build.zoo_layers` counts a registered model with it once per host and caches the table
(:mod:`cnnscale.profile.countcache`); about 0.1-0.5 s of CPU per model on a 2-core box. Nothing here knows the zoo.
"""

from __future__ import annotations

from math import prod

import torch
from torch import nn

__all__ = ["layer_table"]


def _cost(module: nn.Module, out: torch.Tensor) -> float:
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
    seen: set[int] = set()
    rows: list[tuple[int, float]] = []

    def hook(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        params = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        rows.append((params, _cost(module, out)))

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

