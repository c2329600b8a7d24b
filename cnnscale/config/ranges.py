"""The valid values of every config field, declared beside the field, and the one validator that reads them.

A field is declared with :func:`setting` (``lr: float = setting(0.1, gt=0)``); its :class:`Range` lives in the
dataclass field's metadata, next to its docstring. :func:`check_fields` checks every field of an instance against
its range, so a range cannot be forgotten: ``__post_init__`` holds only cross-field rules. The same :class:`Range`
checks study-spec keys and every command's own flags (:func:`cnnscale.config.argv.number_type`).

Messages quote values through :func:`short`, which never renders more than ~200 characters of a value, however
large or deeply nested it is. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass, field
from typing import Any

from cnnscale.errors import UserError

__all__ = ["Range", "setting", "field_range", "check_fields", "check_value", "short", "RANGE", "SEED_LIMIT",
           "PATH_MAX", "NAME_MAX"]

RANGE = "cnnscale.range"  # the metadata key of a field's Range
SEED_LIMIT = 2**32  # seeds are in [0, 2**32): numpy's legacy seeding and most tools refuse larger or negative ones
PATH_MAX, NAME_MAX = 4096, 255  # Linux limits, in bytes: whole path, one component
SHORT = 200  # characters of a value quoted in an error message

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict, _repr.maxset = 3, 8, 8, 8, 8
_repr.maxstring, _repr.maxother, _repr.maxlong = SHORT, SHORT, 60


def short(value: Any, limit: int = SHORT) -> str:
    """``repr(value)`` cut to about ``limit`` characters. Cost: bounded by the limit, not by the value's size
    (reprlib stops at a few levels and items, so an alias-expanded YAML structure prints in microseconds)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}...({len(value)} chars)"
    text = _repr.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


@dataclass(frozen=True)
class Range:
    """What a field accepts beyond its type. Bounds apply to a number, or to each item of a tuple.

    ``ge``/``gt``/``le``/``lt`` are the meaning of the field (momentum in [0, 1)); ``cap`` is a sanity limit above
    which a value would only exhaust memory or time. ``free`` says why the type is the whole rule."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    cap: float | None = None
    choices: tuple[str, ...] | None = None
    nonempty: bool = False
    path: bool = False
    max_len: int = 4096
    min_len: int = 0
    free: str = ""

    def describe(self) -> str:
        """The range as text for help and errors: ``in [0, 1)``, ``>= 1``, ``one of: a, b``, ``any``."""
        if self.choices is not None:
            return f"one of: {', '.join(self.choices)}"
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        parts = [f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}" if self.gt is not None
                 else "", f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}"
                 if self.lt is not None else ""]
        return " and ".join(p for p in parts if p) or "any"

    def _number_ok(self, v: float) -> bool:
        return not ((self.ge is not None and not v >= self.ge) or (self.gt is not None and not v > self.gt)
                    or (self.le is not None and not v <= self.le) or (self.lt is not None and not v < self.lt))

    def _check_number(self, key: str, v: float) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{key} must be a finite number, got {short(v)}")
        if not self._number_ok(v):
            raise UserError(f"{key} must be {self.describe()}, got {short(v)}")
        if self.cap is not None and v > self.cap:
            raise UserError(f"{key} must be <= {_num(self.cap)} (a sanity limit: more would only exhaust memory or "
                            f"time), got {short(v)}")

    def _check_text(self, key: str, v: str) -> None:
        if self.choices is not None and v not in self.choices:
            raise UserError(f"{key}: unknown value {short(v)} (choose from: {', '.join(self.choices)})")
        if len(v) < self.min_len:
            raise UserError(f"{key} must not be empty" if self.min_len == 1 else
                            f"{key} must be at least {self.min_len} characters, got {short(v)}")
        if len(v) > self.max_len:
            raise UserError(f"{key} is {len(v)} characters long (at most {self.max_len}): {short(v)}")
        if self.path:
            _check_path(key, v)

    def check(self, key: str, value: Any) -> None:
        """Raise a one-line :class:`UserError` naming ``key`` when ``value`` is outside the range."""
        if isinstance(value, tuple | list):
            self._check_items(key, tuple(value))
        elif isinstance(value, bool) or value is None:
            return
        elif isinstance(value, int | float):
            self._check_number(key, value)
        elif isinstance(value, str):
            self._check_text(key, value)

    def _check_items(self, key: str, values: tuple[Any, ...]) -> None:
        if self.choices is not None:
            if self.nonempty and not values:
                raise UserError(f"{key} must name at least one of: {', '.join(self.choices)}")
            for v in values:
                self._check_text(key, v)
            return
        kind = "integers" if all(isinstance(v, int) for v in values) else "numbers"
        got = short(list(values))
        if self.nonempty and not values:
            raise UserError(f"{key} must be {kind} {self.describe()}, got []")
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{key} must be finite {kind}, got {got}")
            if isinstance(v, int | float) and not self._number_ok(v):
                raise UserError(f"{key} must be {kind} {self.describe()}, got {got}")
            if isinstance(v, int | float) and self.cap is not None and v > self.cap:
                raise UserError(f"{key} must be {kind} <= {_num(self.cap)} (a sanity limit), got {got}")


def _check_path(key: str, value: str) -> None:
    """A path the file system can hold: no NUL byte, each component <= NAME_MAX bytes, the whole <= PATH_MAX."""
    if "\x00" in value:
        raise UserError(f"{key}: a path cannot contain a NUL byte: {short(value)}")
    raw = value.encode("utf-8", "surrogateescape")
    if len(raw) > PATH_MAX:
        raise UserError(f"{key}: path is {len(raw)} bytes long (at most {PATH_MAX}): {short(value)}")
    for part in value.split("/"):
        size = len(part.encode("utf-8", "surrogateescape"))
        if size > NAME_MAX:
            raise UserError(f"{key}: path component {short(part, 60)} is {size} bytes long "
                            f"(a file name is at most {NAME_MAX})")


def setting(default: Any, **rules: Any) -> Any:
    """A dataclass field with ``default`` and its :class:`Range` (``ge=``, ``gt=``, ``le=``, ``lt=``, ``cap=``,
    ``choices=``, ``nonempty=``, ``path=``, ``max_len=``, ``min_len=``, ``free=``) in its metadata."""
    return field(default=default, metadata={RANGE: Range(**rules)})


def field_range(cls: type, name: str) -> Range | None:
    """The :class:`Range` declared for field ``name`` of dataclass ``cls`` (None: none declared)."""
    f = next((x for x in dataclasses.fields(cls) if x.name == name), None)
    return f.metadata.get(RANGE) if f is not None else None


def check_value(key: str, value: Any, rng: Range | None) -> None:
    """Check one value against a range (nothing to check when ``rng`` is None)."""
    if rng is not None:
        rng.check(key, value)


def check_fields(obj: Any, prefix: str = "") -> None:
    """The one validator: every field of the dataclass instance ``obj`` against its declared :class:`Range`; errors
    name ``prefix + field`` (``train.micro_batch must be >= 1, got 0``). Nested dataclasses are skipped (each
    checks itself). Call it from ``__post_init__``."""
    for f in dataclasses.fields(obj):
        rng = f.metadata.get(RANGE)
        if rng is not None:
            rng.check(f"{prefix}{f.name}", getattr(obj, f.name))
