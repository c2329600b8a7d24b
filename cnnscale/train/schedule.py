"""Optimisers and LR schedules, from PyTorch's own classes.

Schedule lengths are given in epochs (as the seed's recipes are) and converted to optimiser steps with the run's
optimiser steps per epoch; the scheduler is stepped once per optimiser step (``plateau``: once per epoch, on the
validation loss). A linear warm-up (LinearLR) is chained in front with SequentialLR.

The rule on resume (:func:`resume_scheduler`): the LR is a function of the optimiser-step count and of the run's
length as configured now. A resumed run rebuilds its schedule for its current length (``train.max_steps`` /
``train.epochs``, possibly extended by the resuming flags) and advances it to the checkpoint's step; the steps
already done keep the LRs they had. A run extended from 10 to 20 steps therefore trains steps 11-20 with the LRs a
20-step run has at steps 11-20 (cosine: ``eta_min + (lr - eta_min) * (1 + cos(pi * step / 20)) / 2``), and a resume
without extending reproduces the uninterrupted run exactly. ``plateau`` depends on validation losses, not on the
step count: its state is restored from the checkpoint as saved.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler as S

from cnnscale.config import OptimConfig, SchedConfig

__all__ = ["build_optimizer", "build_scheduler", "resume_scheduler"]


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
        # max_lr: the configured LR (kept in the group by a first OneCycleLR, when resume_scheduler rebuilds it)
        return S.OneCycleLR(optimizer, max_lr=[g.get("max_lr", g["lr"]) for g in optimizer.param_groups],
                            total_steps=total_steps + 1)
    else:  # cosine
        t_max = steps(cfg.t_max_epochs) if cfg.t_max_epochs else rest
        main = S.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=cfg.eta_min)
    if not warm:
        return main
    warmup = S.LinearLR(optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=warm)
    return S.SequentialLR(optimizer, [warmup, main], milestones=[warm])


def resume_scheduler(scheduler: Any, cfg: SchedConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                     total_steps: int, step: int) -> None:
    """After a checkpoint's load: ``scheduler`` (the run's, registered for checkpointing) set to the schedule of a
    run of ``total_steps`` advanced to optimiser step ``step``, and the optimiser's LRs with it (the rule is in the
    module docstring). Each group's LR is reset to its ``initial_lr`` and a fresh scheduler stepped ``step`` times
    (about 10 us a step), exactly as the uninterrupted run stepped it; its state is then copied into ``scheduler``.
    ``plateau``: nothing to do (its loaded state is kept)."""
    if cfg.name == "plateau":
        return
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
    fresh = build_scheduler(cfg, optimizer, steps_per_epoch, total_steps)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": replaying, on purpose
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            fresh.step()
    scheduler.load_state_dict(fresh.state_dict())
