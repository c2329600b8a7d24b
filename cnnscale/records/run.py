"""A loaded run directory: its typed records (:mod:`cnnscale.records.schema`), config and metrics; and where runs are.

A run directory is whatever holds a summary.json, an env.json or a point.json (a study point that failed before the
trainer wrote anything has only point.json). Records of schema 0 (before point.json) kept the study's view of a
point inside summary.json (``point``, ``exit_warning``); :func:`load_run` turns that into a :class:`Point`, so that
readers see one shape. Reading never writes.

Whether a run whose summary says ``running`` still runs: :func:`liveness` (its lock, else its pid or heartbeat).
Which checkpoints are complete (a strict ``step_%08d`` name and the ``trainer_state.json`` marker written last, naming
the same step): :func:`complete_checkpoints`, without torch.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cnnscale.errors import UserError
from cnnscale.records.io import CONFIG, ENV, LOCK, METRICS, POINT, SUMMARY, lock_holder, read_metrics
from cnnscale.records.schema import RUN_STATUSES, Env, Point, RecordError, Summary, read_env, read_point, read_summary

__all__ = ["Run", "load_run", "find_runs", "legacy_point", "liveness", "LIVENESS", "HEARTBEAT_STALE_S",
           "checkpoint_dirs", "complete_checkpoints", "has_checkpoint", "holds_run", "CHECKPOINTS", "TRAINER_STATE",
           "CHECKPOINT_NAME"]

CHECKPOINTS, TRAINER_STATE = "checkpoints", "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"step_(\d{8})")
"""The only checkpoint directory name this project writes (``step_%08d``); anything else is left alone."""
HEARTBEAT_STALE_S = 600.0
"""A running run on another host whose heartbeat is older than this reads as dead (the heartbeat is rewritten
every ~10 s of training; an evaluation or a checkpoint of a big model can hold it for minutes)."""
LIVENESS = ("running", "dead", "unknown", *(s for s in RUN_STATUSES if s != "running"))
"""What :func:`liveness` returns."""


@dataclass(frozen=True)
class Run:
    """One run directory's records. ``summary`` is None when only the study's point.json is there."""

    path: str
    summary: Summary | None
    env: Env
    point: Point | None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] | None = None

    @property
    def status(self) -> str:
        """The study's verdict when it judged the point not ok, else the run's own status."""
        if self.point is not None and (self.point.status != "ok" or self.summary is None):
            return self.point.status
        return self.summary.status if self.summary is not None else "unknown"


def legacy_point(summary: Summary) -> Point | None:
    """The :class:`Point` a schema-0 study wrote into summary.json (``summary.point``), or None when there is none."""
    meta = summary.point
    if not meta or summary.model is None or summary.world_size is None:
        return None
    try:
        return Point(study=str(meta.get("study", "")), id=str(meta.get("id", "")), model=summary.model,
                     world_size=summary.world_size, status=summary.status if summary.status in ("ok", "failed",
                     "oom", "timeout") else "failed", precision=summary.mixed_precision or "no",
                     micro_batch=summary.micro_batch, grad_accum=summary.grad_accum or 1,
                     global_batch=summary.global_batch, scaling=meta.get("scaling", "weak"),
                     settings=meta.get("settings", "default"), overrides=meta.get("overrides"),
                     script=meta.get("script"), error=summary.error, exit_warning=summary.exit_warning,
                     seconds=meta.get("launch_s"))
    except RecordError as exc:
        raise RecordError(f"summary.json's point: {exc}") from None


_TOP_KEY = re.compile(r"([A-Za-z_][\w.-]*):(?:\s|$)")


def _sections_text(text: str, keys: tuple[str, ...]) -> str:
    """The lines of the top-level ``keys`` of a block-style YAML mapping (what write_yaml writes), or the whole
    ``text`` when a top-level line is anything but a plain ``key:`` (then the caller parses it all)."""
    out, keep = [], False
    for line in text.splitlines(keepends=True):
        if line[:1] not in ("", " ", "\t", "-", "#", "\n", "\r"):  # a new top-level entry
            m = _TOP_KEY.match(line)
            if m is None:
                return text
            keep = m.group(1) in keys
        if keep:
            out.append(line)
    return "".join(out)


def _read_config(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    if not (path / CONFIG).is_file():
        return {}
    try:
        text = (path / CONFIG).read_text()
        # libyaml's C loader when PyYAML has it; still ~3 ms for a whole resolved config, hence ``keys``
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text if keys is None else _sections_text(text, keys))
        try:
            cfg = loader.get_single_data()
        finally:
            loader.dispose()
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: corrupt record ({type(exc).__name__} in {CONFIG})") from None
    if not isinstance(cfg, dict):
        return {}
    return cfg if keys is None else {k: v for k, v in cfg.items() if k in keys}


def load_run(path: str | Path, with_metrics: bool = False, config_keys: tuple[str, ...] | None = None) -> Run:
    """Load one run directory (cost: three small JSON files and a YAML; ``with_metrics`` reads metrics.jsonl).
    ``config_keys``: keep only these top-level sections of config.yaml, parsing only their lines (a report of
    1,000 runs needs ``("dist",)``: ~0.2 ms a run instead of ~3 ms for the whole resolved config).

    Raises :class:`RecordError` (a ValueError) naming the problem when it is no complete run: neither summary.json
    nor point.json, or a corrupt record; UserError when a record is from a newer cnnscale.
    """
    path = Path(path)
    has_summary, has_point = (path / SUMMARY).is_file(), (path / POINT).is_file()
    if not has_summary and not has_point:
        raise RecordError(f"{path}: no {SUMMARY}")
    summary = read_summary(path) if has_summary else None
    env = read_env(path) if (path / ENV).is_file() else Env(schema_version=0)
    point = read_point(path) if has_point else (legacy_point(summary) if summary is not None else None)
    metrics = read_metrics(path / METRICS) if with_metrics else None
    return Run(path=str(path), summary=summary, env=env, point=point, config=_read_config(path, config_keys),
               metrics=metrics)


def _is_run(p: Path) -> bool:
    return any((p / name).is_file() for name in (SUMMARY, ENV, POINT))


_RUN_FILES = frozenset((SUMMARY, ENV, POINT))


def find_runs(roots: list[str | Path]) -> list[Path]:
    """Every directory under ``roots`` (recursively, checkpoints skipped) that holds a summary, env or point.

    Cost: one directory listing per folder (os.walk), no stat per file: ~0.1 s for 1,000 run directories."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise UserError(f"no such run directory: {root}")
        if _is_run(root):
            found.append(root)
            continue
        if "checkpoints" in root.parts:
            continue
        mine: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "checkpoints"]
            here = Path(dirpath)
            if here != root and _RUN_FILES.intersection(filenames):
                mine.append(here)
            # a symlink to a directory is listed but not descended into (as rglob did): it may be a run itself
            mine += [here / d for d in dirnames if os.path.islink(os.path.join(dirpath, d)) and _is_run(here / d)]
        found += sorted(mine)
    return found


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every published checkpoint of ``run_dir``, oldest first: a ``step_%08d`` directory
    holding the ``trainer_state.json`` marker (written last, before the atomic rename). What ``--resume`` loads (the
    newest; a marker that does not parse is then reported as a corrupt checkpoint)."""
    ckdir = Path(run_dir) / CHECKPOINTS
    try:
        entries = list(os.scandir(ckdir))
    except OSError:
        return []
    out = []
    for e in entries:
        m = CHECKPOINT_NAME.fullmatch(e.name)
        if m is not None and e.is_dir(follow_symlinks=False) and (Path(e.path) / TRAINER_STATE).is_file():
            out.append((int(m.group(1)), Path(e.path)))
    return sorted(out)


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The :func:`checkpoint_dirs` whose marker parses and names that same step, oldest first: the only
    directories checkpoint rotation may delete."""
    out = []
    for step, d in checkpoint_dirs(run_dir):
        try:
            state = json.loads((d / TRAINER_STATE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("step") == step:
            out.append((step, d))
    return out


def has_checkpoint(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a complete checkpoint that ``--resume`` would load (see
    :func:`complete_checkpoints`)."""
    return bool(complete_checkpoints(run_dir))


def holds_run(path: str | Path) -> bool:
    """True when ``path`` holds a run's records (config, summary, env, metrics) or anything under checkpoints/; a
    study's own files (point.json, launch.log) do not count."""
    path = Path(path)
    ck = path / CHECKPOINTS
    return any((path / n).exists() for n in (CONFIG, SUMMARY, ENV, METRICS)) or (ck.is_dir() and any(ck.iterdir()))


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def liveness(run_dir: str | Path) -> str:
    """``running`` or ``dead`` for a run whose summary.json says ``running``; its status otherwise (``ok``,
    ``failed``, ``preempted``, ``diverged`` ...); ``unknown`` without a readable summary. Never raises on a record.

    A running run is alive while its lock (``RUN/.lock``, held by rank 0 for the whole run) is held. Else, on the
    run's own host: dead when the lock is free, or (no lock file: older runs) when ``pid`` is gone. Seen from another
    host (a copy of a cluster's runs, where a free lock says nothing): alive while ``heartbeat_at`` is under
    :data:`HEARTBEAT_STALE_S` old.
    Cost: one small JSON file, and one open + flock probe of the lock file for running runs."""
    run_dir = Path(run_dir)
    try:
        data = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return "unknown"
    status = data.get("status") if isinstance(data, dict) else None
    if not isinstance(status, str) or status not in RUN_STATUSES:
        return "unknown"
    if status != "running":
        return status
    locked = (run_dir / LOCK).is_file()
    if locked and lock_holder(run_dir / LOCK) is not None:
        return "running"
    if data.get("host") == socket.gethostname():  # here a free lock, or no pid, is decisive
        return "running" if not locked and _pid_alive(data.get("pid")) else "dead"
    beat = data.get("heartbeat_at")
    fresh = isinstance(beat, int | float) and not isinstance(beat, bool) and time.time() - beat < HEARTBEAT_STALE_S
    return "running" if fresh else "dead"
