"""Checkpoints: ``accelerator.save_state`` into a hidden temp directory, then an atomic rename.

Layout: ``RUN/checkpoints/step_00000100/`` holding Accelerate's state files plus ``trainer_state.json`` (step, epoch,
micro-batches consumed in the epoch). A directory is visible under its final name only once complete, so a kill
during a save leaves at worst a ``.tmp-*`` directory that resume ignores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate.utils import load

from cnnscale.errors import UserError, write_error
from cnnscale.records.io import atomic_write_text

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "TRAINER_STATE"]

TRAINER_STATE = "trainer_state.json"


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
            atomic_write_text(tmp / TRAINER_STATE, json.dumps(state, indent=2, sort_keys=True) + "\n")
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
        for old in sorted(p for p in ckdir.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
    """Newest complete checkpoint of a run directory (``.tmp-*`` directories are incomplete and ignored)."""
    ckdir = Path(run_dir) / "checkpoints"
    done = sorted(p for p in ckdir.glob("step_*") if p.is_dir() and (p / TRAINER_STATE).is_file())
    return done[-1] if done else None


def load_checkpoint(accelerator: Any, run_dir: str | Path) -> dict[str, Any]:
    """Restore model, optimiser, registered objects and RNG states; return the trainer state."""
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
        raise UserError(f"--resume: checkpoint {ck} is corrupt or incomplete ({type(exc).__name__}: {first})") from None
    return state
