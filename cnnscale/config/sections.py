"""Run configuration sections: one frozen dataclass per component, each field with a docstring and a range check.

Each builder takes only its own section (``cfg.data``, ``cfg.optim``, ...). The choices of every string field are
module constants, defined here once and imported wherever else they are needed (study specs, bench flags).
A bad value is a one-line :class:`~cnnscale.errors.UserError` raised in ``__post_init__``.

Batch arithmetic is explicit: ``global_batch = micro_batch x grad_accum x world_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from cnnscale.errors import UserError

__all__ = [
    "Config", "ModelConfig", "DataConfig", "OptimConfig", "SchedConfig", "TrainConfig", "ProfileConfig",
    "FastConfig", "DistConfig", "global_batch", "SECTIONS",
    "OPTIMIZERS", "SCHEDULERS", "PRECISIONS", "DATASETS", "LOADERS", "COMM_HOOKS", "PROGRESS_MODES", "COMPILE_MODES",
]

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("none", "step", "multistep", "cosine", "plateau", "onecycle")
PRECISIONS = ("no", "fp16", "bf16")
DATASETS = ("cifar10", "imagefolder", "synthetic")
LOADERS = ("torch", "device")
COMM_HOOKS = ("none", "fp16", "bf16")
PROGRESS_MODES = ("auto", "rich", "plain", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def _choice(section: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{section}.{name}: unknown value {value!r} (choose from: {', '.join(choices)})")


def _choices(section: str, obj: object) -> None:
    """Check every field named in ``obj.CHOICES`` against its choices."""
    for name, choices in getattr(obj, "CHOICES", {}).items():
        _choice(section, name, getattr(obj, name), choices)


@dataclass(frozen=True)
class ModelConfig:
    """model: which registered network to build, and its size."""

    name: str = "resnet18"
    """Registered model name (``cnnscale models`` lists them)."""
    width_mult: float | None = None
    """Width multiplier for models that take one (mobilenet_v1/v2); None keeps the model's default."""
    num_classes: int = 10
    """Output classes."""

    def __post_init__(self) -> None:
        _check(self.num_classes >= 2, f"model.num_classes must be >= 2, got {self.num_classes}")
        _check(self.width_mult is None or self.width_mult > 0, f"model.width_mult must be > 0, got {self.width_mult}")


@dataclass(frozen=True)
class DataConfig:
    """data: the data set, its split and the loader that feeds it."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"name": DATASETS, "loader": LOADERS}
    """The string fields with a fixed set of values."""

    name: str = "cifar10"
    """cifar10 (torchvision), imagefolder (DIR/train, DIR/test in ImageFolder layout) or synthetic."""
    data_dir: str = "data"
    """Root directory of the data set."""
    download: bool = True
    """cifar10 only: download when missing."""
    val_size: int = 5000
    """Images held out from train for validation (0 disables validation)."""
    loader: str = "torch"
    """torch: DataLoader with torchvision transforms; device: whole uint8 set on the device, batched augmentation."""
    augment: bool = True
    """RandomCrop(32, padding=4) + horizontal flip on train."""
    num_workers: int = 2
    """DataLoader worker processes (torch loader)."""
    pin_memory: bool = True
    """Pin host memory (only used with CUDA)."""
    persistent_workers: bool = True
    """Keep DataLoader workers alive between epochs."""
    synthetic_size: int = 10000
    """Number of synthetic training images (test set is a fifth of it)."""
    limit_train: int = 0
    """Use only the first N training images after the split (0: all); for quick runs."""
    limit_test: int = 0
    """Use only the first N test images (0: all)."""

    def __post_init__(self) -> None:
        _choices("data", self)
        for n in ("val_size", "num_workers", "limit_train", "limit_test"):
            _check(getattr(self, n) >= 0, f"data.{n} must be >= 0, got {getattr(self, n)}")
        _check(self.synthetic_size > 0, f"data.synthetic_size must be > 0, got {self.synthetic_size}")


@dataclass(frozen=True)
class OptimConfig:
    """optim: the optimiser and its hyper-parameters."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"name": OPTIMIZERS}
    """The string fields with a fixed set of values."""

    name: str = "sgd"
    """sgd, adam, adamw or rmsprop."""
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    """Momentum (sgd, rmsprop)."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    nesterov: bool = False
    """Nesterov momentum (sgd)."""
    alpha: float = 0.9
    """RMSprop smoothing constant."""
    eps: float = 1e-8
    """Denominator epsilon (adam, adamw, rmsprop)."""

    def __post_init__(self) -> None:
        _choices("optim", self)
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")


@dataclass(frozen=True)
class SchedConfig:
    """sched: the learning-rate schedule, a function of the optimiser-step count."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"name": SCHEDULERS}
    """The string fields with a fixed set of values."""

    name: str = "cosine"
    """none, step, multistep, cosine, plateau or onecycle. Lengths are in epochs, applied per optimiser step."""
    warmup_epochs: float = 0.0
    """Linear warm-up from warmup_start_factor x lr, before the main schedule (not with plateau)."""
    warmup_start_factor: float = 0.1
    """Warm-up starts at this fraction of lr."""
    step_size: float = 30.0
    """step: epochs between decays."""
    milestones: tuple[float, ...] = (100.0, 150.0)
    """multistep: epochs at which lr decays."""
    gamma: float = 0.1
    """Decay factor (step, multistep, plateau)."""
    t_max_epochs: float = 0.0
    """cosine: length of the cosine in epochs (0: the whole run)."""
    eta_min: float = 0.0
    """cosine: final lr."""
    patience: int = 5
    """plateau: epochs without val-loss improvement before decaying."""

    def __post_init__(self) -> None:
        _choices("sched", self)
        _check(self.warmup_epochs >= 0, f"sched.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(0 < self.warmup_start_factor <= 1, "sched.warmup_start_factor must be in (0, 1]")
        _check(self.step_size > 0, f"sched.step_size must be > 0, got {self.step_size}")
        _check(0 < self.gamma <= 1, f"sched.gamma must be in (0, 1], got {self.gamma}")
        _check(self.t_max_epochs >= 0, f"sched.t_max_epochs must be >= 0, got {self.t_max_epochs}")
        _check(self.patience >= 0, f"sched.patience must be >= 0, got {self.patience}")


@dataclass(frozen=True)
class TrainConfig:
    """train: run length, batch arithmetic, precision, checkpoints and the run directory."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"mixed_precision": PRECISIONS, "progress": PROGRESS_MODES}
    """The string fields with a fixed set of values."""

    epochs: int = 0
    """Epochs to train (0: bounded by max_steps instead; if both are 0, one epoch)."""
    max_steps: int = 0
    """Optimiser steps to train (0: bounded by epochs). If both are set, the first reached ends the run."""
    micro_batch: int = 128
    """Images per process per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""
    mixed_precision: str = "no"
    """no, fp16 or bf16 (autocast through Accelerate)."""
    clip_grad: float = 0.0
    """Clip the gradient global norm to this value (0: off)."""
    label_smoothing: float = 0.0
    """CrossEntropyLoss label smoothing."""
    seed: int = 0
    """Seed for model init, data order and augmentation."""
    log_every: int = 20
    """Optimiser steps between metric records (the only place .item() is called)."""
    eval_every_epoch: bool = True
    """Evaluate on the validation split at the end of each epoch."""
    final_eval: bool = True
    """Evaluate validation and test at the end of the run (throughput studies turn it off)."""
    ckpt_every: int = 0
    """Optimiser steps between checkpoints (0: only at the end)."""
    keep_ckpts: int = 2
    """Checkpoints kept in the run directory."""
    out: str = ""
    """Run directory (default: runs/<model>-<time>)."""
    resume: str = ""
    """Run directory to resume from its latest checkpoint ('' : fresh run)."""
    progress: str = "auto"
    """auto (rich bar on a TTY, plain lines otherwise), rich, plain or none."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, f"train.epochs must be >= 0, got {self.epochs}")
        _check(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _check(self.micro_batch >= 1, f"train.micro_batch must be >= 1, got {self.micro_batch}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _choices("train", self)
        _check(self.clip_grad >= 0, f"train.clip_grad must be >= 0, got {self.clip_grad}")
        _check(0 <= self.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(self.ckpt_every >= 0, f"train.ckpt_every must be >= 0, got {self.ckpt_every}")
        _check(self.keep_ckpts >= 1, f"train.keep_ckpts must be >= 1, got {self.keep_ckpts}")


@dataclass(frozen=True)
class ProfileConfig:
    """profile: what is measured (a no-op profiler when off)."""

    enabled: bool = True
    """Measure throughput, step split, memory, utilisation and MFU (a no-op object when off)."""
    warmup_steps: int = 2
    """Optimiser steps left out of throughput, step-time and phase figures (first-step allocation, autotuning,
    compilation); shorter runs are measured whole."""
    nvml_hz: float = 10.0
    """NVML sampling rate of the GPU sampler thread."""
    sync_probe_every: int = 0
    """Every N optimiser steps, time a micro-step under no_sync to measure gradient-sync cost (0: auto)."""
    trace_steps: int = 0
    """Write a torch.profiler trace of this many steps into the run directory (0: off)."""
    peak_tflops: float = 0.0
    """Override the peak TFLOP/s used for MFU (0: device table, or a matmul benchmark on CPU)."""

    def __post_init__(self) -> None:
        _check(self.nvml_hz > 0, f"profile.nvml_hz must be > 0, got {self.nvml_hz}")
        _check(self.warmup_steps >= 0, f"profile.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.sync_probe_every >= 0, "profile.sync_probe_every must be >= 0")
        _check(self.trace_steps >= 0, "profile.trace_steps must be >= 0")
        _check(self.peak_tflops >= 0, "profile.peak_tflops must be >= 0")


@dataclass(frozen=True)
class FastConfig:
    """fast: memory format, compilation and backend switches."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"compile_mode": COMPILE_MODES}
    """The string fields with a fixed set of values."""

    channels_last: bool = False
    """Use channels_last memory format for model and inputs."""
    compile: bool = False
    """torch.compile the model."""
    compile_mode: str = "default"
    """torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs."""
    cudnn_benchmark: bool = True
    """torch.backends.cudnn.benchmark (GPU only)."""
    tf32: bool = True
    """Allow TF32 matmul/conv on Ampere+ GPUs."""

    def __post_init__(self) -> None:
        _choices("fast", self)


@dataclass(frozen=True)
class DistConfig:
    """dist: DDP settings, the collective timeout and the stop-signal vote."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"comm_hook": COMM_HOOKS}
    """The string fields with a fixed set of values."""

    timeout_s: int = 120
    """Collective timeout: a dead rank ends the job after at most this long (PyTorch's default is 30 min)."""
    bucket_mb: int = 25
    """DDP gradient bucket size in MB."""
    comm_hook: str = "none"
    """DDP communication hook: none, fp16 or bf16 gradient compression."""
    static_graph: bool = False
    """DDP static_graph (lets DDP skip some per-step bookkeeping)."""
    preempt_check_every: int = 10
    """Optimiser steps between the ranks' vote on a received stop signal (SIGUSR1/SIGTERM/Ctrl-C). The vote is a
    blocking one-integer all-reduce on gloo (~0.1-1 ms), kept off most steps; a stop waits at most this many steps."""
    compute_only: bool = False
    """Skip the gradient all-reduce (DDP no_sync on every step), so each rank trains alone: a calibration run that
    measures compute time per step with N processes sharing the machine(s) and no communication. Not training."""

    def __post_init__(self) -> None:
        _check(self.timeout_s >= 5, f"dist.timeout_s must be >= 5, got {self.timeout_s}")
        _check(self.bucket_mb >= 1, f"dist.bucket_mb must be >= 1, got {self.bucket_mb}")
        _check(self.preempt_check_every >= 1, f"dist.preempt_check_every must be >= 1, got {self.preempt_check_every}")
        _choices("dist", self)


@dataclass(frozen=True)
class Config:
    """The whole run: one section per component; each builder takes only its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Which network."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data set and its loader."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimiser."""
    sched: SchedConfig = field(default_factory=SchedConfig)
    """The learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length, batch, precision, checkpoints, run directory."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """What is measured."""
    fast: FastConfig = field(default_factory=FastConfig)
    """Speed switches (channels_last, compile, cuDNN, TF32)."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Distributed settings."""


# section name -> its dataclass, in the order of Config's fields
SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "sched": SchedConfig,
                             "train": TrainConfig, "profile": ProfileConfig, "fast": FastConfig, "dist": DistConfig}


def global_batch(cfg: Config, world_size: int) -> int:
    """``micro_batch x grad_accum x world_size``: images per optimiser step."""
    return cfg.train.micro_batch * cfg.train.grad_accum * world_size
