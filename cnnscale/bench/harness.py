"""One model under ``cnnscale bench``: the cnnscale side (the real training step, scheduler and profiler on a
prepared model) and the bare PyTorch side (forward, backward, ``opt.step()``), and the per-model table row.

Both sides train the same model object with the same torch optimizer: a deep copy for the bare side made the ratio
depend on where each copy's tensors landed in memory (the same bare loop ran 2% slower on the prepared model than on
its copy, LeNet-5, one thread, 30 alternated rounds), which is no cost of cnnscale's.

Timing: the device is synchronised before each clock read (CUDA); warm-up steps are never timed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from cnnscale.bench.options import bench_config
from cnnscale.config import Config
from cnnscale.data.device import build_device_loaders
from cnnscale.profile.profiler import NullProfiler, build_profiler
from cnnscale.train.build import apply_fast_path, build_model, compile_model, mfu_inputs
from cnnscale.train.schedule import build_optimizer, build_scheduler
from cnnscale.train.step import ClassificationTask, prepare_inputs, train_step

__all__ = ["BenchSetup", "clock", "timed", "bench_model"]


class BenchSetup:
    """A prepared model, optimiser and scheduler; the bare loop trains the same model with the same torch optimizer."""

    def __init__(self, cfg: Config, acc: Any) -> None:
        apply_fast_path(cfg.fast, acc.device)  # cudnn.benchmark and TF32 as in training (no-ops on CPU)
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.fast)
        self.cfg, self.acc, self.task = cfg, acc, ClassificationTask()
        self.model, self.opt = acc.prepare(model, build_optimizer(cfg.optim, model))
        self.model = compile_model(self.model, cfg.fast)
        self.bare, self.bare_opt = self.model, self.opt.optimizer  # the torch optimizer inside Accelerate's wrapper
        self.sched = build_scheduler(cfg.sched, self.opt.optimizer, 1000, 1000)
        self.mfu = mfu_inputs(cfg)[0]  # FLOPs counted once on a meta copy of the model (cached per model config)

    def profiler(self) -> Any:
        """A fresh measuring profiler; its peak measurement happens here, before any clock starts."""
        prof = build_profiler(self.cfg.profile, self.acc.device, self.acc.num_processes, accelerator=self.acc,
                              model=self.model, mfu_inputs=self.mfu, channels_last=self.cfg.fast.channels_last)
        prof.env()
        return prof

    def train(self, batches: Iterable[Any], n: int, prof: Any) -> None:
        """``n`` optimiser steps of the cnnscale loop body (train_step, scheduler, profiler), cycling ``batches``."""
        acc, cl = self.acc, self.cfg.fast.channels_last
        loss_sum, done = torch.zeros((), device=acc.device), 0
        while done < n:
            for images, labels in prof.iter_data(batches):
                images = prepare_inputs(images, cl)
                loss_sum += train_step(acc, self.model, self.task, self.opt, images, labels, 0.0, prof)
                if not acc.sync_gradients:
                    continue
                self.sched.step()
                prof.step(images.shape[0] * acc.num_processes)
                done += 1
                if done >= n:
                    break
        loss_sum.item()  # note: sync point, once per chunk

    def bare_train(self, batches: list[Any], n: int) -> None:
        """The bare loop: forward, ``loss.backward(); opt.step()``, nothing else."""
        crit = torch.nn.CrossEntropyLoss()
        dev, precision = self.acc.device.type, self.cfg.train.mixed_precision
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        for i in range(n):
            x, y = batches[i % len(batches)]
            if self.cfg.fast.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev, dtype=dtype, enabled=precision != "no"):
                loss = crit(self.bare(x), y)
            loss.backward()
            self.bare_opt.step()
            self.bare_opt.zero_grad()


def clock(device: torch.device) -> float:
    """``perf_counter`` after the device has finished its queued work (note: a CUDA sync point)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(device: torch.device, fn: Callable[[], Any], images: int) -> float:
    """img/s of ``fn()``, which processes ``images`` images."""
    t = clock(device)
    fn()
    return images / max(clock(device) - t, 1e-9)


def bench_model(args: argparse.Namespace, acc: Any, name: str) -> tuple[dict[str, Any], BenchSetup]:
    """Warm-up, then ``args.steps`` profiled steps on synthetic data with the device loader: the table row."""
    cfg = bench_config(args, name)
    setup = BenchSetup(cfg, acc)
    train = build_device_loaders(cfg, acc)[0]
    if args.warmup:
        setup.train(train, args.warmup, NullProfiler())
    prof = setup.profiler()
    prof.start()
    setup.train(train, args.steps, prof)
    prof.stop()
    return {"model": name, **prof.summary()}, setup
