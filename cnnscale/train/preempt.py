"""Preemption: stop at an optimiser-step boundary with a checkpoint when SIGUSR1, SIGTERM or SIGINT arrives.

A signal handler only sets a flag. At each optimiser-step boundary the ranks agree whether any of them was signalled
(a MAX all-reduce of one integer, see :meth:`SignalGuard.requested`); if so every rank saves the checkpoint together,
rank 0 writes ``summary.json`` with status ``preempted``, and the process exits with :data:`EXIT_PREEMPTED`
(SIGUSR1, SIGTERM) or :data:`EXIT_INTERRUPTED` (SIGINT: Ctrl-C). ``--resume RUN_DIR`` carries on from that step.

Why the ranks must agree: SLURM may signal one node before another, and a rank that stopped alone would leave the
others blocked in the next gradient all-reduce. The vote is a blocking all-reduce of a one-element *CPU* tensor on
a gloo group (the default group on CPU, a side group next to NCCL on GPUs), so it never adds a GPU sync point.

Under SLURM, ``slurm/train.sbatch`` forwards the batch shell's SIGUSR1 (``#SBATCH --signal=B:USR1@120``) to the
step; ``accelerate launch`` ignores it (``trap '' USR1`` before ``exec``), the training processes catch it. Under a
plain ``accelerate launch`` the launcher forwards SIGINT/SIGTERM to the workers and waits 30 s for them, enough to
save a checkpoint. Repeated signals are ignored (the launcher re-sends the one it got); use SIGQUIT or SIGKILL to
abort without a checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["SignalGuard", "preempted_summary", "stop_message", "exit_code", "install_early", "watch_parent",
           "EXIT_PREEMPTED", "EXIT_INTERRUPTED", "EXIT_DIVERGED", "HANDLED_SIGNALS"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", which is what a requeue does
EXIT_INTERRUPTED = 130  # the shell convention for SIGINT
EXIT_DIVERGED = 3  # a non-finite loss stopped the run (cnnscale.train.diverge); 2 stays "bad input"
HANDLED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

_early: dict[str, int] = {}  # signal number caught by install_early() before the guard existed


def _early_handler(signum: int, frame: Any) -> None:
    _early.setdefault("signum", signum)


def install_early() -> None:
    """Catch SIGUSR1 from process start, so a preemption notice that arrives while torch is still importing is kept
    (its default action would kill the process without a checkpoint). SIGTERM/SIGINT keep their defaults until the
    training loop starts, so a run stuck in start-up can still be stopped."""
    signal.signal(signal.SIGUSR1, _early_handler)


class SignalGuard:
    """Context manager: install flag-setting handlers on enter, restore the previous ones on exit.

    ``requested(step)`` is called by every rank at every optimiser-step boundary; it returns the same answer on all
    ranks. ``every`` > 1 votes only every that many steps (a preemption then waits up to ``every`` steps).
    """

    def __init__(self, accelerator: Any = None, every: int = 1, signals: tuple[int, ...] = HANDLED_SIGNALS) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.signals = signals
        self.signum: int | None = _early.pop("signum", None)
        self._previous: dict[int, Any] = {}
        self._group: Any = None
        self._buf: Any = None
        self._world = getattr(accelerator, "num_processes", 1) if accelerator is not None else 1

    # ------------------------------------------------------------------------------------------ handlers
    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is None:  # the first signal decides the exit code; repeats are ignored
            self.signum = signum

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        if self._world > 1:
            self._setup_vote()
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous.clear()

    def _setup_vote(self) -> None:
        # torch is imported here, not at the top: install_early() runs before the entry points' slow torch import.
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():  # several processes but no process group: nothing to agree with
            self._world = 1
            return
        # A CPU tensor on a gloo group: no CUDA sync. new_group is collective, so every rank creates it here.
        self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._buf = torch.zeros(1, dtype=torch.int32)

    # ------------------------------------------------------------------------------------------ the vote
    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def requested(self, step: int) -> bool:
        """True on every rank when any rank has been signalled (checked every ``every`` steps)."""
        if step % self.every:
            return False
        if self._world == 1:
            return self.signum is not None
        import torch.distributed as dist  # loaded by _setup_vote already; see there why not at the top

        self._buf.fill_(self.signum or 0)
        dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self._group)  # note: blocking, ~0.1 ms on gloo
        agreed = int(self._buf.item())
        if agreed and self.signum is None:
            self.signum = agreed
        return bool(agreed)


def preempted_summary(signal_name: str | None, *, model: str, world_size: int, steps: int, epochs_done: int,
                      total_steps: int, wall_s: float, run_dir: Path) -> dict[str, Any]:
    """The ``summary.json`` of a run stopped by a signal at optimiser step ``steps``, with its resume hint."""
    return {"status": "preempted", "signal": signal_name, "model": model, "world_size": world_size, "steps": steps,
            "epochs_done": epochs_done, "total_steps": total_steps, "wall_s": wall_s, "resume": f"--resume {run_dir}"}


def stop_message(summary: dict[str, Any], run_dir: Path) -> str:
    """The one line printed by rank 0 when a run stops on a signal."""
    return (f"preempted by {summary['signal']} at step {summary['steps']}/{summary['total_steps']}: checkpoint saved "
            f"in {run_dir}/checkpoints (resume with --resume {run_dir})")


def exit_code(summary: dict[str, Any]) -> int:
    """0 for a finished run, 130 after Ctrl-C, 75 after SIGUSR1/SIGTERM (requeue me), 3 when the loss diverged
    (status ``diverged``), 1 otherwise."""
    status = summary.get("status")
    if status == "ok":
        return 0
    if status == "diverged":
        return EXIT_DIVERGED
    if status == "preempted":
        return EXIT_INTERRUPTED if summary.get("signal") == "SIGINT" else EXIT_PREEMPTED
    return 1


def watch_parent(interval_s: float = 1.0, grace_s: float = 10.0) -> threading.Thread | None:
    """Under a launcher (torchrun, accelerate launch, a study's direct launch), stop this worker if the launcher dies.

    The launchers start each worker in its own session, so a SIGKILLed launcher would otherwise leave its workers
    training on their own. A daemon thread polls ``getppid()``; when the parent changes (re-parented to init or a
    subreaper) the worker sends itself SIGTERM, so it stops at the next step boundary with a checkpoint like any
    preempted run (its peers, which see the same death, agree on the step: :class:`SignalGuard`), and exits with
    status 1 if it is still alive ``grace_s`` later (a rank blocked on a peer that is gone). Exiting at once instead
    raced the direct launcher's own death signal (``PR_SET_PDEATHSIG``: SIGTERM) and could cut a checkpoint short.
    Returns the thread, or None outside a launcher.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    parent = os.getppid()

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os.write(2, f"cnnscale: launcher (pid {parent}) is gone; stopping at the next step\n".encode())
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat of the death signal is ignored (SignalGuard)
        time.sleep(grace_s)
        os.write(2, f"cnnscale: not stopped {grace_s:.0f} s after the launcher died; rank exiting\n".encode())
        os._exit(1)

    t = threading.Thread(target=loop, name="cnnscale-parent-watch", daemon=True)
    t.start()
    return t
