"""YAML that cannot hurt: the one reader of config files, study files and command-line values.

- UTF-8 only (a BOM is fine); any other encoding is one line with the byte offset of the first bad byte.
- At most :data:`MAX_BYTES` per file and :data:`MAX_DEPTH` levels of nesting (PyYAML's composer recurses).
- No aliases (``*name``): a 343-byte "billion laughs" document would otherwise expand, wherever it is printed or
  walked, to gigabytes. Anchors alone are harmless and allowed; an alias is refused where it appears.
- A duplicate key in one mapping is an error (PyYAML keeps the last one in silence).

Every failure is a one-line :class:`~cnnscale.errors.UserError` that names the file and the line. Cost: one pass of
PyYAML's pure-Python loader (about 1 ms for a recipe). Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode

from cnnscale.config.ranges import short
from cnnscale.errors import UserError

__all__ = ["load_yaml_text", "read_yaml_file", "MAX_BYTES", "MAX_DEPTH"]

MAX_BYTES = 1 << 20  # a config or study file is a few kB; 1 MiB leaves room and bounds the parse to ~1 s
MAX_DEPTH = 64
_MERGE = "tag:yaml.org,2002:merge"


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader without aliases, with a nesting limit and with duplicate keys refused."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ComposerError(None, None, f"YAML aliases are not allowed (*{event.anchor[:40]}): write the "
                                "value out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own check reports it
                    continue
                if first is not None:
                    raise ConstructorError(None, None, f"duplicate key {short(key)} (first at line {first + 1})",
                                           key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_error(src: str, exc: yaml.YAMLError) -> UserError:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    return UserError(f"{src}: YAML syntax error{where}: {problem[:300] + '...' if len(problem) > 300 else problem}")


def load_yaml_text(text: str, src: str) -> Any:
    """Parse YAML ``text`` with the rules of this module; errors name ``src``."""
    try:
        loader = _SafeLoader(text)  # a SafeLoader subclass: what yaml.safe_load does, with this module's rules
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise _yaml_error(src, exc) from None
    except (ValueError, RecursionError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
        raise UserError(f"{src}: unreadable YAML value: {' '.join(str(exc).split())[:200]}") from None


def _decode(data: bytes, src: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{src}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}); "
                        "save the file as UTF-8") from None


def read_yaml_file(path: str | Path) -> Any:
    """Read and parse a YAML file: a missing file, a file over :data:`MAX_BYTES`, bad encoding or bad YAML is a
    one-line UserError naming it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {str(p)[:300]}")
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"{p}: larger than {MAX_BYTES} bytes; a config or study file is a few kB")
    return load_yaml_text(_decode(data, str(p)), str(p))
