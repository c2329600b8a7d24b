"""A run directory read so that the report never dies on it: odd values are dropped and named, never raised.

:func:`cnnscale.records.run.load_run` refuses a record with one wrong value (``"img_per_s": "fast"``): right for
the trainer and the study, but one such file must not hide the rest of a report. :func:`read_leniently` keeps every
value that fits its field, sets the others to null and says which (``img_per_s 'fast' is not a float``);
:func:`sanitize` then flags values that fit their type but cannot be figures: NaN and infinity (Python's JSON reader
accepts them), a world size, batch or count below 1, a negative throughput or time. Each finding is one phrase; the
caller turns them into one warning naming the run. Pure: reads files, writes nothing, no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import yaml

from cnnscale.records.base import SCHEMA_VERSION, Record, RecordError
from cnnscale.records.io import CONFIG
from cnnscale.records.run import Run, legacy_point
from cnnscale.records.schema import Env, Point, Summary

__all__ = ["read_leniently", "sanitize", "POSITIVE", "NON_NEGATIVE", "MAX_COUNT"]

POSITIVE = ("world_size", "micro_batch", "grad_accum", "global_batch", "num_nodes")
"""Counts that must be at least 1, and at most :data:`MAX_COUNT`, when they are stated."""
MAX_COUNT = 10**9
NON_NEGATIVE = ("steps", "total_steps", "images", "peak_rss_bytes", "max_memory_allocated_bytes", "params",
                "param_count")
"""Counts that cannot be negative. A negative time or throughput is not dropped here: the suspect rules of
:mod:`cnnscale.records.checks` flag it where it is shown."""
_COUNTED = frozenset(POSITIVE + NON_NEGATIVE)
_PLACEHOLDERS = {Summary: {"status": "failed"}, Env: {},
                 Point: {"study": "", "id": "", "model": "m", "world_size": 1, "status": "failed"}}
"""Valid values of each record's required fields, to test one other value against."""


def _fits(cls: type[Record], key: str, value: Any) -> bool:
    try:
        cls.from_dict({**_PLACEHOLDERS[cls], key: value})
        return True
    except RecordError:
        return False


def _record(path: Path, cls: type[Record], notes: list[str]) -> Any:
    """``path/cls.FILE`` with every value that does not fit its field dropped (one note each); None when the file
    is absent, not JSON, newer than this code, or its required fields are unusable (one note)."""
    f = path / cls.FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"{cls.FILE} is corrupt ({type(exc).__name__})")
        return None
    if not isinstance(data, dict):
        notes.append(f"{cls.FILE} is not a JSON object")
        return None
    version = data.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version > SCHEMA_VERSION:
        notes.append(f"{cls.FILE} has schema_version {version!r}: this cnnscale reads up to {SCHEMA_VERSION}")
        return None
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kept: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            notes.append(f"{cls.FILE}: unknown key {key!r} ignored")
        elif _fits(cls, key, value):
            kept[key] = value
        else:
            notes.append(f"{cls.FILE}: {key} {value!r} does not fit its field; read as n/a")
    try:
        return cls.from_dict({"schema_version": 0, **kept})
    except RecordError as exc:
        notes.append(f"{cls.FILE} unusable ({exc})")
        return None


def _config(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((path / CONFIG).read_text()) if (path / CONFIG).is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return {k: v for k, v in cfg.items() if k in keys and isinstance(v, dict)} if isinstance(cfg, dict) else {}


def read_leniently(path: str | Path, config_keys: tuple[str, ...]) -> tuple[Run | None, list[str]]:
    """The run at ``path`` with what could be read, and a note per value or file left out; None when neither its
    summary.json nor its point.json is usable."""
    path, notes = Path(path), []
    summary = _record(path, Summary, notes)
    point = _record(path, Point, notes)
    if point is None and summary is not None:
        try:
            point = legacy_point(summary)
        except RecordError as exc:
            notes.append(str(exc))
    if summary is None and point is None:
        return None, notes
    env = _record(path, Env, notes) or Env(schema_version=0)
    return Run(path=str(path), summary=summary, env=env, point=point, config=_config(path, config_keys)), notes


def _bad(key: str, value: Any) -> str | None:
    """Why ``value`` of ``key`` cannot be a figure, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} is {value}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if key in POSITIVE and not 1 <= value <= MAX_COUNT:
            return f"{key} {value:g} is not a plausible count (1 to {MAX_COUNT:.0e})"
        if key in NON_NEGATIVE and value < 0:
            return f"{key} {value} is negative"
    return None


def _clean(record: Any, notes: list[str], what: str) -> Any:
    if record is None:
        return None
    bad = {}
    for key, value in vars(record).items():  # the fields' values (cheap: a report reads thousands of records)
        if (type(value) is float and not math.isfinite(value)) or (key in _COUNTED and value is not None):
            why = _bad(key, value)
            if why is not None:
                bad[key] = None
                notes.append(f"{what} {why}; read as n/a")
    return dataclasses.replace(record, **bad) if bad else record


def sanitize(run: Run) -> tuple[Run, list[str]]:
    """``run`` with every value that cannot be a figure (see the module docstring) set to None, and a note for each.
    Required fields of a point (its world size) that fail are noted but kept: the caller decides to skip the run."""
    notes: list[str] = []
    summary = _clean(run.summary, notes, "summary.json")
    env = _clean(run.env, notes, "env.json")
    point = run.point
    if point is not None:
        for key in ("world_size", "micro_batch", "global_batch", "grad_accum"):
            why = _bad(key, getattr(point, key))
            if why is not None:
                notes.append(f"point.json {why}")
    if summary is run.summary and env is run.env:
        return run, notes
    return dataclasses.replace(run, summary=summary, env=env), notes
