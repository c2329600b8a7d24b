"""The one type coercion of cnnscale: YAML values, command-line text and study specs all go through :func:`coerce`.

Values are checked against a dataclass field's annotation (``int``, ``float``, ``bool``, ``str``, ``X | None``,
``tuple[X, ...]``). Errors are one-line :class:`~cnnscale.errors.UserError` naming the key:
``train.micro_batch: expected an integer, got 'lots'``. Nothing here imports torch.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from cnnscale.config.ranges import short
from cnnscale.config.yamlfile import load_yaml_text
from cnnscale.errors import UserError

__all__ = ["coerce", "parse_text", "field_types", "field_docs", "from_mapping", "type_label"]

T = TypeVar("T")


def parse_text(text: str) -> Any:
    """A command-line value read as a YAML scalar or flow list (``8`` -> 8, ``true`` -> True, ``[1, 2]``), by the
    same safe reader as config files (:mod:`cnnscale.config.yamlfile`)."""
    try:
        return load_yaml_text(text, "command line") if text != "" else ""
    except UserError:  # not YAML (or an alias, a duplicate key, an over-long integer): the text itself
        return text


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _scalar(key: str, value: Any, tp: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true/false, got {short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{key}: expected an integer, got {short(value)}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{key}: expected a number, got {short(value)}")
    if tp is str:
        if value is False:  # YAML 1.1 reads a bare `no` (mixed_precision: no) as false
            return "no"
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{key}: expected a string, got {short(value)}")
    return value


def coerce(key: str, value: Any, tp: Any, *, text: bool = False) -> Any:
    """Check and convert ``value`` to the annotation ``tp``; ``key`` names it in the error.

    ``text=True``: ``value`` is command-line text. A ``str`` field keeps it verbatim (``no``, ``1e-4``, ``007``);
    any other type reads it as YAML first. A scalar given for a ``tuple[X, ...]`` field becomes a 1-tuple.
    """
    inner, optional = _unwrap_optional(tp)
    if text and inner is not str:
        value = parse_text(value)
    if optional and value is None:
        return None
    if typing.get_origin(inner) is tuple:
        item = typing.get_args(inner)[0]
        values = value if isinstance(value, list | tuple) else [value]
        return tuple(coerce(key, v, item) for v in values)
    return _scalar(key, value, inner)


def type_label(tp: Any) -> str:
    """Metavar for a field type: INT, FLOAT, BOOL, STR, LIST."""
    inner, _ = _unwrap_optional(tp)
    if typing.get_origin(inner) is tuple:
        return "LIST"
    return getattr(inner, "__name__", "VALUE").upper()


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """``{field: resolved annotation}`` of a dataclass (annotations are strings under PEP 563)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}``: the string literal under each field of a dataclass, read from its source (once per
    class; ``{}`` when the source is not available, e.g. a bytecode-only install)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def from_mapping(cls: type[T], values: Mapping[str, Any], where: str, prefix: str = "", *,
                 base: T | None = None, text: bool = False) -> T:
    """Build (or, with ``base``, update) a frozen dataclass from a mapping: every key known, every value coerced to
    its field's type, then the class's own ``__post_init__`` range checks. Errors name ``where`` and the key
    (``prefix`` + field, e.g. ``train.lr``)."""
    types_ = field_types(cls)
    kw = {}
    for k, v in values.items():
        if k not in types_:
            raise UserError(f"{where}: unknown key {short(f'{prefix}{k}')} (valid keys: {', '.join(types_)})")
        kw[k] = coerce(f"{prefix}{k}", v, types_[k], text=text)
    try:
        return dataclasses.replace(base, **kw) if base is not None else cls(**kw)
    except TypeError as exc:  # a missing required field, or a __post_init__ comparing a wrong type
        raise UserError(f"{where}: invalid {prefix.rstrip('.') or cls.__name__}: {exc}") from None
