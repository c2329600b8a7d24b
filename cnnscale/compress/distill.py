"""Knowledge distillation (Hinton et al. 2015) through the ordinary training loop.

``loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, labels)``, where ``p^T`` is the
softmax of logits divided by the temperature ``T``. The ``T^2`` keeps the soft-target gradients on the same scale as
the hard-label ones when ``T`` changes. The KL is the true per-example KL divergence (``reduction="batchmean"``);
``nn.KLDivLoss()``'s default ``"mean"`` would also divide by the number of classes.

The teacher is a run directory from ``cnnscale train`` (its ``config.yaml`` names the model, weights come from its
latest ``checkpoints/step_*/model.safetensors``). :class:`DistillTask` moves it to the device, keeps it in eval mode
and runs it under ``no_grad``; under DeepSpeed bf16/fp16 (which casts the student and its inputs, with no autocast)
the teacher is cast to the same dtype, so it takes the same inputs. It is not wrapped in DDP, since it has no
gradients. Each rank runs the teacher on its own shard, so ``accelerate launch --num_processes N -m cnnscale
distill ...`` works as training does.

The student's data section defaults to the teacher's (same data set, same directory); the usual training flags
(``--model``, ``--epochs``, ``--data-dir``, ...) and ``--config`` apply on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnscale.compress.common import check_out, command_parser, load_run_model, run_overrides
from cnnscale.config import CommandParser, Config, config_from_args
from cnnscale.errors import UserError
from cnnscale.models import get_model_builder
from cnnscale.records.io import SUMMARY, read_json, write_json
from cnnscale.train import deepspeed as ds_config
from cnnscale.train.loop import run

__all__ = ["DistillConfig", "DistillTask", "distillation_loss", "main", "DISTILL_RECORD"]

DISTILL_RECORD = "distill.json"


@dataclass(frozen=True)
class DistillConfig:
    """Distillation: the teacher run, the temperature and the weight of the soft targets"""

    teacher: str = ""
    """Run directory of the teacher (written by ``cnnscale train``)."""
    temperature: float = 4.0
    """Softmax temperature T of both soft distributions (> 0)."""
    alpha: float = 0.9
    """Weight of the soft (KL) term; ``1 - alpha`` weighs the hard-label cross-entropy. In [0, 1]."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"distill.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise UserError(f"distill.alpha must be in [0, 1], got {self.alpha}")


SHORT = {"--teacher": "teacher", "--temperature": "temperature", "--alpha": "alpha"}


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)``, averaged over the batch."""
    s, t = student_logits.float(), teacher_logits.float()
    kl = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                  reduction="batchmean", log_target=True)
    ce = F.cross_entropy(s, labels)
    return alpha * temperature * temperature * kl + (1.0 - alpha) * ce


class DistillTask:
    """A training task (see :class:`cnnscale.train.step.Task`) whose loss asks a frozen teacher."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def prepare(self, accelerator: Any) -> None:
        """The teacher on the accelerator's device, in the dtype of the model's inputs under DeepSpeed bf16/fp16."""
        self.teacher = self.teacher.to(accelerator.device, dtype=ds_config.input_dtype(accelerator)).eval()

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        student = model(images)
        with torch.no_grad():
            teacher = self.teacher(images)
        if teacher.shape != student.shape:  # backstop of the check before training (shapes only: no sync)
            raise UserError(f"teacher has {teacher.shape[-1]} classes but the student has {student.shape[-1]}")
        return distillation_loss(student, teacher, labels, self.temperature, self.alpha)


def _student_config(parser: CommandParser, ns: Any, teacher_cfg: dict[str, Any]) -> Config:
    """The student's config: the teacher's data section as the base, then ``--config`` and the training flags."""
    data = run_overrides(teacher_cfg).get("data")
    cfg = config_from_args(ns, parser, overrides={"data": data} if data else None)
    get_model_builder(cfg.model.name)  # unknown student model: one line, before any data is read
    t_classes, s_classes = int(teacher_cfg["model"].get("num_classes", 10)), _data_classes(cfg)
    if s_classes is not None and t_classes != s_classes:
        raise UserError(f"teacher has {t_classes} classes but the student's data ({cfg.data.name}) has {s_classes}")
    return cfg


def _data_classes(cfg: Config) -> int | None:
    """Classes of the student's data without reading it: 10 for CIFAR-10 and synthetic, the class folders of an
    ImageFolder tree (None when the directory is missing: the data loader reports that)."""
    if cfg.data.name != "imagefolder":
        return 10
    train = Path(cfg.data.data_dir) / "train"
    return sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else None


def _teacher_summary(run_dir: str) -> dict[str, Any]:
    p = Path(run_dir) / SUMMARY
    try:
        return read_json(p) if p.is_file() else {}
    except ValueError:
        return {}


def _parser() -> CommandParser:
    return command_parser("cnnscale distill", "Train a student from a teacher run (knowledge distillation) "
                          "through the ordinary training loop; every training flag of cnnscale train applies.",
                          "distill", DistillConfig, SHORT)


def main(argv: list[str]) -> int:
    """``cnnscale distill --teacher RUN_DIR [--temperature T] [--alpha A] [training flags]``; ``--help`` lists all."""
    parser = _parser()
    ns = parser.parse_args(list(argv))
    dcfg = parser.section(ns, "distill")
    if not dcfg.teacher:
        raise UserError("--teacher RUN_DIR is required (a run directory written by cnnscale train)")
    teacher, tcfg = load_run_model(dcfg.teacher, role="--teacher")
    cfg = _student_config(parser, ns, tcfg)
    if cfg.train.out or cfg.train.resume:
        check_out(cfg.train.resume or cfg.train.out, dcfg.teacher, "distill")
    result = run(cfg, DistillTask(teacher, dcfg.temperature, dcfg.alpha))
    summary = result.summary
    if result.is_main:
        tsum = _teacher_summary(dcfg.teacher)
        record = {"teacher": str(dcfg.teacher), "teacher_model": tcfg["model"]["name"],
                  "teacher_test_acc": tsum.get("test_acc"), "temperature": dcfg.temperature, "alpha": dcfg.alpha,
                  "student_model": cfg.model.name, "student_test_acc": summary.get("test_acc"),
                  "world_size": summary.get("world_size")}
        write_json(result.run_dir / DISTILL_RECORD, record)
        print(f"distill: {record['teacher_model']} (test acc {record['teacher_test_acc']}) -> {cfg.model.name}: "
              f"test acc {summary.get('test_acc')}, T={dcfg.temperature}, alpha={dcfg.alpha}, run {result.run_dir}")
    return 0 if summary.get("status") == "ok" else 1
