"""The machinery under every record of a run directory: typed frozen fields, dict conversion, versioned JSON files.

A record is a frozen, keyword-only dataclass whose fields are the keys of one JSON file. :class:`Record` checks
each value against its field's annotation (``int``, ``float``, ``str``, ``bool``, ``dict``, ``list``, each
optionally ``| None``), refuses unknown keys, and writes every field, None as ``null``. Values that are not JSON
(NaN, inf) are written as ``null`` too, so the files are always valid JSON (``jq``, browsers).

Versions: a file carries ``schema_version``. A file without one was written before the schema existed (version 0)
and still reads; a version above :data:`SCHEMA_VERSION` is refused with one line (:class:`~cnnscale.errors.UserError`)
naming the file, its version and the highest this code knows. A file that does not parse, or whose keys or types do
not fit, raises :class:`RecordError` (a ValueError) naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cnnscale.errors import UserError
from cnnscale.records.io import atomic_write_text, finite

__all__ = ["Record", "RecordError", "SCHEMA_VERSION", "write_record", "read_record"]

SCHEMA_VERSION = 1
"""The highest schema version this code reads, and the one it writes. 0: records from before the schema."""

_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                       "dict": (dict,), "list": (list,)}

R = TypeVar("R", bound="Record")


class RecordError(ValueError):
    """A record that does not fit its schema: unknown keys, wrong types, or a file that is not a JSON object."""


@functools.cache  # annotations are strings: parse each once, not once per field per record
def _kind(annotation: Any) -> tuple[str, bool]:
    """(base type name, None allowed) of a field annotation such as ``"float | None"``."""
    parts = [p.strip() for p in str(annotation).split("|")]
    base = next(p for p in parts if p != "None").split("[")[0]
    return base, "None" in parts


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against ``annotation``: numpy/torch scalars become Python numbers, an integral float in an
    int field becomes an int (older files wrote byte counts as floats); anything else that does not fit raises."""
    base, nullable = _kind(annotation)
    if value is None:
        if nullable:
            return None
        raise RecordError(f"{name}: required, got null")
    if hasattr(value, "item") and not isinstance(value, dict | list | str):
        value = value.item()
    if base == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    if base in ("int", "float") and isinstance(value, bool):
        raise RecordError(f"{name}: expected {base}, got bool")
    if not isinstance(value, _TYPES[base]):
        raise RecordError(f"{name}: expected {base}, got {type(value).__name__}")
    return value


_EXACT: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                       "dict": (dict,), "list": (list,)}


@functools.cache
def _field_kinds(cls: type) -> tuple[tuple[str, Any, tuple[type, ...]], ...]:
    """Per field of ``cls``: name, annotation, and the exact value types that need no conversion (None among them
    when the field allows it). Computed once per class: a report reads thousands of records."""
    out = []
    for f in dataclasses.fields(cls):
        base, nullable = _kind(f.type)
        out.append((f.name, f.type, _EXACT[base] + ((type(None),) if nullable else ())))
    return tuple(out)


class Record:
    """Base of :class:`~cnnscale.records.schema.Env`, ``Summary`` and ``Point`` (see the module docstring)."""

    FILE: ClassVar[str] = ""
    LEGACY: ClassVar[tuple[str, ...]] = ()
    """Fields that only schema 0 files have: read, and left out of :meth:`to_dict` while None."""

    def __post_init__(self) -> None:
        for name, annotation, exact in _field_kinds(type(self)):
            value = getattr(self, name)
            if type(value) in exact:  # already the field's type (or None where allowed): nothing to convert
                continue
            object.__setattr__(self, name, _coerce(f"{type(self).__name__}.{name}", value, annotation))

    def to_dict(self) -> dict[str, Any]:
        """Every field, None included (except unset :attr:`LEGACY` ones), NaN and infinity as None (a copy)."""
        return finite({f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                       if not (f.name in self.LEGACY and getattr(self, f.name) is None)})

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        """The record of ``data``. Unknown keys, wrong types and missing required fields raise :class:`RecordError`."""
        if not isinstance(data, dict):
            raise RecordError(f"a {cls.__name__} is a JSON object, got {type(data).__name__}")
        known = {name for name, _, _ in _field_kinds(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecordError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            raise RecordError(f"{cls.__name__}: {exc}") from None


def write_record(run_dir: str | Path, record: Record) -> Path:
    """Write ``record`` atomically as ``run_dir/record.FILE`` at the current schema version; returns the path."""
    path = Path(run_dir) / record.FILE
    data = {**record.to_dict(), "schema_version": SCHEMA_VERSION}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def read_record(run_dir: str | Path, cls: type[R]) -> R:
    """Read ``run_dir/cls.FILE``. OSError when absent; :class:`RecordError` when corrupt; UserError when newer."""
    path = Path(run_dir) / cls.FILE
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: corrupt record ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: corrupt record (not a JSON object)")
    version = data.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise RecordError(f"{path}: corrupt record (schema_version {version!r} is not an integer)")
    if version > SCHEMA_VERSION:
        raise UserError(f"{path}: schema_version {version} is newer than this cnnscale reads (highest known: "
                        f"{SCHEMA_VERSION}); upgrade cnnscale to read it")
    try:
        return cls.from_dict({"schema_version": 0, **data})  # no version: written before the schema existed
    except RecordError as exc:
        raise RecordError(f"{path}: corrupt record ({exc})") from None
