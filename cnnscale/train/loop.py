"""Training on Accelerate: one plain loop that runs on one CPU, on 8 GPUs and across nodes.

``build()`` makes the accelerator, data, model and optimiser; ``train_step()`` is one micro-step; ``evaluate()``
gathers predictions with ``gather_for_metrics``; ``run(cfg)`` ties them together and writes the run directory.

The LR scheduler is *not* passed through ``accelerator.prepare`` (its wrapper steps it once per process); it is
stepped here once per optimiser step, so the schedule depends only on the optimiser-step count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnscale.config import Config, config_to_dict, global_batch, load_config
from cnnscale.errors import UserError, write_error
from cnnscale.profile.timer import build_profiler
from cnnscale.records import io as records
from cnnscale.scaling import memory as zero_memory
from cnnscale.train import checkpoint, preempt
from cnnscale.train import deepspeed as ds_config
from cnnscale.train.progress import make_progress
from cnnscale.train.schedule import build_optimizer, build_scheduler

__all__ = ["Task", "ClassificationTask", "Trainer", "build_accelerator", "apply_fast_path", "run", "main", "train_step",
           "evaluate", "prepare_inputs"]


class ClassificationTask:
    """Cross-entropy (with optional label smoothing) on the model's logits."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def prepare(self, accelerator: Any) -> None:
        """Hook for tasks that hold extra modules (a distillation teacher)."""

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(model(images), labels)


Task = ClassificationTask


def _cache_accelerate_lomo_check() -> None:
    """AcceleratedOptimizer.step() asks importlib.metadata whether ``lomo_optim`` is installed, twice per step (a
    filesystem scan, ~0.3 ms: 4% of a LeNet-5 step on CPU). The answer cannot change during a run, so cache it."""
    import accelerate.optimizer as acc_opt

    fn = getattr(acc_opt, "is_lomo_available", None)
    if fn is not None and not hasattr(fn, "cache_info"):
        acc_opt.is_lomo_available = functools.cache(fn)


def build_accelerator(cfg: Config) -> Any:
    """Accelerator on CPU (gloo) when there is no GPU, whatever the launcher or config file says."""
    from accelerate import Accelerator, DataLoaderConfiguration

    _cache_accelerate_lomo_check()
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cpu = not torch.cuda.is_available()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # gloo must be named on CPU for DeepSpeed's sake; naming it without a launcher would start a process group.
    handlers: list[Any] = [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist.timeout_s),
                                                  backend="gloo" if cpu and launched else None)]
    ddp = {"bucket_cap_mb": cfg.dist.bucket_mb, "static_graph": cfg.dist.static_graph}
    if cfg.dist.comm_hook != "none":
        from accelerate.utils import DDPCommunicationHookType

        ddp["comm_hook"] = {"fp16": DDPCommunicationHookType.FP16, "bf16": DDPCommunicationHookType.BF16}[
            cfg.dist.comm_hook]
    handlers.append(DistributedDataParallelKwargs(**ddp))
    # Under DeepSpeed these two fill the JSON's "auto" values; cpu=True would silently drop DeepSpeed for plain DDP.
    acc = Accelerator(cpu=cpu and not ds_config.use_deepspeed(), kwargs_handlers=handlers,
                      mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    ds_config.configure_deepspeed(acc, cfg)
    return acc


def apply_fast_path(cfg: Config, device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.fast.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = cfg.fast.tf32
        torch.backends.cudnn.allow_tf32 = cfg.fast.tf32
    cuda = device.type == "cuda"  # cudnn.benchmark and TF32 are GPU switches: recorded as not applied (None) on CPU
    applied = {"channels_last": cfg.fast.channels_last, "compile": cfg.fast.compile,
               "cudnn_benchmark": torch.backends.cudnn.benchmark if cuda else None,
               "tf32": torch.backends.cuda.matmul.allow_tf32 if cuda else None}
    return {"fast_path": dataclasses.asdict(cfg.fast), "fast_path_applied": applied, "loader": cfg.data.loader}


def prepare_inputs(images: torch.Tensor, channels_last: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """channels_last when the fast path asks for it; the model's dtype when DeepSpeed runs the whole model in bf16/fp16
    (autocast is off under DeepSpeed, so float32 inputs would meet bf16 weights)."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images if dtype is None else images.to(dtype)


def train_step(accelerator: Any, model: nn.Module, task: ClassificationTask, optimizer: Any, images: torch.Tensor,
               labels: torch.Tensor, clip_grad: float, prof: Any) -> torch.Tensor:
    """One micro-step under ``accelerator.accumulate``. Returns the detached loss; no ``.item()`` here."""
    with accelerator.accumulate(model):
        with prof.phase("fwd_bwd"):
            with accelerator.autocast():
                loss = task.loss(model, images, labels)
            accelerator.backward(loss)
        with prof.phase("optim"):
            if clip_grad and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(accelerator: Any, model: nn.Module, loader: Any, channels_last: bool = False) -> dict[str, float]:
    """Mean loss and accuracy over the whole set, all ranks gathered (padding duplicates dropped)."""
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


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


def _resolve_out(cfg: Config, accelerator: Any) -> Path:
    from accelerate.utils import broadcast_object_list

    out = cfg.train.resume if cfg.train.resume else cfg.train.out
    if not out:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = f"runs/{cfg.model.name}-ws{accelerator.num_processes}-{stamp}"
    holder = [out]
    broadcast_object_list(holder)
    return Path(holder[0])


def _check_writable(path: Path) -> None:
    """Fail before anything is written. Root passes every permission bit, but ``os.access`` still reports a read-only
    mount or an immutable directory to root; a regular file in the way is checked by name."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"output directory {path} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output directory is not writable: {existing}")


class Trainer:
    """Holds the prepared objects of one run. ``fit()`` trains and returns the summary dict."""

    def __init__(self, cfg: Config, task: ClassificationTask | None = None, model: nn.Module | None = None) -> None:
        """``model``: train this module instead of a fresh ``create_model`` (a pruned model keeps its masks)."""
        from cnnscale.data import loaders as data
        from cnnscale.models import create_model

        self.cfg = cfg
        self.t_start = time.time()
        self.acc = acc = build_accelerator(cfg)
        torch.manual_seed(cfg.train.seed)
        self.world = acc.num_processes
        self.task = task or ClassificationTask(cfg.train.label_smoothing)
        self.train_dl, self.val_dl, self.test_dl, num_classes = data.build(cfg, acc)
        if num_classes != cfg.model.num_classes:
            cfg = self.cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))
        self.run_dir = _resolve_out(cfg, acc)
        if acc.is_main_process:
            _check_writable(self.run_dir)
        if model is None:
            model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, width_mult=cfg.model.width_mult)
        self.n_params = sum(p.numel() for p in model.parameters())
        if cfg.fast.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.fast_env = apply_fast_path(cfg, acc.device)
        optimizer = build_optimizer(cfg.optim, model)
        self.param_counts = zero_memory.param_counts(model)  # before prepare: ZeRO-3 partitions params in place
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if cfg.fast.compile:
            self.model = torch.compile(self.model, mode=cfg.fast.compile_mode)
        self.task.prepare(acc)
        self.steps_per_epoch = max(math.ceil(len(self.train_dl) / cfg.train.grad_accum), 1)
        self.total_steps = self._total_steps()
        # The client optimizer: DeepSpeed's ZeRO optimizer is no torch Optimizer but steps these same param_groups.
        self.scheduler = build_scheduler(cfg.sched, optimizer, self.steps_per_epoch, self.total_steps)
        self.in_dtype = ds_config.input_dtype(acc)
        # DeepSpeed clips inside engine.step (the JSON's gradient_clipping, filled from train.clip_grad).
        self.clip_grad = 0.0 if ds_config.use_deepspeed() else cfg.train.clip_grad
        acc.register_for_checkpointing(self.scheduler)
        self.state = _State()
        self.prof = build_profiler(cfg.profile.enabled, acc.device, self.world, accelerator=acc, model=self.model,
                                   total_steps=self.total_steps,
                                   cfg=cfg, run_dir=self.run_dir)

    def no_sync(self) -> Any:
        """DDP's no_sync for ``dist.compute_only`` calibration runs, else a no-op context."""
        if self.cfg.dist.compute_only and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _total_steps(self) -> int:
        t = self.cfg.train
        by_epochs = t.epochs * self.steps_per_epoch if t.epochs else None
        return min(x for x in (by_epochs, t.max_steps or None) if x is not None)

    # --------------------------------------------------------------------------------------------- records
    def _write_start(self) -> None:
        from accelerate.utils import gather_object

        hosts = gather_object([socket.gethostname()])
        if not self.acc.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        records.write_yaml(self.run_dir / records.CONFIG, config_to_dict(self.cfg))
        extra = {**self.fast_env, "global_batch": global_batch(self.cfg, self.world),
                 **ds_config.deepspeed_env(self.acc), **self.prof_env()}
        extra.update(zero_memory.memory_env(self.param_counts, extra["zero_stage"], self.world, self.cfg.optim,
                                            extra.get("mixed_precision", self.cfg.train.mixed_precision)))
        from cnnscale.records.env import collect_env

        records.write_json(self.run_dir / records.ENV, collect_env(self.acc, hosts, extra))
        summary = {"status": "running", "model": self.cfg.model.name, "world_size": self.world}
        records.write_json(self.run_dir / records.SUMMARY, summary)  # a resumed run is running again
        if self.cfg.train.resume:  # steps past the checkpoint are logged again from here
            records.truncate_metrics(self.run_dir / records.METRICS, self.state.step)
        self.metrics = records.MetricsLog(self.run_dir / records.METRICS)

    def prof_env(self) -> dict[str, Any]:
        return getattr(self.prof, "env", lambda: {})()

    def _log(self, record: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            self.metrics.log(record)

    # --------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train. SIGUSR1/SIGTERM/SIGINT stop it at the next optimiser step with a checkpoint (see preempt)."""
        with preempt.SignalGuard(self.acc, every=self.cfg.dist.preempt_check_every) as self.signals:
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        cfg, acc, st = self.cfg, self.acc, self.state
        if cfg.train.resume:
            saved = checkpoint.load_checkpoint(acc, cfg.train.resume)
            st.step, st.epoch, st.batches_in_epoch = saved["step"], saved["epoch"], saved["batches_in_epoch"]
        self._write_start()
        progress = make_progress(cfg.train.progress, self.total_steps, acc.is_main_process, start=st.step)
        loss_sum = torch.zeros((), device=acc.device)
        loss_n = 0
        last_eval: dict[str, float] = {}
        last_eval_step, last_loss = -1, None
        self.prof.start()
        t_log = time.perf_counter()
        done = st.step >= self.total_steps
        while not done:
            self.train_dl.set_epoch(st.epoch)
            loader = self.train_dl
            if st.batches_in_epoch:
                loader = _skip_batches(self.train_dl, st.batches_in_epoch)
            for images, labels in self.prof.iter_data(loader):
                images = prepare_inputs(images, cfg.fast.channels_last, self.in_dtype)
                with self.no_sync():
                    loss_sum += train_step(acc, self.model, self.task, self.optimizer, images, labels,
                                           self.clip_grad, self.prof)
                loss_n += 1
                st.batches_in_epoch += 1
                if not acc.sync_gradients:
                    continue
                st.step += 1
                if cfg.sched.name != "plateau":
                    self.scheduler.step()
                self.prof.step(images.shape[0] * self.world * cfg.train.grad_accum)
                progress.advance()
                if st.step % cfg.train.log_every == 0 or st.step == self.total_steps:
                    loss = acc.reduce(loss_sum / max(loss_n, 1), "mean").item()  # note: sync point, log steps only
                    now = time.perf_counter()
                    rec = {"step": st.step, "epoch": st.epoch, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                           "time_s": time.time() - self.t_start, "interval_s": now - t_log, **self.prof.log_metrics()}
                    t_log = now
                    self._log(rec)
                    progress.log(rec)
                    loss_sum.zero_()
                    loss_n = 0
                    last_loss = loss
                if cfg.train.ckpt_every and st.step % cfg.train.ckpt_every == 0 and st.step < self.total_steps:
                    self._save()
                if st.step < self.total_steps and self.signals.requested(st.step):  # all ranks vote, same answer
                    progress.close()
                    return preempt.stop_run(self, self.signals)
                if st.step >= self.total_steps:
                    done = True
                    break
            if not done or st.batches_in_epoch >= len(self.train_dl):
                st.epoch, st.batches_in_epoch = st.epoch + 1, 0
                if cfg.train.eval_every_epoch and self.val_dl is not None:
                    last_eval, last_eval_step = self._end_epoch(), st.step
        self.prof.stop()
        progress.close()
        self._save()
        final: dict[str, Any] = {"final_loss": last_loss}
        if cfg.train.final_eval:
            test = self._eval("test")
            final.update({"test_loss": test["loss"], "test_acc": test["acc"]})
        if self.val_dl is not None and (cfg.train.final_eval or last_eval_step == st.step):
            val = last_eval if last_eval_step == st.step else self._eval("val")
            final.update({"val_loss": val["loss"], "val_acc": val["acc"]})
        return self._finish(final)

    def _eval(self, which: str) -> dict[str, float]:
        dl = self.val_dl if which == "val" else self.test_dl
        return evaluate(self.acc, self.model, dl, self.cfg.fast.channels_last)

    def _end_epoch(self) -> dict[str, float]:
        val = self._eval("val")
        if self.cfg.sched.name == "plateau":
            self.scheduler.step(val["loss"])
        self._log({"step": self.state.step, "epoch": self.state.epoch, "val_loss": val["loss"], "val_acc": val["acc"],
                   "time_s": time.time() - self.t_start})
        return val

    def _save(self) -> None:
        st = self.state
        checkpoint.save_checkpoint(self.acc, self.run_dir, dataclasses.asdict(st), keep=self.cfg.train.keep_ckpts)

    def _finish(self, final: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        summary = {
            "status": "ok", "model": cfg.model.name, "world_size": self.world, "params": self.n_params,
            "micro_batch": cfg.train.micro_batch, "grad_accum": cfg.train.grad_accum,
            "global_batch": global_batch(cfg, self.world), "mixed_precision": cfg.train.mixed_precision,
            "steps": self.state.step, "epochs_done": self.state.epoch, "wall_s": time.time() - self.t_start,
            "loader": cfg.data.loader, "data": cfg.data.name, **final, **self.prof.summary(),
        }
        if self.acc.is_main_process:
            records.write_json(self.run_dir / records.SUMMARY, summary)
            self.metrics.close()
        self.acc.wait_for_everyone()
        return summary


def _skip_batches(loader: Any, n: int) -> Any:
    """The rest of the epoch after ``n`` batches: the device loader's own ``skip``, or Accelerate's for a DataLoader."""
    if hasattr(loader, "skip"):
        return loader.skip(n)
    from accelerate import skip_first_batches

    return skip_first_batches(loader, n)


def run(cfg: Config, task: ClassificationTask | None = None) -> dict[str, Any]:
    """Train one run described by ``cfg``; returns the summary (also written to ``summary.json``)."""
    preempt.watch_parent()
    trainer = Trainer(cfg, task)
    try:
        return trainer.fit()
    except OSError as exc:  # disk full / read-only while writing records: one line (the checkpoint says its own)
        outside = exc.filename and not Path(os.path.abspath(exc.filename)).is_relative_to(trainer.run_dir.absolute())
        user = None if outside else write_error(exc, trainer.run_dir, "the run directory")
        if user is None:
            raise
        raise user from exc
    finally:
        trainer.acc.end_training()


def main(argv: list[str] | None = None) -> int:
    """``cnnscale train`` / ``launch/train.py``: ``--model NAME [--config FILE] [--section.field value ...]``."""
    argv = list(argv or [])
    if "-h" in argv or "--help" in argv:
        from cnnscale.config import SHORT_FLAGS

        print("usage: cnnscale train [--config FILE.yaml] [--model NAME] [--section.field VALUE ...]\n\nflags: "
              + ", ".join(SHORT_FLAGS) + "\nany config field: --section.field value (see cnnscale/config.py)")
        return 0
    summary = run(load_config(argv))
    return preempt.exit_code(summary)
