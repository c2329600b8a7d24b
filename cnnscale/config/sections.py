"""Run configuration sections: one frozen dataclass per component, each field with a docstring and its valid range.

Each builder takes only its own section (``cfg.data``, ``cfg.optim``, ...). Every field is declared with
:func:`~cnnscale.config.ranges.setting`, which keeps its range or choices in the field's metadata, beside its
docstring; ``__post_init__`` runs the one validator (:func:`~cnnscale.config.ranges.check_fields`) and states only
the cross-field rules. The choices of every string field are module constants, defined here once and imported
wherever else they are needed (study specs, bench flags). A bad value is a one-line
:class:`~cnnscale.errors.UserError`.

Batch arithmetic is explicit: ``global_batch = micro_batch x grad_accum x world_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cnnscale.config.ranges import SEED_LIMIT, check_fields, setting
from cnnscale.errors import UserError

__all__ = [
    "Config", "ModelConfig", "DataConfig", "OptimConfig", "SchedConfig", "TrainConfig", "ProfileConfig",
    "FastConfig", "DistConfig", "global_batch", "SECTIONS",
    "OPTIMIZERS", "SCHEDULERS", "PRECISIONS", "DATASETS", "LOADERS", "COMM_HOOKS", "PROGRESS_MODES", "COMPILE_MODES",
    "TRACKERS", "DEVICES",
]

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("none", "step", "multistep", "cosine", "plateau", "onecycle")
PRECISIONS = ("no", "fp16", "bf16")
DATASETS = ("cifar10", "imagefolder", "synthetic")
LOADERS = ("auto", "torch", "device")
COMM_HOOKS = ("none", "fp16", "bf16")
PROGRESS_MODES = ("auto", "rich", "plain", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICES = ("auto", "cpu", "cuda")
TRACKERS = ("tensorboard", "mlflow", "wandb", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
"""Experiment trackers Accelerate can log to (``train.trackers``; cnnscale.train.trackers checks the install)."""


@dataclass(frozen=True)
class ModelConfig:
    """model: which registered network to build, and its size."""

    name: str = setting("resnet18", max_len=100, free="checked against the model registry when built")
    """Registered model name (``cnnscale models`` lists them)."""
    width_mult: float | None = setting(None, gt=0, cap=16)
    """Width multiplier for models that take one (mobilenet_v1/v2); None keeps the model's default."""
    num_classes: int | None = setting(None, ge=2, cap=100_000)
    """Output classes. The data decides: unset (null) it follows the data's classes (10 for cifar10 and synthetic,
    the class folders of an ImageFolder); a value given must equal them, or exceed them with model.larger_head."""
    larger_head: bool = setting(False)
    """Allow num_classes above the data's classes (a head with outputs no label uses, e.g. to match another run)."""

    def __post_init__(self) -> None:
        check_fields(self, "model.")


@dataclass(frozen=True)
class DataConfig:
    """data: the data set, its split and the loader that feeds it."""

    name: str = setting("cifar10", choices=DATASETS)
    """cifar10 (torchvision), imagefolder (DIR/train, DIR/test in ImageFolder layout) or synthetic."""
    data_dir: str = setting("data", path=True, free="checked when the data is read")
    """Root directory of the data set."""
    download: bool = setting(True)
    """cifar10 only: download when missing."""
    val_size: int = setting(5000, ge=0, cap=10**8)
    """Images held out from train for validation (0 disables validation)."""
    loader: str = setting("auto", choices=LOADERS)
    """auto: device when the decoded uint8 set fits data.device_budget, else torch (the choice and its reason are
    printed at start-up and recorded in env.json); torch: DataLoader with torchvision transforms; device: whole uint8
    set on the device, batched augmentation, evaluation batched there too (no worker processes)."""
    device_budget: float = setting(0.5, gt=0, le=1)
    """loader auto: the share of free memory (RAM on CPU, for all ranks of the node; device memory on a GPU) the
    decoded data set may take for the device loader to be chosen."""
    augment: bool = setting(True)
    """RandomCrop(32, padding=4) + horizontal flip on train."""
    num_workers: int = setting(2, ge=0, cap=256)
    """DataLoader worker processes (torch loader)."""
    pin_memory: bool = setting(True)
    """Pin host memory (only used with CUDA)."""
    persistent_workers: bool = setting(True)
    """Keep DataLoader workers alive between epochs."""
    synthetic_size: int = setting(10000, ge=1, cap=10**8)
    """Number of synthetic training images (test set is a fifth of it)."""
    limit_train: int = setting(0, ge=0, cap=10**9)
    """Use only the first N training images after the split (0: all); for quick runs."""
    limit_test: int = setting(0, ge=0, cap=10**9)
    """Use only the first N test images (0: all)."""
    skip_bad_images: bool = setting(False)
    """imagefolder: leave out files that do not decode (counted, and listed in env.json) instead of stopping with
    one line naming the first; the torch loader then decodes every image once before training."""

    def __post_init__(self) -> None:
        check_fields(self, "data.")


@dataclass(frozen=True)
class OptimConfig:
    """optim: the optimiser and its hyper-parameters."""

    name: str = setting("sgd", choices=OPTIMIZERS)
    """sgd, adam, adamw or rmsprop."""
    lr: float = setting(0.1, gt=0)
    """Peak learning rate."""
    momentum: float = setting(0.9, ge=0, lt=1)
    """Momentum (sgd, rmsprop)."""
    weight_decay: float = setting(5e-4, ge=0)
    """L2 weight decay."""
    nesterov: bool = setting(False)
    """Nesterov momentum (sgd)."""
    alpha: float = setting(0.9, ge=0, le=1)
    """RMSprop smoothing constant."""
    eps: float = setting(1e-8, gt=0)
    """Denominator epsilon (adam, adamw, rmsprop)."""

    def __post_init__(self) -> None:
        check_fields(self, "optim.")


@dataclass(frozen=True)
class SchedConfig:
    """sched: the learning-rate schedule, a function of the optimiser-step count."""

    name: str = setting("cosine", choices=SCHEDULERS)
    """none, step, multistep, cosine, plateau or onecycle. Lengths are in epochs, applied per optimiser step."""
    warmup_epochs: float = setting(0.0, ge=0, cap=10**6)
    """Linear warm-up from warmup_start_factor x lr, before the main schedule (not with plateau)."""
    warmup_start_factor: float = setting(0.1, gt=0, le=1)
    """Warm-up starts at this fraction of lr."""
    step_size: float = setting(30.0, gt=0)
    """step: epochs between decays."""
    milestones: tuple[float, ...] = setting((100.0, 150.0), ge=0)
    """multistep: epochs at which lr decays."""
    gamma: float = setting(0.1, gt=0, le=1)
    """Decay factor (step, multistep, plateau)."""
    t_max_epochs: float = setting(0.0, ge=0)
    """cosine: length of the cosine in epochs (0: the whole run)."""
    eta_min: float = setting(0.0, ge=0)
    """cosine: final lr (at most optim.lr)."""
    patience: int = setting(5, ge=0, cap=10**6)
    """plateau: epochs without val-loss improvement before decaying."""

    def __post_init__(self) -> None:
        check_fields(self, "sched.")


@dataclass(frozen=True)
class TrainConfig:
    """train: run length, batch arithmetic, precision, checkpoints and the run directory."""

    epochs: int = setting(0, ge=0, cap=10**6)
    """Epochs to train (0: bounded by max_steps instead; if both are 0, one epoch)."""
    max_steps: int = setting(0, ge=0, cap=10**9)
    """Optimiser steps to train (0: bounded by epochs). If both are set, the first reached ends the run."""
    micro_batch: int = setting(128, ge=1, cap=65536)
    """Images per process per forward/backward."""
    grad_accum: int = setting(1, ge=1, cap=65536)
    """Micro-batches accumulated per optimiser step."""
    mixed_precision: str = setting("no", choices=PRECISIONS)
    """no, fp16 or bf16 (autocast through Accelerate)."""
    clip_grad: float = setting(0.0, ge=0)
    """Clip the gradient global norm to this value (0: off)."""
    label_smoothing: float = setting(0.0, ge=0, lt=1)
    """CrossEntropyLoss label smoothing."""
    seed: int = setting(0, ge=0, lt=SEED_LIMIT)
    """Seed for model init, data order and augmentation."""
    log_every: int = setting(20, ge=1, cap=10**9)
    """Optimiser steps between metric records (the only place .item() is called)."""
    eval_every_epoch: bool = setting(True)
    """Evaluate on the validation split at the end of each epoch."""
    final_eval: bool = setting(True)
    """Evaluate validation and test at the end of the run (throughput studies turn it off)."""
    ckpt_every: int = setting(0, ge=0, cap=10**9)
    """Optimiser steps between checkpoints (0: only at the end)."""
    keep_ckpts: int = setting(2, ge=1, cap=10**6)
    """Checkpoints kept in the run directory."""
    final_ckpt: bool = setting(True)
    """Checkpoint at the end of the run. false: a run that will never be resumed or extended (a throughput study's
    point) writes none at its end (the weights and optimiser state: ~90 MB and ~0.3 s for ResNet-18); its weights
    are still checked for non-finite values, and a stop signal or train.ckpt_every still checkpoints."""
    out: str = setting("", path=True)
    """Run directory (default: runs/<model>-<time>)."""
    resume: str = setting("", path=True)
    """Run directory to resume from its latest checkpoint ('' : fresh run). Its config.yaml is the base: flags
    override only what they name (--max-steps/--epochs extend, --data-dir moves the data); a flag contradicting
    the checkpoint (model, optimiser, schedule, batch, precision, seed) is an error."""
    overwrite: bool = setting(False)
    """A fresh run into an out directory that already holds a run: move the old run aside to OUT.old-<time>
    first (without it such a run is refused)."""
    stop_on_nonfinite: bool = setting(True)
    """Stop every rank at the log step whose loss is NaN or infinite, status diverged, exit code 3 (the last good
    checkpoint is kept, never overwritten with non-finite weights); false trains on."""
    progress: str = setting("auto", choices=PROGRESS_MODES)
    """auto (rich bar on a TTY, plain lines otherwise), rich, plain or none."""
    device: str = setting("auto", choices=DEVICES)
    """auto (CUDA when torch can use a GPU, else CPU; GPUs that nvidia-smi lists but torch cannot use are an
    error, never a silent CPU run), cpu (an explicit CPU run, also on a GPU node) or cuda (a GPU or an error)."""
    trackers: tuple[str, ...] = setting((), choices=TRACKERS)
    """Experiment trackers through Accelerate (rank 0 only, in RUN/trackers): tensorboard, mlflow, wandb, ...;
    on the command line comma-separated (--train.trackers tensorboard,mlflow)."""

    def __post_init__(self) -> None:
        items = (self.trackers,) if isinstance(self.trackers, str) else self.trackers
        names = tuple(dict.fromkeys(n.strip() for item in items for n in str(item).split(",") if n.strip()))
        object.__setattr__(self, "trackers", names)  # "a,b" from the command line -> ("a", "b"), repeats dropped
        check_fields(self, "train.")


@dataclass(frozen=True)
class ProfileConfig:
    """profile: what is measured (a no-op profiler when off)."""

    enabled: bool = setting(True)
    """Measure throughput, step split, memory, utilisation and MFU (a no-op object when off)."""
    warmup_steps: int = setting(2, ge=0, cap=10**9)
    """Optimiser steps left out of throughput, step-time and phase figures (first-step allocation, autotuning,
    compilation); shorter runs are measured whole."""
    nvml_hz: float = setting(10.0, gt=0, cap=1000)
    """NVML sampling rate of the GPU sampler thread."""
    sync_probe_every: int = setting(0, ge=0, cap=10**9)
    """Every N optimiser steps, time a micro-step under no_sync to measure gradient-sync cost (0: auto)."""
    trace_steps: int = setting(0, ge=0, cap=10**4)
    """Write a torch.profiler trace of this many steps into the run directory (0: off)."""
    peak_tflops: float = setting(0.0, ge=0, cap=10**6)
    """Override the peak TFLOP/s used for MFU (0: device table, or a matmul benchmark on CPU)."""

    def __post_init__(self) -> None:
        check_fields(self, "profile.")


@dataclass(frozen=True)
class FastConfig:
    """fast: memory format, compilation and backend switches."""

    channels_last: bool | None = setting(None, free="true, false, or null: decided per device")
    """channels_last memory format for model and inputs; unset (null): on for a CUDA device, where it is faster for
    these conv nets, off on CPU (:meth:`resolved`; env.json records the value used)."""
    compile: bool = setting(False)
    """torch.compile the model."""
    compile_mode: str = setting("default", choices=COMPILE_MODES)
    """torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs."""
    cudnn_benchmark: bool = setting(True)
    """torch.backends.cudnn.benchmark (GPU only; on by default, --fast.cudnn_benchmark false turns it off)."""
    tf32: bool = setting(True)
    """Allow TF32 matmul/conv on Ampere+ GPUs."""

    def __post_init__(self) -> None:
        check_fields(self, "fast.")

    def resolved(self, cuda: bool) -> FastConfig:
        """The switches for this device, every default decided: ``channels_last`` unset is on for CUDA only."""
        return self if self.channels_last is not None else replace(self, channels_last=cuda)


@dataclass(frozen=True)
class DistConfig:
    """dist: DDP settings, the collective timeout and the stop-signal vote."""

    timeout_s: int = setting(120, ge=5, cap=7 * 86400)
    """Collective timeout: a dead rank ends the job after at most this long (PyTorch's default is 30 min). With
    fast.compile on, at least 1800 s (ranks finish compiling minutes apart; cnnscale.train.build.COMPILE_TIMEOUT_S)."""
    bucket_mb: int = setting(25, ge=1, cap=4096)
    """DDP gradient bucket size in MB."""
    comm_hook: str = setting("none", choices=COMM_HOOKS)
    """DDP communication hook: none, fp16 or bf16 gradient compression."""
    static_graph: bool = setting(False)
    """DDP static_graph (lets DDP skip some per-step bookkeeping)."""
    preempt_check_every: int = setting(10, ge=1, cap=10**9)
    """Optimiser steps between the ranks' vote on a received stop signal (SIGUSR1/SIGTERM/Ctrl-C). The vote is a
    blocking one-integer all-reduce on gloo (~0.1-1 ms), kept off most steps; a stop waits at most this many steps."""
    compute_only: bool = setting(False)
    """Skip the gradient all-reduce (DDP no_sync on every step), so each rank trains alone: a calibration run that
    measures compute time per step with N processes sharing the machine(s) and no communication. Not training."""

    def __post_init__(self) -> None:
        check_fields(self, "dist.")


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

    def __post_init__(self) -> None:
        # the cross-section rules, stated once (each section checks its own fields)
        if self.sched.eta_min > self.optim.lr:
            raise UserError(f"sched.eta_min must be <= optim.lr ({self.optim.lr}), got {self.sched.eta_min}: "
                            "the schedule would end above its peak")


# section name -> its dataclass, in the order of Config's fields
SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "sched": SchedConfig,
                             "train": TrainConfig, "profile": ProfileConfig, "fast": FastConfig, "dist": DistConfig}


def global_batch(cfg: Config, world_size: int) -> int:
    """``micro_batch x grad_accum x world_size``: images per optimiser step."""
    return cfg.train.micro_batch * cfg.train.grad_accum * world_size
