"""Run directory: the only interface between training and reporting.

A run directory holds::

    config.yaml     the resolved configuration
    env.json        versions, devices, world_size, num_nodes, hostnames, SLURM ids, git sha, fast-path switches
    metrics.jsonl   one JSON object per log step; keys carry their unit (``loss``, ``lr``, ``img_per_s``, ``time_s``)
    summary.json    final figures; ``status`` is ``ok`` | ``failed`` | ``oom`` | ``timeout`` | ``running`` |
                    ``preempted`` (checkpointed on a signal, resumable; see :mod:`cnnscale.train.preempt`)
    checkpoints/    ``step_000100/`` ... written by ``accelerator.save_state`` (see :mod:`cnnscale.train.checkpoint`)

Every file is written atomically (temp file in the same directory, fsync, rename), so a kill mid-write never leaves
a half file that a reader could misread. ``metrics.jsonl`` is appended a line at a time; a torn last line is skipped
with a warning on read.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import yaml

from cnnscale.errors import UserError

__all__ = [
    "atomic_write_text", "write_json", "read_json", "write_yaml", "MetricsLog", "read_metrics", "RunRecord",
    "load_run", "find_runs", "SUMMARY", "ENV", "CONFIG", "METRICS", "truncate_metrics",
]

SUMMARY, ENV, CONFIG, METRICS = "summary.json", "env.json", "config.yaml", "metrics.jsonl"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_yaml(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: str | Path) -> Any:
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


class RunRecord(dict):
    """A loaded run: ``summary``, ``env``, ``config`` dicts plus ``path`` and ``metrics`` (list)."""

    @property
    def summary(self) -> dict[str, Any]:
        return self["summary"]

    @property
    def env(self) -> dict[str, Any]:
        return self["env"]

    @property
    def config(self) -> dict[str, Any]:
        return self["config"]


def load_run(path: str | Path, with_metrics: bool = False) -> RunRecord:
    """Load one run directory. Raises ValueError naming the problem if it is not a complete run."""
    path = Path(path)
    if not (path / SUMMARY).is_file():
        raise ValueError(f"{path}: no {SUMMARY}")
    try:
        summary = read_json(path / SUMMARY)
        env = read_json(path / ENV) if (path / ENV).is_file() else {}
        config = yaml.safe_load((path / CONFIG).read_text()) if (path / CONFIG).is_file() else {}
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: corrupt record ({type(exc).__name__})") from None
    if not isinstance(summary, dict) or not isinstance(env, dict):
        raise ValueError(f"{path}: corrupt record (not a JSON object)")
    rec = RunRecord(path=str(path), summary=summary, env=env, config=config or {})
    if with_metrics:
        rec["metrics"] = read_metrics(path / METRICS)
    return rec


def find_runs(roots: list[str | Path]) -> list[Path]:
    """Every directory under ``roots`` (recursively) that looks like a run: it holds summary.json or env.json."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise UserError(f"no such run directory: {root}")
        if (root / SUMMARY).exists() or (root / ENV).exists():
            found.append(root)
            continue
        for p in sorted(root.rglob("*")):
            if p.is_dir() and "checkpoints" not in p.parts and ((p / SUMMARY).exists() or (p / ENV).exists()):
                found.append(p)
    return found
