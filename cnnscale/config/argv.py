"""The one command-line parser of cnnscale: every command's flags, one coercion, one error style.

:class:`CommandParser` is an :class:`argparse.ArgumentParser` that

- raises :class:`~cnnscale.errors.UserError` instead of printing usage and exiting, so
  :func:`~cnnscale.errors.run_cli` prints one line and exits 2 (``--help`` still prints help and exits 0);
- checks ``type=int`` / ``type=float`` / ``choices=`` with :func:`~cnnscale.config.coerce.coerce`:
  ``--steps: expected an integer, got 'x'``, ``--ratios: unknown value 'x' (choose from: a, b)``, and a number's
  range with the config fields' own :class:`~cnnscale.config.ranges.Range` (``add_argument(..., type=int, ge=1,
  cap=10**6)``: ``--steps must be >= 1, got 0``);
- turns a frozen dataclass into ``--section.field`` flags (:meth:`CommandParser.add_section`), each with the field's
  docstring as help and its default shown, and reads them back as that dataclass (:meth:`CommandParser.section`);
- names an unknown flag with the valid ones (``unknown option --x (valid: ...)``), an unknown ``--section.field``
  with the section's keys, and never abbreviates a flag.

A value may start with one dash (``--lr -1e-4``); ``--section.field-name`` is ``--section.field_name``.
Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

from cnnscale.config.coerce import coerce, field_docs, field_types, from_mapping, type_label
from cnnscale.config.ranges import Range, field_range, short
from cnnscale.errors import UserError

__all__ = ["CommandParser", "show_default", "choice_type", "number_type"]


def show_default(value: Any) -> str:
    """A default as a user would type it: ``true``, ``0.1``, ``[100.0, 150.0]``, ``''``, ``null``."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(show_default(v) for v in value) + "]"
    return repr(value) if value == "" else str(value)


_RANGE_KEYS = ("ge", "gt", "le", "lt", "cap")


def number_type(flag: str, tp: type, rng: Range | None = None) -> Callable[[str], Any]:
    """argparse ``type=`` for an int/float flag, through :func:`coerce` (``--steps: expected an integer, ...``),
    then ``rng`` (``--steps must be >= 1, got 0``)."""
    def convert(text: str) -> Any:
        value = coerce(flag, text, tp, text=True)
        if rng is not None:
            rng.check(flag, value)
        return value
    convert.__name__ = tp.__name__
    return convert


def choice_type(flag: str, choices: Sequence[Any], tp: Callable[[str], Any] | None = None) -> Callable[[str], Any]:
    """argparse ``type=`` that allows only ``choices``: ``--flag: unknown value 'x' (choose from: a, b)``."""
    def convert(text: str) -> Any:
        value = tp(text) if tp is not None else text
        if value not in choices:
            raise UserError(f"{flag}: unknown value {short(value)} (choose from: {', '.join(map(str, choices))})")
        return value
    return convert


def _flag_name(args: Sequence[str], kwargs: Mapping[str, Any]) -> str:
    longs = [a for a in args if a.startswith("--")]
    return (longs or list(args) or [str(kwargs.get("dest", "value"))])[0]


def _typed(args: Sequence[str], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Route argparse's ``type=int|float`` (with ``ge=``/``gt=``/``le=``/``lt=``/``cap=`` bounds) and ``choices=``
    through the one coercion, range check and error style."""
    flag = _flag_name(args, kwargs)
    tp = kwargs.get("type")
    bounds = {k: kwargs.pop(k) for k in _RANGE_KEYS if k in kwargs}
    if bounds and tp not in (int, float):
        raise TypeError(f"{flag}: range bounds need type=int or type=float")
    if tp in (int, float):
        kwargs["type"] = tp = number_type(flag, tp, Range(**bounds) if bounds else None)
    if kwargs.get("choices") is not None:
        choices = tuple(kwargs.pop("choices"))
        kwargs["type"] = choice_type(flag, choices, tp)
        kwargs.setdefault("metavar", "{" + ",".join(map(str, choices)) + "}")
    return kwargs


def _section_title(name: str, cls: type) -> str:
    """``name: first line of the class docstring`` (just ``name`` for dataclass's generated docstring)."""
    doc = (cls.__doc__ or "").strip().splitlines()[0].rstrip(".") if (cls.__doc__ or "").strip() else ""
    if not doc or doc.startswith(f"{cls.__name__}("):
        return name
    return doc if doc.startswith(f"{name}:") else f"{name}: {doc}"


def _checked(group: Any) -> Any:
    """An argparse group whose add_argument applies the same checks as :meth:`CommandParser.add_argument`."""
    plain = group.add_argument
    group.add_argument = lambda *a, **kw: plain(*a, **_typed(a, kw))
    return group


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` unless the help already says it, the default is None, or the flag takes no value."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.nargs == 0:
            return text
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """argparse for a cnnscale command: errors are one-line UserErrors, flags are never abbreviated.

    Cost: building one is cheap (no torch); :meth:`add_section` reads the dataclass's source once per class.
    """

    def __init__(self, prog: str | None = None, description: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(prog=prog, description=description, **kwargs)
        self._sections: dict[str, type] = {}
        self._section_flags: dict[str, tuple[str, str]] = {}  # dest "sec.field" -> (sec, field)

    # ------------------------------------------------------------------------------------------- building
    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        return super().add_argument(*args, **_typed(args, kwargs))

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        return _checked(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs: Any) -> Any:
        return _checked(super().add_mutually_exclusive_group(**kwargs))

    def add_section(self, name: str, cls: type, *, aliases: Mapping[str, str] | None = None,
                    title: str | None = None) -> None:
        """``--name.field VALUE`` for every field of the dataclass ``cls`` (help: its docstring and default), plus
        ``aliases`` such as ``{"--teacher": "teacher"}``. Bool fields also take a bare flag (true)."""
        self._sections[name] = cls
        for flag, fld in (aliases or {}).items():
            self.add_alias(flag, f"{name}.{fld}")
        group = self.add_argument_group(title or _section_title(name, cls))
        for f in dataclasses.fields(cls):
            dest = f"{name}.{f.name}"
            self._section_flags[dest] = (name, f.name)
            group.add_argument(f"--{dest}", **self._field_kwargs(cls, f.name, dest))

    def add_alias(self, flag: str, dest: str, *, optional: Any = None) -> None:
        """A short flag for a section field (``--lr`` for ``optim.lr``); last one given wins. ``optional``: the
        value when the flag is given bare (``--resume`` alone means ``auto``)."""
        sec, _, fld = dest.partition(".")
        kw = self._field_kwargs(self._sections[sec], fld, dest) if sec in self._sections else {"dest": dest}
        bare = f" (given bare: {optional})" if optional is not None else ""
        kw["help"] = f"= --{dest}{bare}. {kw.get('help', '')}"
        if optional is not None:
            kw.update(nargs="?", const=optional)
        super().add_argument(flag, **kw)

    @staticmethod
    def _field_kwargs(cls: type, fld: str, dest: str) -> dict[str, Any]:
        f = next(x for x in dataclasses.fields(cls) if x.name == fld)
        tp = field_types(cls)[fld]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "required" if default is dataclasses.MISSING else f"default: {show_default(default)}"
        doc = field_docs(cls).get(fld, "")
        rng = field_range(cls, fld)
        choices = rng.choices if rng is not None else None
        metavar = "{" + ",".join(choices) + "}" if choices and tp is str else type_label(tp)
        kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "metavar": metavar,
                              "type": lambda text: coerce(dest, text, tp, text=True),
                              "help": (doc if "default" in doc else f"{doc} ({shown})").replace("%", "%%").lstrip()}
        if tp is bool:
            kw.update(nargs="?", const=True)
        return kw

    # ------------------------------------------------------------------------------------------- parsing
    def _prepare(self, args: Iterable[str]) -> list[str]:
        """``--sec.field-name`` -> ``--sec.field_name``; ``--flag -value`` -> ``--flag=-value`` (values may start
        with one dash, as in ``--lr -1e-4``). Stops at ``--``."""
        out: list[str] = []
        items = list(args)
        i = 0
        while i < len(items):
            arg = items[i]
            if arg == "--":
                return out + items[i:]
            key, eq, val = arg.partition("=")
            sec, dot, fld = key[2:].partition(".")
            if key.startswith("--") and dot and sec in self._sections:
                key = f"--{sec}.{fld.replace('-', '_')}"
            action = self._option_string_actions.get(key)
            nxt = items[i + 1] if i + 1 < len(items) else ""
            if (not eq and action is not None and action.nargs in (None, "?") and nxt.startswith("-")
                    and not nxt.startswith("--") and nxt != "-"):
                out.append(f"{key}={nxt}")
                i += 2
                continue
            out.append(key + eq + val)
            i += 1
        return out

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """Like argparse's, after :meth:`_prepare`; unknown arguments are returned, not refused."""
        return super().parse_known_args(self._prepare(sys.argv[1:] if args is None else args), namespace)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """Parse every argument; anything unknown is a one-line UserError naming the valid flags."""
        ns, rest = self.parse_known_args(args, namespace)
        if rest:
            raise self.unknown(rest)
        return ns

    def unknown(self, rest: Sequence[str]) -> UserError:
        """The error for the first of ``rest`` (arguments this parser does not know)."""
        arg = rest[0]
        if not arg.startswith("-"):
            forms = "--flag value" + (" or --section.field value" if self._sections else "")
            return UserError(f"unexpected argument {short(arg)} (options are {forms})")
        key = arg.partition("=")[0]
        sec, dot, fld = key[2:].partition(".")
        if dot and self._sections and key.startswith("--"):
            if sec not in self._sections:
                return UserError(f"command line: unknown section {short(sec)} "
                                 f"(choose from: {', '.join(self._sections)})")
            return UserError(f"command line: unknown key {short(f'{sec}.{fld}')} "
                             f"(valid keys: {', '.join(field_types(self._sections[sec]))})")
        valid = [o for a in self._actions for o in a.option_strings
                 if o.startswith("--") and o != "--help" and not (a.dest in self._section_flags and o == f"--{a.dest}")]
        valid += ["--section.field"] if self._sections else []
        return UserError(f"unknown option {key[:200]} (valid: {', '.join(valid)})")

    def error(self, message: str) -> NoReturn:
        """argparse's errors as one-line UserErrors (``--lr needs a value``)."""
        text = message.removeprefix("argument ")
        flag, sep, what = text.partition(": ")
        if sep and what == "expected one argument":
            text = f"{flag} needs a value"
        raise UserError(text)

    # ------------------------------------------------------------------------------------------- reading back
    def given(self, ns: argparse.Namespace, name: str) -> dict[str, Any]:
        """The fields of section ``name`` given on the command line, as ``{field: value}`` (coerced)."""
        return {fld: getattr(ns, dest) for dest, (sec, fld) in self._section_flags.items()
                if sec == name and hasattr(ns, dest)}

    def section(self, ns: argparse.Namespace, name: str) -> Any:
        """Section ``name`` as its dataclass: defaults, then the flags given; range checks in its __post_init__."""
        return from_mapping(self._sections[name], self.given(ns, name), "command line", f"{name}.")

    def overrides(self, ns: argparse.Namespace, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """``{section: {field: value}}`` of the flags given, for the sections ``names`` (default: all)."""
        out = {n: self.given(ns, n) for n in (self._sections if names is None else names)}
        return {n: v for n, v in out.items() if v}
