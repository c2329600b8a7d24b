"""Checkpoints: ``accelerator.save_state`` into a hidden temp directory, then an atomic rename.

Layout: ``RUN/checkpoints/step_00000100/`` holding Accelerate's state files plus ``trainer_state.json`` (step, epoch,
micro-batches consumed in the epoch), the marker written last. A directory is visible under its final name only once
complete, so a kill during a save leaves at worst a ``.tmp-*`` directory that resume ignores.

Rotation (``train.keep_ckpts``) deletes only complete checkpoints this project wrote (the strict ``step_%08d`` name
and a marker naming the same step: :func:`cnnscale.records.run.complete_checkpoints`) older than the one just
written, never the one just written; anything else under ``checkpoints/`` (``step_best``, ``step_00000005.bak``, a
newer step left by another run) is left alone, with one warning per run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from accelerate.utils import load

from cnnscale.errors import UserError, write_error
from cnnscale.records.io import atomic_write_text, strict_json
from cnnscale.records.run import CHECKPOINTS, TRAINER_STATE, checkpoint_dirs, complete_checkpoints

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "rotate", "TRAINER_STATE"]

_warned: set[Path] = set()  # checkpoints/ directories whose strays were already named (one warning per run)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(accelerator: Any, run_dir: str | Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Save on every rank (Accelerate writes per-rank RNG files), publish atomically on the main process."""
    ckdir = Path(run_dir) / "checkpoints"
    name = f"step_{int(state['step']):08d}"
    final, tmp = ckdir / name, ckdir / f".tmp-{name}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_text(tmp / TRAINER_STATE, strict_json(state, indent=2) + "\n")  # the marker, written last
            _fsync_dir(tmp)
    except Exception as exc:  # disk full mid-save: drop the partial copy, keep the last complete checkpoint
        user = write_error(exc, tmp, f"checkpoint {name}")
        shutil.rmtree(tmp, ignore_errors=True)
        if user is None:
            raise
        last = latest_checkpoint(run_dir)
        raise UserError(f"{user}; last complete checkpoint: {last or 'none'}") from exc
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckdir)
        rotate(ckdir.parent, int(state["step"]), keep)
    accelerator.wait_for_everyone()
    return final


def rotate(run_dir: str | Path, newest: int, keep: int) -> list[Path]:
    """Delete complete checkpoints older than step ``newest`` beyond the ``keep`` newest (``newest`` itself counts and
    is never deleted); warn once about anything else under ``checkpoints/``. Returns the deleted directories."""
    ckdir = Path(run_dir) / CHECKPOINTS
    done = complete_checkpoints(run_dir)
    older = [d for step, d in done if step < newest]
    doomed = older[:max(len(older) - (keep - 1), 0)]
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    ours = {d.name for step, d in done if step <= newest}
    others = sorted(p.name for p in ckdir.iterdir() if p.name not in ours and not p.name.startswith(".tmp-"))
    if others and ckdir not in _warned:
        _warned.add(ckdir)
        names = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        print(f"cnnscale: warning: {ckdir} holds entries that checkpoint rotation leaves alone ({names}): not "
              f"complete checkpoints of this run up to step {newest}", file=sys.stderr, flush=True)
    return doomed


def _check_pickles(ck: Path, rank: int) -> None:
    """Open the pickles Accelerate would load unsafely or silently with ``weights_only=True`` first.

    Accelerate loads ``custom_checkpoint_*.pkl`` (our LR scheduler) with ``weights_only=False``, and it swallows any
    error reading ``random_states_<rank>.pkl`` (a truncated file would resume with fresh RNG, no longer exact). Both
    hold only tensors, numbers and numpy RNG state, which ``accelerate.utils.load`` admits under ``weights_only``;
    anything else (a foreign pickle, a torn file) stops the resume here.
    """
    for f in [*sorted(ck.glob("custom_checkpoint_*.pkl")), ck / f"random_states_{rank}.pkl"]:
        if not f.is_file():
            raise ValueError(f"{f.name} is missing (saved by fewer processes?)")
        try:
            load(f, map_location="cpu", weights_only=True)
        except Exception as exc:
            lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else type(exc).__name__)
            raise ValueError(f"{f.name} does not load with weights_only=True: {why.strip()}") from None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest published checkpoint of a run directory (``step_%08d`` with its marker; ``.tmp-*`` directories and
    any other name are ignored): :func:`cnnscale.records.run.checkpoint_dirs`."""
    done = checkpoint_dirs(run_dir)
    return done[-1][1] if done else None


def load_checkpoint(accelerator: Any, run_dir: str | Path, model_name: str = "?") -> dict[str, Any]:
    """Restore model, optimiser, registered objects and RNG states; return the trainer state. A checkpoint of
    another model (``model_name``: the one built) is a mismatch, never called corrupt."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--resume: no such run directory: {run_dir}")
    ck = latest_checkpoint(run_dir)
    if ck is None:
        raise UserError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    try:
        state = json.loads((ck / TRAINER_STATE).read_text())
        _check_pickles(ck, accelerator.process_index)
        accelerator.load_state(str(ck))
    except Exception as exc:  # torn or foreign files: say which checkpoint, not a traceback
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "loading state_dict" in first or "size mismatch" in str(exc):  # a model mismatch, not a torn file
            raise UserError(f"--resume: checkpoint {ck} holds another model than the one built ({model_name}): "
                            f"{' '.join(str(exc).split())[:300]}") from None
        raise UserError(f"--resume: checkpoint {ck} is corrupt or incomplete ({type(exc).__name__}: {first})") from None
    return state
