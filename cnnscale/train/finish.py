"""How a run ends: the final evaluation and the summary of each ending (ok, preempted, diverged, failed).

Each ``finish_*`` writes summary.json on rank 0 (:meth:`~cnnscale.train.rundir.RunFiles.finish`, which releases the
reserve first so that a full disk still gets its status) and waits for every rank, so the summary exists before any
rank exits.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from cnnscale.config import global_batch
from cnnscale.errors import UserError, write_error
from cnnscale.train import checkpoint, diverge, preempt
from cnnscale.train.parts import Parts, State
from cnnscale.train.step import evaluate

__all__ = ["final_eval", "finish_ok", "finish_preempted", "finish_diverged", "fail", "run_dir_error"]


def final_eval(p: Parts, st: State) -> dict[str, Any]:
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


def finish_ok(p: Parts, st: State, final: dict[str, Any]) -> dict[str, Any]:
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


def finish_preempted(p: Parts, st: State, guard: preempt.SignalGuard) -> dict[str, Any]:
    run_dir = p.files.run_dir
    summary = preempt.preempted_summary(guard.name, model=p.cfg.model.name, world_size=p.acc.num_processes,
                                        steps=st.step, epochs_done=st.epoch, total_steps=p.total_steps,
                                        wall_s=time.time() - p.t_start, run_dir=run_dir)
    p.files.finish(summary)
    if p.files.is_main:
        print(preempt.stop_message(summary, run_dir), flush=True)
    p.acc.wait_for_everyone()  # the summary exists before any rank exits (srun --kill-on-bad-exit ends the rest)
    return summary


def finish_diverged(p: Parts, st: State) -> dict[str, Any]:
    summary = diverge.diverged_summary(st.diverged or "", model=p.cfg.model.name, world_size=p.acc.num_processes,
                                       steps=st.step, epochs_done=st.epoch, total_steps=p.total_steps,
                                       wall_s=time.time() - p.t_start, final_loss=st.last_loss)
    p.files.finish(summary)
    if p.files.is_main:
        line = diverge.stop_line(summary["error"], checkpoint.latest_checkpoint(p.files.run_dir))
        sys.stderr.write(line + "\n")  # one write: one line
        sys.stderr.flush()
    p.acc.wait_for_everyone()
    return summary


def fail(p: Parts, exc: BaseException) -> None:
    """The summary of a run that ended on ``exc``: ``failed`` with the reason (on a full disk the reserve released
    by :meth:`RunFiles.finish` makes room). Nothing when the run wrote no record yet."""
    if not p.files.started:
        return
    first = str(exc).splitlines()[0] if str(exc) else ""
    text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {first}"
    try:
        p.files.finish({"status": "failed", "model": p.cfg.model.name, "world_size": p.acc.num_processes,
                        "error": " ".join(text.split())})
    except OSError:  # not even the reserve's room: the heartbeat's age tells the rest (liveness)
        pass


def run_dir_error(exc: OSError, run_dir: Path) -> Exception | None:
    """Disk full / read-only while writing records: a one-line UserError; None for a file outside the run."""
    outside = exc.filename and not Path(os.path.abspath(exc.filename)).is_relative_to(run_dir.absolute())
    return None if outside else write_error(exc, run_dir, "the run directory")
