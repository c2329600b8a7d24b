"""The training step and the evaluation, shared by ``train.run``, distillation, pruning's fine-tune and bench.

``train_step`` is one micro-step under ``accelerator.accumulate`` (which gates the optimiser step and DDP's
gradient sync on the accumulation boundary); it returns the detached loss and never calls ``.item()``, so it adds
no CPU-GPU sync point. ``evaluate`` gathers predictions with ``gather_for_metrics`` (padding duplicates dropped).
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from accelerate import skip_first_batches
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

from cnnscale.train import deepspeed as ds_config

__all__ = ["Task", "ClassificationTask", "prepare_inputs", "train_step", "evaluate", "sync_context", "skip_batches"]


class Task(Protocol):
    """What the loop asks of a task: move its own modules to the device, and a loss of a batch."""

    def prepare(self, accelerator: Any) -> None: ...

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


class ClassificationTask:
    """Cross-entropy (with optional label smoothing) on the model's logits."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def prepare(self, accelerator: Any) -> None:
        """Hook for tasks that hold extra modules (a distillation teacher)."""

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the batch."""
        return self.criterion(model(images), labels)


def prepare_inputs(images: torch.Tensor, channels_last: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """channels_last when the fast path asks for it; the model's dtype when DeepSpeed runs the whole model in bf16/fp16
    (autocast is off under DeepSpeed, so float32 inputs would meet bf16 weights)."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images if dtype is None else images.to(dtype)


_PLAIN = ("NO", "MULTI_CPU", "MULTI_GPU")


def _plain_optimizer(accelerator: Any, optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside Accelerate's wrapper when the wrapper would only pass calls through (no fp16
    scaler, no DeepSpeed/FSDP/XLA), else None. Per step the wrapper's ``zero_grad`` calls ``inspect.signature`` and
    its ``step`` reads an environment flag, and ``accelerator.backward`` divides the loss by 1 (an extra autograd
    node): about 0.2 ms per step together, measured on a loaded 2-core box, 1-2% of a LeNet-5 step on one thread."""
    if (type(optimizer) is AcceleratedOptimizer and optimizer.scaler is None
            and str(accelerator.distributed_type).split(".")[-1] in _PLAIN):
        return optimizer.optimizer
    return None


def train_step(accelerator: Any, model: nn.Module, task: Task, optimizer: Any, images: torch.Tensor,
               labels: torch.Tensor, clip_grad: float, prof: Any) -> torch.Tensor:
    """One micro-step under ``accelerator.accumulate``. Returns the detached loss; no ``.item()`` here. Where
    Accelerate's wrappers would only pass the calls through (:func:`_plain_optimizer`), they are called directly,
    with the same effect: the optimiser steps and zeroes gradients only on a sync step, the loss is divided by
    ``grad_accum`` only when it is above 1."""
    plain = _plain_optimizer(accelerator, optimizer)
    # Without accumulation, Accelerate's accumulate() (a generator context, an ExitStack and a step counter) only
    # sets sync_gradients to the True it already is: skipped then, like the wrappers above.
    skip = plain is not None and accelerator.gradient_accumulation_steps == 1 and accelerator.sync_gradients
    with contextlib.nullcontext() if skip else accelerator.accumulate(model):
        with prof.phase("fwd_bwd"):
            with accelerator.autocast() if accelerator.native_amp else contextlib.nullcontext():
                loss = task.loss(model, images, labels)
            if plain is not None and accelerator.gradient_accumulation_steps == 1:
                loss.backward()
            else:
                accelerator.backward(loss)
        with prof.phase("optim"):
            if clip_grad and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            if plain is None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            elif accelerator.sync_gradients:
                plain.step()
                plain.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(accelerator: Any, model: nn.Module, loader: Any, channels_last: bool = False) -> dict[str, float]:
    """Mean loss and accuracy over the whole set, all ranks gathered (padding duplicates dropped).

    Collective in a multi-process run (every rank must call it); one CPU-GPU sync at the end."""
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    correct = torch.zeros((), device=accelerator.device, dtype=torch.int64)
    n = 0
    dtype = ds_config.input_dtype(accelerator)
    for images, labels in loader:
        images = prepare_inputs(images, channels_last, dtype)
        with accelerator.autocast():
            logits = model(images)
        logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        correct += (logits.argmax(1) == labels).sum()
        n += labels.numel()
    model.train()
    n = max(n, 1)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n}  # note: sync point, once per evaluation


def sync_context(model: nn.Module, compute_only: bool) -> Any:
    """DDP's no_sync for ``dist.compute_only`` calibration runs (each rank trains alone), else a no-op context."""
    if compute_only and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def skip_batches(loader: Any, n: int) -> Any:
    """The rest of the epoch after ``n`` batches: the device loader's own ``skip``, or Accelerate's for a DataLoader."""
    if not n:
        return loader
    if hasattr(loader, "skip"):
        return loader.skip(n)
    return skip_first_batches(loader, n)
