"""User-facing errors: one line on stderr, exit code 2, traceback only with ``--debug``.

Every command entry point runs through :func:`run_cli`. Code anywhere in the package raises :class:`UserError` for
bad input (unknown names, bad values, missing files); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["UserError", "run_cli", "choices_error", "EXIT_USAGE", "write_error"]

EXIT_USAGE = 2


class UserError(Exception):
    """An error caused by the user's input. Its message is printed as one line, without a traceback."""


def choices_error(kind: str, value: object, choices: Sequence[str]) -> UserError:
    """``unknown model 'foo' (choose from: a, b, c)``."""
    return UserError(f"unknown {kind} {value!r} (choose from: {', '.join(sorted(choices))})")


_WRITE_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
                 errno.EACCES: "permission denied", errno.EPERM: "not permitted", errno.ENOTDIR: "not a directory"}


def write_error(exc: BaseException, path: str | os.PathLike[str], what: str) -> UserError | None:
    """A one-line :class:`UserError` when ``exc`` means the output could not be written (disk full, quota, read-only,
    permissions), else None. Serialisers hide the errno: safetensors says "os error 28", and ``torch.save`` only says
    "unexpected pos", so a filesystem with under 1 MiB free also counts as full."""
    code = exc.errno if isinstance(exc, OSError) else None
    text = str(exc)
    if code is None and ("os error 28" in text or "No space left" in text):
        code = errno.ENOSPC
    if code is None and "os error 122" in text:
        code = errno.EDQUOT
    if code is None:
        try:
            existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
            if shutil.disk_usage(existing).free < 1 << 20:
                code = errno.ENOSPC
        except (OSError, StopIteration):
            pass
    if code not in _WRITE_ERRNOS:
        return None
    return UserError(f"{_WRITE_ERRNOS[code]}: could not write {what} ({path}): {os.strerror(code)}")


def _debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("CNNSCALE_DEBUG", "") not in ("", "0")


def run_cli(fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, prog: str = "cnnscale") -> int:
    """Call ``fn(argv)`` and turn a :class:`UserError` into a one-line message and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        return int(fn(argv) or 0)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        msg = " ".join(str(exc).split())  # always one line
        sys.stderr.write(f"{prog}: error: {msg}\n")  # one write: ranks printing at once do not interleave a line
        sys.stderr.flush()
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cnnscale study --dry-run | head`: the reader left; say nothing more, exit as SIGPIPE
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 128 + 13
