"""Divergence: a non-finite loss at a log step (or non-finite weights at a checkpoint) stops the run.

The loss a log step reads is already the mean over ranks (one all-reduce, the log step's only sync point), so every
rank sees the same value and stops at the same step without another collective. Before each checkpoint the weights
are checked (a MAX over ranks of one flag): non-finite weights are never saved, so the last good checkpoint stays
the newest. The run ends with status ``diverged`` and exit code 3 (:data:`cnnscale.train.preempt.EXIT_DIVERGED`);
``train.stop_on_nonfinite false`` trains on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["nonfinite_message", "weights_finite", "diverged_summary", "stop_line"]


def nonfinite_message(what: str, value: float | None, step: int, lr: float) -> str | None:
    """``loss is nan at step 5 (lr 9.3e+05): stopping, status diverged`` when ``value`` is not finite (None: the
    weights were checked and are not), else None."""
    if value is not None and math.isfinite(value):
        return None
    shown = "not finite" if value is None else f"{value}"
    return f"{what} is {shown} at step {step} (lr {lr:.1e}): stopping, status diverged"


def weights_finite(accelerator: Any, model: nn.Module) -> bool:
    """True when every parameter of every rank is finite (collective: one MAX all-reduce of one number; under ZeRO-3
    each rank checks its own partition). Cost: one pass over the parameters, at checkpoints only."""
    bad = torch.zeros((), device=accelerator.device)
    for p in model.parameters():
        if p.numel():
            bad = torch.maximum(bad, (~torch.isfinite(p.detach())).any().to(bad.dtype))
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return not bool(bad.item())  # note: a sync point, at checkpoints only


def diverged_summary(message: str, *, model: str, world_size: int, steps: int, epochs_done: int, total_steps: int,
                     wall_s: float, final_loss: float | None) -> dict[str, Any]:
    """The ``summary.json`` of a diverged run (the non-finite loss is written as null)."""
    return {"status": "diverged", "error": message, "model": model, "world_size": world_size, "steps": steps,
            "epochs_done": epochs_done, "total_steps": total_steps, "wall_s": wall_s, "final_loss": final_loss}


def stop_line(message: str, last_checkpoint: Path | None) -> str:
    """The one stderr line rank 0 prints."""
    return f"{message} (last good checkpoint: {last_checkpoint or 'none'})"
