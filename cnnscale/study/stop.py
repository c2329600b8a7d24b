"""How a study ends its points when it ends itself: on a signal, and when it is killed outright.

- SIGTERM, SIGINT and SIGHUP to the study raise :class:`StudyStopped` in the main thread (:func:`stop_on_signals`).
  The backend then ends the running point's process group (SIGTERM, a grace period, SIGKILL), the point is recorded
  as failed with the signal's name, and ``cnnscale study`` exits 128 + the signal's number.
- SIGKILL cannot be caught, so each point's launcher is started with the kernel's parent-death signal
  (``prctl(PR_SET_PDEATHSIG, SIGTERM)``, :func:`die_with_parent`): when the study dies, the launcher (torchrun,
  accelerate launch, or the 1-process trainer itself) gets SIGTERM, forwards it to its workers, and they stop at the
  next step with a checkpoint (status preempted), which a rerun of the study resumes. A worker whose launcher dies
  too stops the same way by itself (:func:`cnnscale.train.preempt.watch_parent`).

Nothing here imports torch. ``prctl`` exists on Linux only; elsewhere :func:`die_with_parent` is None and a killed
study leaves its point to its timeout.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["StudyStopped", "stop_on_signals", "die_with_parent", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


class StudyStopped(BaseException):
    """The study got one of :data:`STOP_SIGNALS` (a BaseException, like KeyboardInterrupt, so no ``except
    Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"the study got {self.name}")


def _raise(signum: int, frame: Any) -> None:
    raise StudyStopped(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM / SIGINT / SIGHUP raise :class:`StudyStopped`; the old handlers come back after."""
    old = {s: signal.signal(s, _raise) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _pdeathsig() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this thread's process dies (Linux), else None. The
    C function is looked up here, in the parent, so the child only makes one system call before ``exec``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    term, study = int(signal.SIGTERM), os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, term, 0, 0, 0)
        if os.getppid() != study:  # the study died between fork and prctl: the signal would never come
            os._exit(1)

    return preexec


die_with_parent = _pdeathsig()
"""``preexec_fn`` for :class:`subprocess.Popen`: the child gets SIGTERM when the study dies (None off Linux)."""
