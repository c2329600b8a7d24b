"""``run(cfg)``: one training run on Accelerate, on one CPU, on 8 GPUs or across nodes; and ``cnnscale train``.

``run`` builds each part from its own config section (the accelerator and model in :mod:`.build`, the data in
:mod:`cnnscale.data.loaders`, the optimiser and schedule in :mod:`.schedule`, the profiler from ``cfg.profile``),
then runs the loop below, which owns a small :class:`_State`. The step and evaluation are :mod:`.step`; the record
files are :mod:`.rundir`. A stop signal is a decision (:meth:`preempt.SignalGuard.requested`) that the loop acts on.

The LR scheduler is *not* passed through ``accelerator.prepare`` (its wrapper steps it once per process); it is
stepped here once per optimiser step, so the schedule depends only on the optimiser-step count.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnscale.config import Config, global_batch
from cnnscale.data import loaders
from cnnscale.errors import UserError, write_error
from cnnscale.profile.profiler import NullProfiler, build_profiler
from cnnscale.scaling import memory as zero_memory
from cnnscale.train import checkpoint, preempt, trackers
from cnnscale.train import deepspeed as ds_config
from cnnscale.train.build import (
    apply_fast_path,
    build_accelerator,
    build_model,
    compile_model,
    mfu_inputs,
    steps_per_epoch,
    total_steps,
)
from cnnscale.train.preempt import exit_code
from cnnscale.train.progress import NullProgress, make_progress
from cnnscale.train.rundir import RunFiles, check_writable, resolve_out
from cnnscale.train.schedule import build_optimizer, build_scheduler
from cnnscale.train.step import (
    ClassificationTask,
    Task,
    evaluate,
    prepare_inputs,
    skip_batches,
    sync_context,
    train_step,
)

__all__ = ["RunResult", "run", "exit_code"]


@dataclass(frozen=True)
class RunResult:
    """What a finished (or preempted) run hands back to its caller (distill, prune, the CLI)."""

    summary: dict[str, Any]
    """The summary, also written to ``summary.json`` (status ``ok`` or ``preempted``)."""
    run_dir: Path
    """The run directory."""
    model: nn.Module
    """The trained model, unwrapped from DDP/DeepSpeed; torch.compile's wrapper is kept (``unwrap_model``'s default)."""
    is_main: bool
    """True on the main process, the one that writes records."""


@dataclass
class _Parts:
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
    in_dtype: torch.dtype | None
    clip_grad: float
    n_params: int
    t_start: float
    env_extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _State:
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

    def position(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}


def _build(cfg: Config, acc: Any, task: Task | None, model: nn.Module | None, t_start: float) -> _Parts:
    """Every part from its own section; the order keeps the RNG stream of the original trainer (seed, data, model)."""
    torch.manual_seed(cfg.train.seed)
    task = task or ClassificationTask(cfg.train.label_smoothing)
    data = loaders.build(cfg, acc)  # the data decides num_classes; data.env: unreadable files it left out
    train_dl, val_dl, test_dl, num_classes = data
    if num_classes != cfg.model.num_classes:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))
    run_dir = resolve_out(cfg, acc.num_processes)
    if acc.is_main_process:
        check_writable(run_dir)
    model = build_model(cfg.model, cfg.fast, model)
    n_params = sum(p.numel() for p in model.parameters())
    fast_env = apply_fast_path(cfg.fast, acc.device)
    optimizer = build_optimizer(cfg.optim, model)
    param_counts = zero_memory.param_counts(model)  # before prepare: ZeRO-3 partitions params in place
    prepared, prepared_opt = acc.prepare(model, optimizer)
    prepared = compile_model(prepared, cfg.fast)
    task.prepare(acc)
    per_epoch = steps_per_epoch(len(train_dl), cfg.train.grad_accum)
    total = total_steps(cfg.train, per_epoch)
    # The client optimizer: DeepSpeed's ZeRO optimizer is no torch Optimizer but steps these same param_groups.
    scheduler = build_scheduler(cfg.sched, optimizer, per_epoch, total)
    acc.register_for_checkpointing(scheduler)
    mfu_in, flops = mfu_inputs(cfg)
    prof = build_profiler(cfg.profile, acc.device, acc.num_processes, accelerator=acc, model=prepared,
                          run_dir=run_dir, total_steps=total, mfu_inputs=mfu_in, channels_last=cfg.fast.channels_last,
                          task=task)
    # DeepSpeed clips inside engine.step (the JSON's gradient_clipping, filled from train.clip_grad).
    clip = 0.0 if ds_config.use_deepspeed() else cfg.train.clip_grad
    parts = _Parts(cfg, acc, task, prepared, prepared_opt, scheduler, train_dl, val_dl, test_dl, prof,
                   RunFiles(run_dir, acc), total, ds_config.input_dtype(acc), clip, n_params, t_start)
    parts.env_extra = _env_extra(parts, {**fast_env, "model": cfg.model.name, "params": n_params, **flops, **data.env},
                                 param_counts)
    return parts


def _env_extra(p: _Parts, extra: dict[str, Any], param_counts: Any) -> dict[str, Any]:
    """env.json's run-specific fields: fast path, batch, DeepSpeed, profiler set-up, ZeRO memory model, FLOPs."""
    cfg, world = p.cfg, p.acc.num_processes
    extra = {**extra, "loader": cfg.data.loader, "global_batch": global_batch(cfg, world),
             **ds_config.deepspeed_env(p.acc), **p.prof.env()}
    extra.update(zero_memory.memory_env(param_counts, extra["zero_stage"], world, cfg.optim,
                                        extra.get("mixed_precision", cfg.train.mixed_precision)))
    return extra


def _fit(p: _Parts, guard: preempt.SignalGuard) -> dict[str, Any]:
    """Resume if asked, train to the end or to a stop signal, then checkpoint, evaluate and write the summary."""
    cfg, acc = p.cfg, p.acc
    st = _State(loss_sum=torch.zeros((), device=acc.device))
    if cfg.train.resume:
        saved = checkpoint.load_checkpoint(acc, cfg.train.resume)
        st.step, st.epoch, st.batches_in_epoch = saved["step"], saved["epoch"], saved["batches_in_epoch"]
    p.files.start(cfg, p.env_extra, st.step if cfg.train.resume else None)
    progress = make_progress(cfg.train.progress, p.total_steps, acc.is_main_process, start=st.step)
    p.prof.start()
    st.t_log = time.perf_counter()
    stopped = _loop(p, st, guard, progress)
    p.prof.stop()
    progress.close()
    _save(p, st)  # collective: every rank saves its part, rank 0 publishes the directory atomically
    if stopped:
        return _finish_preempted(p, st, guard)
    return _finish(p, st, _final_eval(p, st))


def _loop(p: _Parts, st: _State, guard: preempt.SignalGuard, progress: NullProgress) -> bool:
    """Train from ``st`` to the last step; True when the ranks agreed to stop on a signal first."""
    cfg, acc = p.cfg, p.acc
    done = st.step >= p.total_steps
    while not done:
        p.train_dl.set_epoch(st.epoch)
        for images, labels in p.prof.iter_data(skip_batches(p.train_dl, st.batches_in_epoch)):
            images = prepare_inputs(images, cfg.fast.channels_last, p.in_dtype)
            with sync_context(p.model, cfg.dist.compute_only):
                st.loss_sum += train_step(acc, p.model, p.task, p.optimizer, images, labels, p.clip_grad, p.prof)
            st.loss_n += 1
            st.batches_in_epoch += 1
            if not acc.sync_gradients:
                continue
            st.step += 1
            _after_step(p, st, progress, images.shape[0])
            if st.step < p.total_steps and guard.requested(st.step):  # all ranks vote, same answer
                return True
            if st.step >= p.total_steps:
                done = True
                break
        if not done or st.batches_in_epoch >= len(p.train_dl):
            st.epoch, st.batches_in_epoch = st.epoch + 1, 0
            if cfg.train.eval_every_epoch and p.val_dl is not None:
                st.last_eval, st.last_eval_step = _end_epoch(p, st), st.step
    return False


def _after_step(p: _Parts, st: _State, progress: NullProgress, micro_batch: int) -> None:
    """After an optimiser step: the schedule, the profiler, the log line (log steps only), a periodic checkpoint."""
    cfg = p.cfg
    if cfg.sched.name != "plateau":
        p.scheduler.step()
    p.prof.step(micro_batch * p.acc.num_processes * cfg.train.grad_accum)
    progress.advance()
    if st.step % cfg.train.log_every == 0 or st.step == p.total_steps:
        loss = p.acc.reduce(st.loss_sum / max(st.loss_n, 1), "mean").item()  # note: sync point, log steps only
        now = time.perf_counter()
        rec = {"step": st.step, "epoch": st.epoch, "loss": loss, "lr": p.scheduler.get_last_lr()[0],
               "time_s": time.time() - p.t_start, "interval_s": now - st.t_log, **p.prof.log_metrics()}
        st.t_log, st.loss_n, st.last_loss = now, 0, loss
        st.loss_sum.zero_()
        p.files.log(rec)
        progress.log(rec)
    if cfg.train.ckpt_every and st.step % cfg.train.ckpt_every == 0 and st.step < p.total_steps:
        _save(p, st)


def _end_epoch(p: _Parts, st: _State) -> dict[str, float]:
    val = evaluate(p.acc, p.model, p.val_dl, p.cfg.fast.channels_last)
    if p.cfg.sched.name == "plateau":
        p.scheduler.step(val["loss"])
    p.files.log({"step": st.step, "epoch": st.epoch, "val_loss": val["loss"], "val_acc": val["acc"],
                 "time_s": time.time() - p.t_start})
    return val


def _final_eval(p: _Parts, st: _State) -> dict[str, Any]:
    """The last logged loss, the test set (``train.final_eval``) and the validation set (reused from the epoch's
    end when that was this very step)."""
    cfg, cl = p.cfg, p.cfg.fast.channels_last
    final: dict[str, Any] = {"final_loss": st.last_loss}
    if cfg.train.final_eval:
        test = evaluate(p.acc, p.model, p.test_dl, cl)
        final.update({"test_loss": test["loss"], "test_acc": test["acc"]})
    if p.val_dl is not None and (cfg.train.final_eval or st.last_eval_step == st.step):
        val = st.last_eval if st.last_eval_step == st.step else evaluate(p.acc, p.model, p.val_dl, cl)
        final.update({"val_loss": val["loss"], "val_acc": val["acc"]})
    return final


def _save(p: _Parts, st: _State) -> None:
    checkpoint.save_checkpoint(p.acc, p.files.run_dir, st.position(), keep=p.cfg.train.keep_ckpts)


def _finish(p: _Parts, st: _State, final: dict[str, Any]) -> dict[str, Any]:
    cfg, world = p.cfg, p.acc.num_processes
    summary = {
        "status": "ok", "model": cfg.model.name, "world_size": world, "params": p.n_params,
        "micro_batch": cfg.train.micro_batch, "grad_accum": cfg.train.grad_accum,
        "global_batch": global_batch(cfg, world), "mixed_precision": cfg.train.mixed_precision,
        "steps": st.step, "epochs_done": st.epoch, "wall_s": time.time() - p.t_start,
        "loader": cfg.data.loader, "data": cfg.data.name, **final, **p.prof.summary(),
    }
    p.files.finish(summary)
    p.acc.wait_for_everyone()
    return summary


def _finish_preempted(p: _Parts, st: _State, guard: preempt.SignalGuard) -> dict[str, Any]:
    run_dir = p.files.run_dir
    summary = preempt.preempted_summary(guard.name, model=p.cfg.model.name, world_size=p.acc.num_processes,
                                        steps=st.step, epochs_done=st.epoch, total_steps=p.total_steps,
                                        wall_s=time.time() - p.t_start, run_dir=run_dir)
    p.files.finish(summary)
    if p.files.is_main:
        print(preempt.stop_message(summary, run_dir), flush=True)
    p.acc.wait_for_everyone()  # the summary exists before any rank exits (srun --kill-on-bad-exit ends the rest)
    return summary


def _run_dir_error(exc: OSError, run_dir: Path) -> Exception | None:
    """Disk full / read-only while writing records: a one-line UserError; None for a file outside the run."""
    outside = exc.filename and not Path(os.path.abspath(exc.filename)).is_relative_to(run_dir.absolute())
    return None if outside else write_error(exc, run_dir, "the run directory")


def run(cfg: Config, task: Task | None = None, model: nn.Module | None = None) -> RunResult:
    """Train one run described by ``cfg``; the summary is also written to ``summary.json``.

    ``task``: the loss (default cross-entropy; distillation passes one holding its teacher). ``model``: train this
    module instead of a fresh one (a pruned model keeps its masks). SIGUSR1/SIGTERM/SIGINT stop the run at the next
    vote step with a checkpoint (status ``preempted``). The process group is destroyed before returning, on every
    rank and on every path, so no communication thread outlives the run."""
    preempt.watch_parent()
    t_start = time.time()
    trackers.check_installed(cfg.train.trackers)  # a missing tracker: one line, before the process group starts
    acc = build_accelerator(cfg)
    try:
        return _run(cfg, acc, task, model, t_start)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # drop the parts (DDP holds the process group) before _shutdown
        raise
    finally:
        _shutdown(acc)


def _run(cfg: Config, acc: Any, task: Task | None, model: nn.Module | None, t_start: float) -> RunResult:
    p = _build(cfg, acc, task, model, t_start)
    try:
        with preempt.SignalGuard(acc, every=p.cfg.dist.preempt_check_every) as guard:
            summary = _fit(p, guard)
    except OSError as exc:  # the checkpoint says its own
        user = _run_dir_error(exc, p.files.run_dir)
        if user is None:
            raise
        raise user from exc
    except UserError as exc:  # bad input met while training (an unreadable image): the run ends "failed", saying why
        if p.files.metrics is not None:
            p.files.finish({"status": "failed", "model": p.cfg.model.name, "world_size": acc.num_processes,
                            "error": " ".join(str(exc).split())})
        raise
    return RunResult(summary, p.files.run_dir, acc.unwrap_model(p.model), acc.is_main_process)


def _shutdown(acc: Any) -> None:
    """Release the prepared objects (the DDP wrapper holds the process group), then destroy the process group, so
    that its C++ communication threads are joined here and none is alive at interpreter exit (a joinable thread torn
    down at exit aborts with "terminate called without an active exception"). Costs one gc.collect()."""
    acc.free_memory()
    acc.end_training()  # trackers closed (main), destroy_process_group() (the preempt vote's group too), every rank
