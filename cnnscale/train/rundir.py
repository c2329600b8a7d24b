"""The run directory as training writes it: config.yaml, env.json, metrics.jsonl and summary.json, on rank 0 only;
and the experiment trackers (:mod:`cnnscale.train.trackers`), which get every metrics.jsonl record as it is written.

Every rank calls the same methods (some are collective: :func:`resolve_out`, :func:`claim_run_dir`,
:meth:`RunFiles.start`); only the main process touches the files. The record layout itself is :mod:`cnnscale.records`.

A run directory protects what it holds (:func:`claim_run_dir`):

- one writer: rank 0 holds ``RUN/.lock`` (``fcntl.flock``) for the whole run; a second writer gets one line naming
  the holder, exit 2. The kernel drops the lock when the holder dies, so a SLURM requeue or a resume after a crash
  gets it;
- a fresh run into a directory that holds a run is refused (continue it with ``--resume``), unless
  ``--overwrite``, which moves the old run aside to ``RUN.old-<YYYYmmdd-HHMMSS>``;
- every status ends true: :data:`RESERVE_BYTES` are reserved in ``RUN/.reserve`` before the run starts and released
  just before the final summary is written, so a full disk still ends in ``failed`` with the reason;
- while running, summary.json holds the owner's pid and host and a heartbeat (``heartbeat_at``), rewritten every
  :data:`HEARTBEAT_S` of training (:func:`cnnscale.records.run.liveness` reads them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list, gather_object

from cnnscale.config import Config, config_to_dict
from cnnscale.errors import UserError, write_error
from cnnscale.records import io as records
from cnnscale.records.env import collect_env
from cnnscale.records.run import holds_run
from cnnscale.records.schema import Env, Summary, write_env, write_summary
from cnnscale.train import trackers
from cnnscale.train.resume import refusal

__all__ = ["resolve_out", "check_writable", "claim_run_dir", "RunFiles", "RESERVE", "RESERVE_BYTES",
           "HEARTBEAT_S"]

RESERVE, RESERVE_BYTES = ".reserve", 1 << 20
"""The reserve file and its size: room for the final summary.json, its temp file and a metrics line (~10 KB)."""
HEARTBEAT_S = 10.0
"""Seconds between heartbeats (checked at each optimiser step; one small atomic write each)."""
_RUN_FILES = (records.CONFIG, records.SUMMARY, records.ENV, records.METRICS)


def resolve_out(cfg: Config, num_processes: int) -> Path:
    """The run directory: ``--resume DIR``, ``--out DIR`` or ``runs/MODEL-wsN-STAMP``, rank 0's choice broadcast to
    every rank (collective)."""
    out = cfg.train.resume if cfg.train.resume else cfg.train.out
    if not out:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = f"runs/{cfg.model.name}-ws{num_processes}-{stamp}"
    holder = [out]
    broadcast_object_list(holder)
    return Path(holder[0])


def check_writable(path: Path) -> None:
    """Fail before anything is written. Root passes every permission bit, but ``os.access`` still reports a read-only
    mount or an immutable directory to root; a regular file in the way is checked by name."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"output directory {path} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output directory is not writable: {existing}")


def _reserve(run_dir: Path) -> None:
    try:
        with open(run_dir / RESERVE, "wb") as f:
            f.write(b"\0" * RESERVE_BYTES)  # written, not truncated: a sparse file would reserve nothing
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(run_dir / RESERVE)
        raise write_error(exc, run_dir, "the run directory") or exc from None


@contextlib.contextmanager
def _claim_main(run_dir: Path, cfg: Config) -> Iterator[str | None]:
    """Rank 0's part of :func:`claim_run_dir`; yields the note to print (the old run moved aside) or None."""
    check_writable(run_dir)
    top = next((d for d in (*reversed(run_dir.parents), run_dir) if not d.exists()), None)  # what this call creates
    created = top is not None
    with contextlib.ExitStack() as stack:
        stack.enter_context(records.hold_lock(run_dir / records.LOCK, f"run directory {run_dir}"))
        note = None
        try:
            if not cfg.train.resume and holds_run(run_dir):
                if not cfg.train.overwrite:
                    raise UserError(refusal(run_dir))  # again, under the lock: the check that counts
                aside = run_dir.with_name(f"{run_dir.name}.old-{datetime.now():%Y%m%d-%H%M%S}")
                os.replace(run_dir, aside)
                run_dir.mkdir()
                top, created = run_dir, True
                old_lock = stack.pop_all()  # our lock on the moved run, released once the new one is held
                stack.enter_context(records.hold_lock(run_dir / records.LOCK, f"run directory {run_dir}"))
                old_lock.close()
                note = f"--overwrite: moved the old run in {run_dir} aside to {aside}"
            _reserve(run_dir)
            yield note
        except BaseException:
            if created and top is not None and not any((run_dir / n).exists() for n in _RUN_FILES):
                stack.close()  # nothing of the run written yet: remove what this call created
                shutil.rmtree(top, ignore_errors=True)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(run_dir / RESERVE)


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, cfg: Config, is_main: bool) -> Iterator[None]:
    """Hold ``run_dir`` for the ``with`` block (collective): rank 0 takes its lock, refuses a fresh run into a
    directory that holds one (or moves it aside under ``train.overwrite``) and reserves room for the final status;
    every rank raises the same one-line UserError when it refuses. A directory this call created is removed again
    when the block fails before the run's first record."""
    with contextlib.ExitStack() as stack:
        failed: BaseException | None = None
        if is_main:
            try:
                note = stack.enter_context(_claim_main(run_dir, cfg))
                if note:
                    print(note, flush=True)
            except Exception as exc:  # said to every rank first, or the others would wait in the broadcast
                failed = exc
        holder = [None if failed is None else str(failed) if isinstance(failed, UserError) else ""]
        broadcast_object_list(holder)
        if failed is not None:
            raise failed
        if holder[0] is not None:
            raise UserError(holder[0] or f"rank 0 could not claim the run directory {run_dir} (see its error)")
        yield


class RunFiles:
    """The record files of one run; a no-op on every rank but the main one."""

    def __init__(self, run_dir: Path, accelerator: Any) -> None:
        self.run_dir, self.acc = run_dir, accelerator
        self.is_main = bool(accelerator.is_main_process)
        self.metrics: records.MetricsLog | None = None
        self.started = False
        """True once the main process began writing the run's records (then a failure gets a failed summary)."""
        self._running: dict[str, Any] = {}
        self._beat = 0.0

    def start(self, cfg: Config, env_extra: dict[str, Any], resumed_at: int | None, total_steps: int) -> None:
        """Write config.yaml, env.json (``env_extra`` on top of the collected environment) and a ``running``
        summary with the owner and a heartbeat; open metrics.jsonl, cut back to ``resumed_at`` on a resume; start
        the trackers (``train.trackers``) with the resolved config as hyperparameters. Collective (gathers
        hostnames)."""
        hosts = gather_object([socket.gethostname()])
        if not self.is_main:
            return
        self.started = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        records.write_yaml(self.run_dir / records.CONFIG, config_to_dict(cfg))
        write_env(self.run_dir, Env.from_dict(collect_env(self.acc, hosts, env_extra)))
        self._running = {"status": "running", "model": cfg.model.name, "world_size": self.acc.num_processes,
                         "pid": os.getpid(), "host": socket.gethostname(), "total_steps": total_steps}
        self.beat(resumed_at or 0)  # a resumed run is running again
        if resumed_at is not None:  # steps past the checkpoint are logged again from here
            records.truncate_metrics(self.run_dir / records.METRICS, resumed_at)
        self.metrics = records.MetricsLog(self.run_dir / records.METRICS)
        trackers.start(self.acc, self.run_dir, cfg)

    def beat(self, step: int, every_s: float = 0.0) -> None:
        """Rewrite the running summary with ``heartbeat_at`` (now) and ``steps``, when ``every_s`` have passed since
        the last one (0: now). Main process only; a monotonic-clock check otherwise."""
        now = time.monotonic()
        if not self._running or now - self._beat < every_s:
            return
        self._beat = now
        write_summary(self.run_dir, Summary.from_dict({**self._running, "steps": step, "heartbeat_at": time.time()}))

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line, and the same record (step and keys) to the trackers."""
        if self.metrics is not None:
            self.metrics.log(record)
            trackers.log(self.acc, record)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the final summary.json (fields checked against the records schema, the owner and a last heartbeat
        added) and close metrics.jsonl. The reserve is released first, so this write finds room on a full disk."""
        if not self.is_main:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.run_dir / RESERVE)
        owner = {k: self._running[k] for k in ("pid", "host") if k in self._running}
        self._running = {}  # no heartbeat after the end
        write_summary(self.run_dir, Summary.from_dict({**owner, "heartbeat_at": time.time(), **summary}))
        if self.metrics is not None:
            with contextlib.suppress(OSError):  # a full disk's failed flush: the summary above is what counts
                self.metrics.close()
