"""Run directory files, written atomically: the only interface between training and reporting.

A run directory holds::

    config.yaml     the resolved configuration
    env.json        versions, devices, world_size, the model's params and FLOPs ... (:class:`~.schema.Env`)
    metrics.jsonl   one JSON object per log step; keys carry their unit (``loss``, ``lr``, ``img_per_s``, ``time_s``)
    summary.json    final figures; ``status`` is ``ok`` | ``failed`` | ``oom`` | ``timeout`` | ``running`` |
                    ``preempted`` (:class:`~.schema.Summary`; see :mod:`cnnscale.train.preempt`)
    point.json      written by a study beside the trainer's files: the point and how its launch ended
                    (:class:`~.schema.Point`)
    checkpoints/    ``step_000100/`` ... written by ``accelerator.save_state`` (see :mod:`cnnscale.train.checkpoint`)

env.json, summary.json and point.json are written and read only through :mod:`cnnscale.records.schema`; a run
directory is loaded with :func:`cnnscale.records.run.load_run`.

Every file is written atomically (temp file in the same directory, fsync, rename), so a kill mid-write never leaves
a half file that a reader could misread. ``metrics.jsonl`` is appended a line at a time; a torn last line is skipped
with a warning on read.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "atomic_write_text", "user_file_mode", "write_json", "read_json", "write_yaml", "MetricsLog", "read_metrics",
    "truncate_metrics", "finite", "SUMMARY", "ENV", "CONFIG", "METRICS", "POINT",
]

SUMMARY, ENV, CONFIG, METRICS, POINT = "summary.json", "env.json", "config.yaml", "metrics.jsonl", "point.json"


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


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically; NaN and infinity become null, so the file is always valid JSON."""
    text = json.dumps(finite(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


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
        self._f.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")
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
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in kept))
