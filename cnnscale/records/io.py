"""Run directory files, written atomically: the only interface between training and reporting.

A run directory holds::

    config.yaml     the resolved configuration
    env.json        versions, devices, world_size, the model's params and FLOPs ... (:class:`~.schema.Env`)
    metrics.jsonl   one JSON object per log step; keys carry their unit (``loss``, ``lr``, ``img_per_s``, ``time_s``)
    summary.json    final figures; ``status`` is ``ok`` | ``failed`` | ``oom`` | ``timeout`` | ``running`` |
                    ``preempted`` | ``diverged`` (:class:`~.schema.Summary`; see :mod:`cnnscale.train.preempt`);
                    while running also the owner's pid, host and a heartbeat (:func:`~.run.liveness`)
    point.json      written by a study beside the trainer's files: the point and how its launch ended
                    (:class:`~.schema.Point`)
    checkpoints/    ``step_00000100/`` ... written by ``accelerator.save_state`` (see :mod:`cnnscale.train.checkpoint`)
    .lock           held (flock) by the run's rank 0 while it runs (:func:`hold_lock`)

env.json, summary.json and point.json are written and read only through :mod:`cnnscale.records.schema`; a run
directory is loaded with :func:`cnnscale.records.run.load_run`.

Every file is written atomically (temp file in the same directory, fsync, rename), so a kill mid-write never leaves
a half file that a reader could misread. ``metrics.jsonl`` is appended a line at a time; a torn last line is skipped
with a warning on read. Every JSON the project writes is strict (``allow_nan=False``; NaN and infinity are written
as null).

One writer: :func:`hold_lock` holds an ``fcntl.flock`` on a lock file (``RUN/.lock``, a study's ``OUT/.lock``) for a
whole run; a second writer gets one line naming the holder. The kernel drops the lock when its holder dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from cnnscale.errors import UserError

__all__ = [
    "atomic_write_text", "user_file_mode", "write_json", "read_json", "write_yaml", "MetricsLog", "read_metrics",
    "truncate_metrics", "finite", "strict_json", "hold_lock", "lock_holder", "SUMMARY", "ENV", "CONFIG", "METRICS",
    "POINT", "LOCK",
]

SUMMARY, ENV, CONFIG, METRICS, POINT = "summary.json", "env.json", "config.yaml", "metrics.jsonl", "point.json"
LOCK = ".lock"


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory, fsync and rename. The file gets mkstemp's
    0600 unless ``mode`` is given (files meant to be shared, such as a report: ``user_file_mode()``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def user_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (0644 with the usual umask 022)."""
    umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def finite(obj: Any) -> Any:
    """``obj`` with every NaN and infinity (in nested dicts and lists too) replaced by None; tuples become lists,
    numpy and torch scalars Python numbers."""
    if hasattr(obj, "item") and not isinstance(obj, dict | list | tuple | str):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def strict_json(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON text (sorted keys): NaN and infinity become null, numpy/torch scalars numbers."""
    return json.dumps(finite(obj), indent=indent, sort_keys=True, default=_json_default, allow_nan=False)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically; NaN and infinity become null, so the file is always valid JSON."""
    atomic_write_text(path, strict_json(obj, indent=2) + "\n")


def write_yaml(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as YAML (keys in their order), atomically."""
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: str | Path) -> Any:
    """The parsed JSON of ``path`` (records of a run directory: use :mod:`cnnscale.records.schema`)."""
    with open(path) as f:
        return json.load(f)


class MetricsLog:
    """Append-only JSON-lines log. Each line is written with one ``write`` call and flushed, so a crash leaves at
    most one torn final line, which :func:`read_metrics` skips."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(strict_json(record) + "\n")  # a NaN loss is written as null: the file stays JSON
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl, skipping (with a warning) lines that do not parse, such as a torn last line."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{i}: skipping unreadable metrics line (torn write?)", stacklevel=2)
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def truncate_metrics(path: str | Path, max_step: int) -> None:
    """On resume: drop records past the checkpoint's step (logged before the crash, about to be logged again) and any
    torn line, so metrics.jsonl never holds a step twice. Rewritten atomically."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= max_step]
    atomic_write_text(path, "".join(strict_json(r) + "\n" for r in kept))


def _read_holder(f: Any) -> dict[str, Any]:
    try:
        f.seek(0)
        holder = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def hold_lock(path: str | Path, what: str, wait_s: float = 1.0) -> Iterator[dict[str, Any]]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created with its parents) for the ``with`` block and yield the
    holder written into it (``pid``, ``host``, ``since``). Held by another process: a one-line UserError naming the
    holder, after retrying for ``wait_s`` (a :func:`lock_holder` probe holds it for microseconds). The kernel drops
    the lock when the holder dies, SIGKILL included; the file stays (removing lock files races). Note: processes
    forked while it is held (DataLoader workers) share it until they exit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() >= deadline:
                    h = _read_holder(f)
                    since = time.strftime("%H:%M:%S", time.localtime(h["since"])) if isinstance(
                        h.get("since"), int | float) else "?"
                    raise UserError(f"{what} is in use by pid {h.get('pid', '?')} on {h.get('host', '?')} since "
                                    f"{since}: wait for it to end, or stop it first ({path})") from None
                time.sleep(0.05)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        f.seek(0)
        f.truncate()
        f.write(strict_json(holder) + "\n")
        f.flush()
        yield holder
    finally:
        f.close()  # closing the last descriptor releases the flock


def lock_holder(path: str | Path) -> dict[str, Any] | None:
    """The holder (``pid``, ``host``, ``since``) when some process holds the lock on ``path`` now, else None (no file,
    unreadable, or free). A shared non-blocking probe: it never waits and never takes the lock from a writer."""
    try:
        f = open(path)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(f) or {"pid": None, "host": None}
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return None
