"""Gradient synchronisation, measured: a forward+backward re-run under ``no_sync`` beside the synced one just timed.

At optimiser step 2 and every ``every`` steps after, :meth:`SyncProbe.probe` times the step's last micro-batch
forward+backward (with the task's loss: distillation's runs its teacher too) under ``accelerator.no_sync`` and keeps
it beside the synced forward+backward of the same batch.
The median difference is the all-reduce time that backward did not hide. The probe restores gradients, buffers and
RNG state, so training is unchanged; its cost (one extra fwd+bwd per probe, plus a synchronisation on GPU) is
excluded from every figure by the caller. World size 1, or no DDP wrapper: nothing to measure, 0 s.
"""

from __future__ import annotations

from collections.abc import Callable
from statistics import median
from typing import Any

import torch
import torch.nn.functional as F

from cnnscale.profile.clock import StepClock

__all__ = ["SyncProbe", "SYNC_PROBE_EVERY", "is_ddp", "nosync_fwd_bwd"]

SYNC_PROBE_EVERY = 25  # auto probe interval (optimiser steps): one extra fwd+bwd per 25 steps, excluded from timings


def is_ddp(accelerator: Any) -> bool:
    """True when Accelerate wrapped the model in DDP (several processes, no DeepSpeed/FSDP)."""
    return str(accelerator.distributed_type).split(".")[-1] in ("MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_XPU")


LossFn = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(model: Any, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(images), labels)


def nosync_fwd_bwd(acc: Any, model: Any, batch: Any, channels_last: bool, sclock: StepClock,
                   loss_fn: LossFn | None = None) -> float:
    """Time one forward+backward of ``batch`` under no_sync with ``loss_fn(model, images, labels)`` (the task's
    loss; default cross-entropy), leaving grads, buffers and RNG as they were."""
    images, labels = batch[0], batch[1]
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    params = list(model.parameters())
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    buffers = [b.detach().clone() for b in model.buffers()]
    devices = [images.device.index or 0] if images.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            t0 = sclock.now()
            with acc.no_sync(model):
                with acc.autocast():
                    loss = (loss_fn or _cross_entropy)(model, images, labels)
                loss.backward()
            return sclock.now() - t0
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)


class SyncProbe:
    """Synced and unsynced forward+backward times of the same micro-batches, and the sync cost per step."""

    def __init__(self, accelerator: Any, model: Any, world_size: int, every: int, sclock: StepClock,
                 channels_last: bool = False, loss_fn: LossFn | None = None) -> None:
        self.acc, self.model, self.world_size = accelerator, model, world_size
        self.loss_fn = loss_fn
        self.every = every or SYNC_PROBE_EVERY
        self.sclock, self.channels_last = sclock, channels_last
        self.synced_s: list[float] = []
        self.unsynced_s: list[float] = []

    @property
    def possible(self) -> bool:
        """Several processes and a DDP-wrapped model (DeepSpeed and plain modules have no no_sync to compare)."""
        return (self.world_size > 1 and self.acc is not None and self.model is not None
                and hasattr(self.model, "no_sync") and is_ddp(self.acc))

    def due(self, steps: int) -> bool:
        """Whether optimiser step ``steps`` (1-based) is a probe step: 2, 2 + every, ..."""
        return self.possible and steps >= 2 and (steps - 2) % self.every == 0

    def probe(self, synced_s: float, batch: Any) -> None:
        """Record ``synced_s`` (the step's timed fwd+bwd) and the same batch's fwd+bwd under no_sync."""
        self.synced_s.append(synced_s)
        self.unsynced_s.append(nosync_fwd_bwd(self.acc, self.model, batch, self.channels_last, self.sclock,
                                              self.loss_fn))

    def per_step(self) -> float | None:
        """Median synced minus median unsynced forward+backward: the all-reduce time not hidden by backward."""
        if self.world_size == 1:
            return 0.0
        if not self.synced_s:
            return None
        return max(median(self.synced_s) - median(self.unsynced_s), 0.0)
