"""Checkpoints: ``accelerator.save_state`` into a hidden temp directory, then an atomic rename.

Layout: ``RUN/checkpoints/step_00000100/`` holding Accelerate's state files plus ``trainer_state.json`` (step, epoch,
micro-batches consumed in the epoch). A directory is visible under its final name only once complete, so a kill
during a save leaves at worst a ``.tmp-*`` directory that resume ignores.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from cnnscale.errors import UserError
from cnnscale.records import atomic_write_text

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
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(state, indent=2, sort_keys=True) + "\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckdir)
        for old in sorted(p for p in ckdir.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
        accelerator.load_state(str(ck))
    except Exception as exc:  # torn or foreign files: say which checkpoint, not a traceback
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--resume: checkpoint {ck} is corrupt or incomplete ({type(exc).__name__}: {first})") from None
    return state
