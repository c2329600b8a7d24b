"""The parts of one training run (built once, read by the loop) and the loop's own state, shared by
:mod:`cnnscale.train.loop` and :mod:`cnnscale.train.finish`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnscale.config import Config
from cnnscale.profile.profiler import NullProfiler
from cnnscale.train.rundir import RunFiles
from cnnscale.train.step import Task

__all__ = ["RunResult", "Parts", "State"]


@dataclass(frozen=True)
class RunResult:
    """What a finished (or preempted) run hands back to its caller (distill, prune, the CLI)."""

    summary: dict[str, Any]
    """The summary, also written to ``summary.json`` (status ``ok``, ``preempted`` or ``diverged``)."""
    run_dir: Path
    """The run directory."""
    model: nn.Module
    """The trained model, unwrapped from DDP/DeepSpeed; torch.compile's wrapper is kept (``unwrap_model``'s default)."""
    is_main: bool
    """True on the main process, the one that writes records."""


@dataclass
class Parts:
    """The built, prepared parts of one run (read-only for the loop)."""

    cfg: Config
    acc: Any
    task: Task
    model: nn.Module
    optimizer: Any
    scheduler: Any
    train_dl: Any
    val_dl: Any
    test_dl: Any
    prof: NullProfiler
    files: RunFiles
    total_steps: int
    per_epoch: int
    raw_optimizer: Any
    in_dtype: torch.dtype | None
    clip_grad: float
    n_params: int
    t_start: float
    env_extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class State:
    """The loop's own state: position (saved in checkpoints), the loss since the last log, the last evaluation."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    loss_sum: Any = None
    loss_n: int = 0
    last_loss: float | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_step: int = -1
    t_log: float = 0.0
    diverged: str | None = None

    def position(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}
