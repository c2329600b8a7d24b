"""Count a model's FLOPs and MACs per image with ``torch.utils.flop_counter.FlopCounterMode``.

FlopCounterMode counts only matrix multiplies and convolutions (``mm``, ``addmm``, ``bmm``, ``convolution`` and
their backward ops), at 2 FLOPs per multiply-accumulate. Bias adds, BatchNorm, activations, pooling and the
residual adds are not counted; for these CNNs they are well under 1% of the total. MACs are FLOPs / 2, which is
what most papers (and the seed's table) call "FLOPs".

The count is of the ops actually run, so it works on any device, including ``meta`` (no memory, no compute).
Nothing is cached: memoise per (model name, input shape) in the caller if needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["count_flops"]


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
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(input_shape, device=device)
    batch = input_shape[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        forward = counter.get_total_flops() / batch
        result = {"flops": float(forward), "macs": forward / 2}
        if backward:
            params = [p for p in model.parameters() if p.requires_grad]
            with FlopCounterMode(display=False) as counter:
                out = model(x)
                torch.autograd.grad(out.sum(), params)
            result["fwd_bwd_flops"] = counter.get_total_flops() / batch
    finally:
        model.train(was_training)
    return result
