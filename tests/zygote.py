"""Real command-line processes without paying the torch import in each one.

A *zygote* is a process that has imported torch, Accelerate and the trainer once and then forks a fresh child per
command (multiprocessing's ``forkserver`` start method with a preload list). Each child is its own OS process:
it gets the command's argv, working directory and environment, runs the real entry point (``launch/train.py`` or
``python -m cnnscale``) as ``__main__``, writes to its own stdout and stderr files and ends with the command's exit
code, so exit codes, ``sys.exit``, uncaught exceptions and the files it leaves behave as from a shell. On this
2-core box a plain ``python launch/train.py`` spends 5-10 s of CPU importing before it reads its first flag; a
forked child starts in milliseconds.

What a forked child does not reproduce, and where the suite checks it with plain subprocesses instead:
- output printed while the preloaded modules import (a banner, a warning): the cases in tests/test_bad_inputs.py
  that run plainly (``PLAIN``) cover it;
- environment read once at import (``OMP_NUM_THREADS`` is read by the OpenMP runtime when torch loads): the zygote
  starts with the suite's ``OMP_NUM_THREADS=1``, and :func:`run` refuses an env that asks for another value;
- atexit handlers: a multiprocessing child ends with ``os._exit`` after flushing its streams.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["run"]

REPO = Path(__file__).resolve().parent.parent
PRELOAD = ["torch", "accelerate", "cnnscale.train.loop", "cnnscale.cli"]
_ctx: multiprocessing.context.ForkServerContext | None = None


def _context() -> multiprocessing.context.ForkServerContext:
    global _ctx
    if _ctx is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # read by the OpenMP runtime when the zygote imports torch
        try:
            from multiprocessing import forkserver

            forkserver.ensure_running()
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        _ctx = ctx
    return _ctx


def _child(argv: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In the forked child: become ``python ARGV...`` and run it as ``__main__``."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        runpy.run_path(argv[0], run_name="__main__")


def run(argv: list[str], *, cwd: str | Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``python ARGV...`` (a script path or ``-m module``) in a child forked from the zygote; the result reads
    like ``subprocess.run(..., capture_output=True, text=True)``'s. A child still running after ``timeout`` seconds
    is killed and raises ``subprocess.TimeoutExpired``, as subprocess.run does."""
    if env.get("OMP_NUM_THREADS", "1") != "1":
        raise ValueError("the zygote runs with OMP_NUM_THREADS=1; use a plain subprocess for another value")
    with tempfile.TemporaryDirectory(prefix="zygote-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _context().Process(target=_child, args=(list(argv), str(cwd), dict(env), out, err))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["python", *argv], timeout)
        return subprocess.CompletedProcess(["python", *argv], proc.exitcode, Path(out).read_text(),
                                           Path(err).read_text())
