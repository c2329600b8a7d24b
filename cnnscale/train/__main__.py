"""``accelerate launch -m cnnscale.train`` / ``torchrun -m cnnscale.train`` / ``python -m cnnscale.train``.

The process ends right after the run, with ``gc.freeze()`` first, so that the interpreter's exit does not walk the
~300,000 objects torch, torch._dynamo and sympy left behind with its final garbage collections (about 1 s of CPU
per process on a 2-core box, paid by every rank of every study point). The run has already released what must be
released (its DDP wrapper and process group: :func:`cnnscale.train.loop.run` collects and destroys them before it
returns), and objects still alive at exit are not promised a ``__del__`` anyway. Only when a communication thread
is still alive (gloo's or NCCL's, which ``run`` should have joined: the abort at exit that the import order in
:mod:`cnnscale.train.build` prevents) is the exit left exactly as it was, so that such a bug still shows.
"""

import gc
import os
import sys
from typing import NoReturn

from cnnscale.errors import run_cli
from cnnscale.train.cli import main

__all__ = ["COMM_THREADS", "comm_threads", "comm_threads_alive", "finish"]

COMM_THREADS = ("pt_gloo", "gloo", "pt_nccl", "nccl")
"""Prefixes of the OS thread names of torch.distributed's gloo and NCCL threads (pt_gloo_runloop, gloo_tcp_loop,
pt_nccl_watchdg, ...)."""


def comm_threads() -> list[str] | None:
    """The OS names of this process's threads that are named like a gloo or NCCL thread (Linux
    ``/proc/self/task``); None where that cannot be read. Costs reading one small file per thread."""
    try:
        with os.scandir("/proc/self/task") as tasks:
            paths = [os.path.join(t.path, "comm") for t in tasks]
    except OSError:
        return None
    names = []
    for path in paths:
        try:
            with open(path) as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        except OSError:
            return None
    return [name for name in names if name.startswith(COMM_THREADS)]


def comm_threads_alive() -> bool:
    """Whether a gloo or NCCL thread of this process still runs (True where that cannot be known)."""
    return comm_threads() != []


def finish(code: int) -> NoReturn:
    """End the process with ``code``, freezing the GC first when no communication thread is alive (see the module
    docstring): the exit of ``python -m cnnscale.train`` and of ``launch/train.py``."""
    if not comm_threads_alive():
        gc.freeze()  # exiting now: skip the final collections' walk over every object alive (see the docstring)
    sys.exit(code)


if __name__ == "__main__":
    finish(run_cli(main, prog="cnnscale.train"))
