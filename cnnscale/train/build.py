"""Builders of a run's parts, each from its own config section: the accelerator, the model, the fast path, the run's
length and its FLOP count. The optimiser and LR schedule builders are in :mod:`cnnscale.train.schedule`, the data
loaders in :mod:`cnnscale.data.loaders`, the profiler in :mod:`cnnscale.profile.profiler`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
from datetime import timedelta
from typing import Any

import accelerate.optimizer as acc_opt
import torch
import torch._dynamo  # noqa: F401  (imported before the process group starts: see below)
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, InitProcessGroupKwargs
from torch import nn

from cnnscale.config import Config, FastConfig, ModelConfig, TrainConfig
from cnnscale.errors import UserError
from cnnscale.models import create_model, get_model_builder
from cnnscale.profile import gpus
from cnnscale.profile.commhook import timed_ddp_handler
from cnnscale.profile.countcache import cached_counts, count_key
from cnnscale.profile.flops import count_flops
from cnnscale.profile.layers import layer_table
from cnnscale.profile.mfu import MfuInputs
from cnnscale.train import deepspeed as ds_config
from cnnscale.train import trackers

# torch._dynamo is imported here, before build_accelerator starts the process group, on purpose: every run imports
# it (the first optimiser step does), and first imported AFTER init_process_group it (like deepspeed, see
# _import_deepspeed) kept the gloo group alive past destroy_process_group (measured with torch 2.14 and deepspeed 0.19:
# the C++ threads pt_gloo_runloop x2 and gloo_tcp_loop then still ran at interpreter exit, where a joinable thread
# torn down aborts with "terminate called without an active exception").


def _import_deepspeed() -> None:
    """Import deepspeed before the process group starts, for a run that uses it (see above); a run that does not
    never imports it (2-3 s of CPU per process), since :func:`unwrap_model` keeps accelerate from doing so.
    Its import logs "Setting accelerator to CPU" on a machine without a GPU, to stdout: log records up to WARNING
    are dropped while it imports (only then)."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.suppress(ImportError):  # not installed: accelerate's own DeepSpeed check then says so
            import deepspeed  # noqa: F401  (optional dependency, only for DeepSpeed runs: see the docstring)
    finally:
        logging.disable(logging.NOTSET)


__all__ = ["build_accelerator", "unwrap_model", "resolve_device", "process_device", "check_gpu_count", "check_ddp",
           "collective_timeout", "COMPILE_TIMEOUT_S", "apply_fast_path", "build_model", "compile_model",
           "steps_per_epoch", "total_steps", "model_flops", "zoo_layers", "model_layers", "train_flops_per_image",
           "mfu_inputs"]


def _cache_accelerate_lomo_check() -> None:
    """AcceleratedOptimizer.step() asks importlib.metadata whether ``lomo_optim`` is installed, twice per step (a
    filesystem scan, ~0.3 ms: 4% of a LeNet-5 step on CPU). The answer cannot change during a run, so cache it."""
    fn = getattr(acc_opt, "is_lomo_available", None)
    if fn is not None and not hasattr(fn, "cache_info"):
        acc_opt.is_lomo_available = functools.cache(fn)


COMPILE_TIMEOUT_S = 1800
"""The collective timeout of a run with ``fast.compile`` on (unless ``dist.timeout_s`` is larger): ranks that finish
compiling minutes apart (8 GPUs, the first steps and again the first evaluation in eval mode) must not be taken for a
dead rank. A dead rank in a compiled run is therefore found after 30 minutes, not 2."""


def collective_timeout(cfg: Config) -> int:
    """Seconds a collective may wait: ``dist.timeout_s``, raised to :data:`COMPILE_TIMEOUT_S` under ``fast.compile``."""
    return max(cfg.dist.timeout_s, COMPILE_TIMEOUT_S) if cfg.fast.compile else cfg.dist.timeout_s


def check_ddp(cfg: Config) -> None:
    """Refuse DDP settings that crash inside PyTorch: ``static_graph`` with accumulation (or ``compute_only``) fails
    on the first micro-step under no_sync (DDP's static graph expects every backward to all-reduce)."""
    if cfg.dist.static_graph and cfg.train.grad_accum > 1:
        raise UserError(f"dist.static_graph true cannot be combined with train.grad_accum {cfg.train.grad_accum}: "
                        "DDP's static graph crashes on the first no_sync micro-step; use --grad-accum 1 or "
                        "--dist.static_graph false")
    if cfg.dist.static_graph and cfg.dist.compute_only:
        raise UserError("dist.static_graph true cannot be combined with dist.compute_only true (every step runs "
                        "under no_sync, which a static graph does not allow); drop one of them")


def _unusable_gpus(listed: list[str], asked: str) -> UserError:
    names = sorted({re.sub(r"^GPU \d+:\s*|\s*\(UUID:.*$", "", ln) for ln in listed})
    driver, driver_cuda = gpus.driver_versions()
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    want = f"CUDA {driver_cuda} or older" if driver_cuda else "the driver's CUDA version"
    seen = (f"nvidia-smi lists {len(listed)} GPU(s) ({', '.join(names)}; driver {driver or '?'}, supports CUDA "
            f"{driver_cuda or '?'})" if listed else "nvidia-smi lists no GPU")
    head = "train.device cuda, but" if asked == "cuda" else "GPUs present but unusable:"
    return UserError(f"{head} {seen} and torch {torch.__version__} ({build}) cannot use them; install a torch "
                     f"wheel built for {want} (the index URL per CUDA version: https://pytorch.org/get-started/locally/"
                     "), or pass --device cpu to train on the CPU")


def resolve_device(asked: str) -> str:
    """``cpu`` or ``cuda`` for ``train.device`` (auto, cpu or cuda). auto is cuda when torch can use a GPU and cpu
    when the node has none, but a node whose nvidia-smi lists GPUs that torch cannot use (a wheel built for a newer
    driver, a CPU-only wheel) is a one-line UserError, never a silent CPU run. Costs one nvidia-smi call (~0.1 s)
    only where torch sees no GPU."""
    if asked == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    listed = gpus.visible_gpus()
    if listed or asked == "cuda":
        raise _unusable_gpus(listed, asked)
    return "cpu"


def check_gpu_count(local_processes: int, visible: int) -> None:
    """More processes on a node than GPUs it shows this process is a one-line UserError (NCCL would fail later,
    inside its first collective, with "Duplicate GPU detected")."""
    if local_processes > visible:
        where = os.environ.get("CUDA_VISIBLE_DEVICES")
        vis = f" (CUDA_VISIBLE_DEVICES={where})" if where is not None else ""
        raise UserError(f"{local_processes} processes on this node but {visible} visible GPU(s){vis}: one process "
                        f"per GPU; launch at most {visible} per node (--num_processes), or pass --device cpu")


def process_device(cfg: Config) -> torch.device:
    """The device :func:`build_accelerator`'s Accelerator gives this process (``cuda:LOCAL_RANK`` or ``cpu``), known
    before it exists: for work done before ``run`` (prune's first evaluation), so rank N does not sit on GPU 0."""
    if resolve_device(cfg.train.device) == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def build_accelerator(cfg: Config) -> Accelerator:
    """Accelerator on ``train.device`` (auto: CUDA when torch can use it, CPU with gloo on a node without GPUs,
    whatever the launcher or config file says; see :func:`resolve_device`); the DeepSpeed JSON's "auto" values
    filled from ``cfg``. Refuses bad combinations before anything starts; then starts the process group under a
    launcher (collective). Batches are copied to the GPU with ``non_blocking=True`` (pinned memory, no stream
    synchronise per step: the host keeps queueing work while the copy runs)."""
    _cache_accelerate_lomo_check()
    check_ddp(cfg)
    if ds_config.use_deepspeed():
        _import_deepspeed()
    cpu = resolve_device(cfg.train.device) == "cpu"
    if cpu and torch.cuda.is_available() and ds_config.use_deepspeed():
        raise UserError("train.device cpu with DeepSpeed on a node with usable GPUs is not supported (DeepSpeed "
                        "picks the GPU itself); use a DDP launch config for a CPU run")
    if not cpu:
        check_gpu_count(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # gloo must be named on CPU for DeepSpeed's sake; naming it without a launcher would start a process group.
    handlers: list[Any] = [InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout(cfg)),
                                                  backend="gloo" if cpu and launched else None)]
    ddp: dict[str, Any] = {"bucket_cap_mb": cfg.dist.bucket_mb, "static_graph": cfg.dist.static_graph}
    if cfg.dist.comm_hook != "none":
        ddp["comm_hook"] = {"fp16": DDPCommunicationHookType.FP16, "bf16": DDPCommunicationHookType.BF16}[
            cfg.dist.comm_hook]
    handlers.append(DistributedDataParallelKwargs(**ddp))
    # Under DeepSpeed these two fill the JSON's "auto" values; cpu=True would silently drop DeepSpeed for plain DDP.
    acc = Accelerator(cpu=cpu and not ds_config.use_deepspeed(), kwargs_handlers=handlers,
                      mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
                      log_with=trackers.log_with(cfg.train), project_config=trackers.project_config(cfg.train))
    acc.ddp_handler = timed_ddp_handler(acc.ddp_handler, cfg.profile.enabled)  # DDP's comm hook timed when profiling
    ds_config.configure_deepspeed(acc, cfg)
    return acc


def unwrap_model(acc: Accelerator, model: nn.Module) -> nn.Module:
    """The model without its DDP (or DeepSpeed) wrapper, torch.compile's wrapper kept: ``acc.unwrap_model``'s result,
    except that a run without DeepSpeed does not import deepspeed for it (accelerate imports it there whenever it
    is installed, after the process group has started)."""
    if ds_config.use_deepspeed():
        return acc.unwrap_model(model)
    compiled = model if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else None
    inner = compiled._orig_mod if compiled is not None else model
    while isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner = inner.module
    if compiled is None:
        return inner
    compiled._orig_mod = inner  # what accelerate's unwrap_model does to a compiled DDP model
    return compiled


def apply_fast_path(fast: FastConfig | Config, device: torch.device) -> dict[str, Any]:
    """Set cudnn.benchmark and TF32 for a CUDA device (process-wide flags); return what was asked and applied, for
    env.json. A whole :class:`Config` is accepted and its ``fast`` section used."""
    fast = fast.fast if isinstance(fast, Config) else fast
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = fast.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = fast.tf32
        torch.backends.cudnn.allow_tf32 = fast.tf32
    # cudnn.benchmark and TF32 are GPU switches: recorded as not applied (None) on CPU
    applied = {"channels_last": fast.channels_last, "compile": fast.compile,
               "cudnn_benchmark": torch.backends.cudnn.benchmark if cuda else None,
               "tf32": torch.backends.cuda.matmul.allow_tf32 if cuda else None}
    return {"fast_path": dataclasses.asdict(fast), "fast_path_applied": applied}


def build_model(mcfg: ModelConfig, fast: FastConfig, model: nn.Module | None = None) -> nn.Module:
    """A fresh model from the registry (its init consumes the torch RNG), or ``model`` when given (a pruned model
    keeps its masks), in channels_last when the fast path asks for it. Not prepared, not compiled."""
    if model is None:
        model = create_model(mcfg.name, num_classes=mcfg.num_classes, width_mult=mcfg.width_mult)
    return model.to(memory_format=torch.channels_last) if fast.channels_last else model


def compile_model(model: nn.Module, fast: FastConfig) -> nn.Module:
    """``torch.compile`` the prepared model when ``fast.compile`` (the first steps then pay the compilation)."""
    return torch.compile(model, mode=fast.compile_mode) if fast.compile else model


def steps_per_epoch(n_batches: int, grad_accum: int) -> int:
    """Optimiser steps in an epoch of ``n_batches`` micro-batches (a last partial accumulation counts as one)."""
    return max(math.ceil(n_batches / grad_accum), 1)


def total_steps(tcfg: TrainConfig, per_epoch: int) -> int:
    """The run's optimiser steps: ``epochs`` x steps per epoch or ``max_steps``, whichever is set and smaller."""
    by_epochs = tcfg.epochs * per_epoch if tcfg.epochs else None
    return min(x for x in (by_epochs, tcfg.max_steps or None) if x is not None)


@functools.lru_cache(maxsize=32)
def _count(name: str, num_classes: int, width_mult: float | None, shape: tuple[int, ...]) -> tuple[float, float]:
    def count() -> dict[str, float]:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # model init must not consume the training RNG
            model = create_model(name, num_classes=num_classes, width_mult=width_mult)
        counts = count_flops(model, input_shape=shape, backward=True)
        return {"fwd": counts["flops"], "train": counts["fwd_bwd_flops"]}

    key = count_key("flops", name, num_classes, width_mult, shape, get_model_builder(name))
    counts = cached_counts(key, count, names=("fwd", "train"))
    return counts["fwd"], counts["train"]


def model_flops(mcfg: ModelConfig, image_shape: tuple[int, int, int] = (3, 32, 32)) -> dict[str, float]:
    """``fwd_flops_per_img`` and ``train_flops_per_img`` (forward+backward), counted by FlopCounterMode on a meta
    copy of the model (no memory, no compute; about 0.1-1.4 s of CPU for the zoo's models), once per host and model
    config: cached in the process and under the cache directory (:mod:`cnnscale.profile.countcache`)."""
    fwd, train = _count(mcfg.name, mcfg.num_classes, mcfg.width_mult, (1, *image_shape))
    return {"fwd_flops_per_img": fwd, "train_flops_per_img": train}


def train_flops_per_image(name: str, num_classes: int = 10, width_mult: float | None = None) -> float:
    """Forward+backward FLOPs of one 32x32 training image of model ``name`` (cached)."""
    return model_flops(ModelConfig(name=name, num_classes=num_classes, width_mult=width_mult))["train_flops_per_img"]


@functools.lru_cache(maxsize=32)
def zoo_layers(name: str, num_classes: int | None = 10, width_mult: float | None = None
               ) -> tuple[tuple[float, float], ...]:
    """:func:`cnnscale.profile.layers.layer_table` of registered model ``name`` on CIFAR's 32x32 input, as
    ``((params, cost), ...)``, counted on a meta copy once per host and model config (cached like the FLOPs)."""

    def count() -> dict[str, float]:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # model init must not consume the training RNG
            model = create_model(name, num_classes=num_classes, width_mult=width_mult)
        return {f"{kind}{i:04d}": float(v) for i, row in enumerate(layer_table(model)) for kind, v in zip("pc", row)}

    key = count_key("layers", name, num_classes, width_mult, (1, 3, 32, 32), get_model_builder(name))
    counts = cached_counts(key, count)
    return tuple((counts[f"p{i:04d}"], counts[f"c{i:04d}"]) for i in range(len(counts) // 2))


def model_layers(mcfg: ModelConfig) -> list[list[float]] | None:
    """env.json's ``layers``: (parameters, cost) per layer in forward order (:func:`zoo_layers`), the scaling
    model's term (g); None for a model the meta device cannot run (the report then times the buckets by their
    bytes)."""
    try:
        return [list(row) for row in zoo_layers(mcfg.name, mcfg.num_classes, mcfg.width_mult)]
    except Exception:  # an exotic model the meta forward cannot run: term (g) is off for its runs, training goes on
        return None


def mfu_inputs(cfg: Config) -> tuple[MfuInputs, dict[str, float | None]]:
    """What the profiler's MFU needs, and the FLOP counts for env.json; a counting failure is recorded
    (``flops_error``), not raised: MFU is then n/a and training goes on."""
    try:
        flops: dict[str, float | None] = dict(model_flops(cfg.model))
        error = None
    except Exception as exc:  # an exotic model the counter cannot trace
        flops, error = {"fwd_flops_per_img": None, "train_flops_per_img": None}, f"{type(exc).__name__}: {exc}"
    inputs = MfuInputs(flops["train_flops_per_img"], cfg.train.mixed_precision, cfg.fast.tf32, error)
    return inputs, flops
