"""``run(cfg)``: one training run on Accelerate, on one CPU, on 8 GPUs or across nodes; and ``cnnscale train``.

``run`` builds each part from its own config section (the accelerator and model in :mod:`.build`, the data in
:mod:`cnnscale.data.loaders`, the optimiser and schedule in :mod:`.schedule`, the profiler from ``cfg.profile``),
then runs the loop below, which owns a small :class:`~.parts.State`. The step and evaluation are :mod:`.step`; the
record files are :mod:`.rundir`; how a run ends (ok, preempted, diverged, failed) is :mod:`.finish`. A stop signal
is a decision (:meth:`preempt.SignalGuard.requested`) that the loop acts on.

The LR scheduler is *not* passed through ``accelerator.prepare`` (its wrapper steps it once per process); it is
stepped here once per optimiser step, so the schedule depends only on the optimiser-step count (on resume it is
rebuilt for the run's current length: :func:`cnnscale.train.schedule.resume_scheduler`).

Rank 0 holds the run directory for the whole run (:func:`.rundir.claim_run_dir`: one writer, no fresh run over an
old one, room reserved for the final status). A non-finite loss at a log step stops every rank at that step with
status ``diverged`` (:mod:`.diverge`); any error ends the summary ``failed`` with the reason.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnscale.config import Config, global_batch
from cnnscale.data import loaders
from cnnscale.profile.profiler import build_profiler
from cnnscale.records.io import SUMMARY, read_json
from cnnscale.scaling import memory as zero_memory
from cnnscale.train import checkpoint, diverge, finish, preempt, trackers
from cnnscale.train import deepspeed as ds_config
from cnnscale.train.build import (
    apply_fast_path,
    build_accelerator,
    build_model,
    compile_model,
    mfu_inputs,
    model_layers,
    steps_per_epoch,
    total_steps,
    unwrap_model,
)
from cnnscale.train.parts import Parts, RunResult, State
from cnnscale.train.preempt import exit_code
from cnnscale.train.progress import NullProgress, make_progress
from cnnscale.train.resume import check_resume
from cnnscale.train.rundir import HEARTBEAT_S, RunFiles, claim_run_dir, resolve_out
from cnnscale.train.schedule import build_optimizer, build_scheduler, resume_scheduler
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


def _build(cfg: Config, acc: Any, task: Task | None, model: nn.Module | None, t_start: float, run_dir: Path) -> Parts:
    """Every part from its own section; the order keeps the RNG stream of the original trainer (seed, data, model)."""
    torch.manual_seed(cfg.train.seed)
    task = task or ClassificationTask(cfg.train.label_smoothing)
    data = loaders.build(cfg, acc)  # the data decides num_classes; data.env: unreadable files it left out
    train_dl, val_dl, test_dl, num_classes = data
    if num_classes != cfg.model.num_classes:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))
    # data.loader auto -> the loader chosen; fast.channels_last unset -> on for CUDA (env.json records both)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, loader=data.loader),
                              fast=cfg.fast.resolved(acc.device.type == "cuda"))
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
    parts = Parts(cfg, acc, task, prepared, prepared_opt, scheduler, train_dl, val_dl, test_dl, prof,
                  RunFiles(run_dir, acc), total, per_epoch, optimizer, ds_config.input_dtype(acc), clip, n_params,
                  t_start)
    parts.env_extra = _env_extra(parts, {**fast_env, "model": cfg.model.name, "params": n_params, **flops,
                                          "layers": model_layers(cfg.model), **data.env},
                                 param_counts)
    return parts


def _env_extra(p: Parts, extra: dict[str, Any], param_counts: Any) -> dict[str, Any]:
    """env.json's run-specific fields: fast path, batch, DeepSpeed, profiler set-up, ZeRO memory model, FLOPs."""
    cfg, world = p.cfg, p.acc.num_processes
    extra = {**extra, "loader": cfg.data.loader, "global_batch": global_batch(cfg, world),
             **ds_config.deepspeed_env(p.acc), **p.prof.env()}
    extra.update(zero_memory.memory_env(param_counts, extra["zero_stage"], world, cfg.optim,
                                        extra.get("mixed_precision", cfg.train.mixed_precision)))
    return extra


def _resume(p: Parts, st: State) -> dict[str, Any] | None:
    """Load the checkpoint into every part and ``st``; rebuild the schedule for the run's current length. Returns
    the run's summary when it is already finished at this length (then nothing is written), else None."""
    cfg, acc, run_dir = p.cfg, p.acc, p.files.run_dir
    saved = checkpoint.load_checkpoint(acc, cfg.train.resume, cfg.model.name)
    st.step, st.epoch, st.batches_in_epoch = saved["step"], saved["epoch"], saved["batches_in_epoch"]
    resume_scheduler(p.scheduler, cfg.sched, p.raw_optimizer, p.per_epoch, p.total_steps, st.step)
    summary = read_json(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else {}
    if st.step >= p.total_steps and summary.get("status") == "ok":
        if acc.is_main_process:
            print(f"run {run_dir} is already finished (status ok, step {st.step} of {p.total_steps}): nothing to "
                  "do; extend it with --max-steps N or --epochs N", flush=True)
        return summary
    changed = check_resume(cfg)  # every rank (the same answer): the resolved config against the run's
    if acc.is_main_process:
        print(f"resuming {run_dir} at step {st.step} of {p.total_steps}"
              + (f" (changed: {', '.join(changed)})" if changed else ""), flush=True)
    return None


def _fit(p: Parts, guard: preempt.SignalGuard) -> dict[str, Any]:
    """Resume if asked, train to the end, to a stop signal or to a non-finite loss, then checkpoint (never
    non-finite weights), evaluate and write the summary."""
    cfg, acc = p.cfg, p.acc
    st = State(loss_sum=torch.zeros((), device=acc.device))
    if cfg.train.resume and (done := _resume(p, st)) is not None:
        return done
    p.files.start(cfg, p.env_extra, st.step if cfg.train.resume else None, p.total_steps)
    progress = make_progress(cfg.train.progress, p.total_steps, acc.is_main_process, start=st.step)
    p.prof.start()
    st.t_log = time.perf_counter()
    stopped = _loop(p, st, guard, progress)
    p.prof.stop()
    progress.close()
    if st.diverged is None:  # collective: every rank saves its part, rank 0 publishes the directory atomically
        _save(p, st, write=stopped or cfg.train.final_ckpt)
    if st.diverged is not None:
        return finish.finish_diverged(p, st)
    if stopped:
        return finish.finish_preempted(p, st, guard)
    return finish.finish_ok(p, st, finish.final_eval(p, st))


def _loop(p: Parts, st: State, guard: preempt.SignalGuard, progress: NullProgress) -> bool:
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
            if st.diverged is not None:  # every rank read the same reduced loss: all stop here
                return False
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


def _after_step(p: Parts, st: State, progress: NullProgress, micro_batch: int) -> None:
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
        if cfg.train.stop_on_nonfinite:
            st.diverged = diverge.nonfinite_message("loss", loss, st.step, rec["lr"])
            if st.diverged is not None:
                return
    p.files.beat(st.step, HEARTBEAT_S)
    if cfg.train.ckpt_every and st.step % cfg.train.ckpt_every == 0 and st.step < p.total_steps:
        _save(p, st)


def _end_epoch(p: Parts, st: State) -> dict[str, float]:
    val = evaluate(p.acc, p.model, p.val_dl, p.cfg.fast.channels_last)
    if p.cfg.sched.name == "plateau":
        p.scheduler.step(val["loss"])
    p.files.log({"step": st.step, "epoch": st.epoch, "val_loss": val["loss"], "val_acc": val["acc"],
                 "time_s": time.time() - p.t_start})
    return val


def _save(p: Parts, st: State, write: bool = True) -> None:
    """A checkpoint of every rank (collective), unless the weights are not finite (then ``st.diverged``); with
    ``write`` False (``train.final_ckpt`` off at the end of a run) only the weights' check."""
    if p.cfg.train.stop_on_nonfinite and not diverge.weights_finite(p.acc, p.model):
        st.diverged = diverge.nonfinite_message("weights", None, st.step, p.scheduler.get_last_lr()[0])
        return
    if write:
        checkpoint.save_checkpoint(p.acc, p.files.run_dir, st.position(), keep=p.cfg.train.keep_ckpts)


def run(cfg: Config, task: Task | None = None, model: nn.Module | None = None) -> RunResult:
    """Train one run described by ``cfg``; the summary is also written to ``summary.json``.

    ``task``: the loss (default cross-entropy; distillation passes one holding its teacher). ``model``: train this
    module instead of a fresh one (a pruned model keeps its masks). SIGUSR1/SIGTERM/SIGINT stop the run at the next
    vote step with a checkpoint (status ``preempted``). The process group is destroyed before returning, on every
    rank and on every path, so no communication thread outlives the run."""
    preempt.watch_parent()
    t_start = time.time()
    trackers.check_installed(cfg.train.trackers)  # a missing tracker: one line, before the process group starts
    if cfg.train.resume:
        check_resume(cfg)  # a flag contradicting the checkpoint: one line, before the process group starts
    acc = build_accelerator(cfg)
    try:
        return _run(cfg, acc, task, model, t_start)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # drop the parts (DDP holds the process group) before _shutdown
        raise
    finally:
        _shutdown(acc)


def _run(cfg: Config, acc: Any, task: Task | None, model: nn.Module | None, t_start: float) -> RunResult:
    run_dir = resolve_out(cfg, acc.num_processes)
    with claim_run_dir(run_dir, cfg, acc.is_main_process):
        p = _build(cfg, acc, task, model, t_start, run_dir)
        try:
            with preempt.SignalGuard(acc, every=p.cfg.dist.preempt_check_every) as guard:
                summary = _fit(p, guard)
        except OSError as exc:  # disk full / read-only while writing records: failed, saying why, in one line
            user = finish.run_dir_error(exc, p.files.run_dir)
            finish.fail(p, user or exc)
            if user is None:
                raise
            raise user from exc
        except Exception as exc:  # bad input met while training (an unreadable image), or a bug: failed, saying why
            finish.fail(p, exc)
            raise
        return RunResult(summary, p.files.run_dir, unwrap_model(acc, p.model), acc.is_main_process)


def _shutdown(acc: Any) -> None:
    """Release the prepared objects (the DDP wrapper holds the process group), then destroy the process group, so
    that its C++ communication threads are joined here and none is alive at interpreter exit (a joinable thread torn
    down at exit aborts with "terminate called without an active exception"). Costs one gc.collect()."""
    acc.free_memory()
    acc.end_training()  # trackers closed (main), destroy_process_group() (the preempt vote's group too), every rank
