"""Optimisers and LR schedules, from PyTorch's own classes.

Schedule lengths are given in epochs (as the seed's recipes are) and converted to optimiser steps with the run's
optimiser steps per epoch; the scheduler is stepped once per optimiser step (``plateau``: once per epoch, on the
validation loss). A linear warm-up (LinearLR) is chained in front with SequentialLR.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler as S

from cnnscale.config import OptimConfig, SchedConfig

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: SchedConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    total_steps: int) -> Any:
    """A scheduler stepped once per optimiser step (or per epoch with val loss for ``plateau``)."""
    def steps(epochs: float) -> int:
        return max(int(round(epochs * steps_per_epoch)), 1)

    if cfg.name == "plateau":
        return S.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.gamma, patience=cfg.patience)
    warm = min(steps(cfg.warmup_epochs), total_steps - 1) if cfg.warmup_epochs > 0 else 0
    rest = max(total_steps - warm, 1)
    if cfg.name == "none":
        main: Any = S.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif cfg.name == "step":
        main = S.StepLR(optimizer, step_size=steps(cfg.step_size), gamma=cfg.gamma)
    elif cfg.name == "multistep":
        main = S.MultiStepLR(optimizer, milestones=[steps(m) for m in cfg.milestones], gamma=cfg.gamma)
    elif cfg.name == "onecycle":
        return S.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps + 1)
    else:  # cosine
        t_max = steps(cfg.t_max_epochs) if cfg.t_max_epochs else rest
        main = S.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=cfg.eta_min)
    if not warm:
        return main
    warmup = S.LinearLR(optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=warm)
    return S.SequentialLR(optimizer, [warmup, main], milestones=[warm])
