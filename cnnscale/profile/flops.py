"""Count a model's FLOPs and MACs per image with ``torch.utils.flop_counter.FlopCounterMode``.

FlopCounterMode counts only matrix multiplies and convolutions (``mm``, ``addmm``, ``bmm``, ``convolution`` and
their backward ops), at 2 FLOPs per multiply-accumulate. Bias adds, BatchNorm, activations, pooling and the
residual adds are not counted; for these CNNs they are about 1% of the total or less. MACs are FLOPs / 2, which
is what most papers (and the seed's table) call "FLOPs".

One correction: torch's formula for ``convolution_backward`` (torch 2.14) does not divide the weight-gradient
count by ``groups``, so a depthwise conv's backward is overcounted by a factor of its channel count (MobileNet v2
came out at 22x forward). :func:`count_flops` swaps in a formula that charges each requested gradient (input,
weight) the forward conv's cost. The fix upstream is pytorch/pytorch#183405.

The count is of the ops actually run, so it works on any device, including ``meta`` (no memory, no compute).
Nothing is cached: memoise per (model name, input shape) in the caller if needed.
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "conv_backward_flops"]


def conv_backward_flops(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    bias: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    transposed: bool,
    output_padding: Any,
    groups: int,
    output_mask: list[bool],
    **kwargs: Any,
) -> int:
    """FLOPs of ``aten.convolution_backward``, grouped convs included (shapes as FlopCounterMode passes them).

    The input gradient and the weight gradient each take as many MACs as the forward conv: every weight element
    ``w_shape[1:]`` (which already holds ``in_channels / groups``) meets every element of the larger-resolution
    side, the output for a normal conv and the input for a transposed one.
    """
    forward_macs = prod(x_shape if transposed else grad_out_shape) * prod(w_shape[1:])
    return 2 * forward_macs * (int(output_mask[0]) + int(output_mask[1]))


def count_flops(
    model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32), backward: bool = False
) -> dict[str, float]:
    """FLOPs and MACs per image of one forward pass (and, with ``backward=True``, of forward + backward).

    Returns ``{"flops": forward FLOPs, "macs": forward MACs}`` per image, plus ``"fwd_bwd_flops"``: forward +
    backward FLOPs per image, when ``backward`` is set. Backward is a real ``torch.autograd.grad`` over the
    parameters under the counter (the input needs no gradient, so the first layer's input-gradient is not
    computed, as in training); roughly 3x forward. The model is run in eval mode (dropout off, BatchNorm
    statistics untouched) and its mode is restored; its ``.grad`` fields are not touched.
    """
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(input_shape, device=device)
    batch = input_shape[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(x)
        forward = counter.get_total_flops() / batch
        result = {"flops": float(forward), "macs": forward / 2}
        if backward:
            params = [p for p in model.parameters() if p.requires_grad]
            with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
                out = model(x)
                torch.autograd.grad(out.sum(), params)
            result["fwd_bwd_flops"] = counter.get_total_flops() / batch
    finally:
        model.train(was_training)
    return result
