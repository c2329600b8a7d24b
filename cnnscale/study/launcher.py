"""Running one study point as a real multi-process launch, and classifying how it ended.

A *backend* turns a point's argument list into an :class:`Outcome`. :class:`LocalBackend` starts the launcher as a
subprocess in its own session and process group (argument list, never a shell), in the study's own working
directory, with a per-point timeout that ends the whole group; the launcher also gets SIGTERM if the study dies
(:mod:`cnnscale.study.stop`). Other backends (SLURM) implement the same ``run`` method and are registered in
:data:`BACKENDS`.

A launch *target* is a module of the installed package (``cnnscale.train``, started with ``-m``), or a script path
(a name ending in ``.py``). Nothing here depends on where the package was installed from.

Launch forms (see ../shared/STACK-FACTS.md for the forms that silently run world size 1):

- world size 1: ``python -m cnnscale.train ARGS``;
- world size N: ``accelerate launch --multi_gpu --num_processes N --num_machines 1 --main_process_port P
  --machine_rank 0 --mixed_precision no --dynamo_backend no -m cnnscale.train ARGS`` (the trainer makes the
  Accelerator with ``cpu=True`` when there is no GPU, so this is gloo on CPU), or ``torchrun --nnodes 1
  --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:P -m ...``, or ``direct``: N copies of
  ``python -m cnnscale.train ARGS`` started by the study itself with torch.distributed's ``env://`` rendezvous
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``), the
  form the network lab uses in its namespaces (:mod:`cnnscale.lab.launch`). No agent process: on a small CPU box
  the launcher's own start-up (it imports torch, ~3.6 s) and its rendezvous are a large part of a short point.
  Without an agent there is no restart on failure; a rank that fails ends its peers after a grace period
  (:func:`run_group`), and a rank whose study dies stops at the next step with a checkpoint (parent-death signal
  and :func:`cnnscale.train.preempt.watch_parent`).

The launcher's own defaults are passed explicitly (:data:`ACCELERATE_DEFAULTS`): ``accelerate launch`` fills every
flag left out from the user's ``default_config.yaml``, so a ``dynamo_backend: inductor`` there would compile every
study point behind its back (the point's precision is the trainer's ``--mixed-precision``, never the launcher's).
On a GPU machine, a world size above the GPUs this process may use is refused before the study starts
(:func:`check_gpu_world_sizes`), instead of each point failing inside NCCL with "Duplicate GPU detected".
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cnnscale.errors import UserError
from cnnscale.lab.launch import rendezvous_env
from cnnscale.profile.gpus import visible_gpus
from cnnscale.study.stop import die_with_parent

__all__ = ["ACCELERATE_DEFAULTS", "check_gpu_world_sizes", "Outcome", "Backend", "LocalBackend", "BACKENDS",
           "build_command", "classify_failure", "oom_kills", "free_port", "LAUNCHERS", "TRAIN_MODULE", "is_script",
           "target_argv", "point_env", "port_in_use", "run_group", "direct_envs"]

TRAIN_MODULE = "cnnscale.train"
# accelerate launch flags a user's Accelerate config would otherwise fill: one machine, no launcher-side precision,
# no TorchDynamo (the trainer's fast.compile decides compilation).
ACCELERATE_DEFAULTS = ("--machine_rank", "0", "--mixed_precision", "no", "--dynamo_backend", "no")
LAUNCHERS = ("accelerate", "torchrun", "direct")

_OOM = ("CUDA out of memory", "OutOfMemoryError", "DefaultCPUAllocator: can't allocate memory",
        " out of memory.", "MemoryError")
_WRAPPER_ERRORS = ("ChildFailedError", "CalledProcessError", "SignalException")
_PORT_IN_USE = ("Address already in use", "EADDRINUSE", "address already in use")


@dataclass(frozen=True)
class Outcome:
    """How a launch ended: ``status`` is ok | failed | oom | timeout; ``error`` is one line (empty when ok)."""

    status: str
    error: str
    returncode: int | None
    seconds: float


class Backend(Protocol):
    name: str

    def run(self, cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> Outcome: ...


def free_port() -> int:
    """A TCP port that is free right now (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# launcher -> (its command as an executable, the same as a module of the interpreter)
_LAUNCHER_FORMS = {"accelerate": (["accelerate", "launch"], ["-m", "accelerate.commands.launch"]),
                   "torchrun": (["torchrun"], ["-m", "torch.distributed.run"])}


def _launcher(name: str, python: str) -> list[str]:
    """The launcher's executable installed next to ``python`` (the venv's), else ``python -m`` its module: either
    way the ranks run under ``python`` and its installed cnnscale (a PATH lookup could pick another venv's)."""
    exe, module = _LAUNCHER_FORMS[name]
    cand = Path(python).parent / exe[0]
    return [str(cand), *exe[1:]] if cand.exists() else [python, *module]


def is_script(target: str | Path) -> bool:
    """Whether a launch target is a script path (``*.py``) rather than a module name."""
    return str(target).endswith(".py")


def target_argv(target: str | Path) -> list[str]:
    """What follows the interpreter or launcher: ``["-m", module]``, or ``[script path]`` as given."""
    return [str(target)] if is_script(target) else ["-m", str(target)]


def build_command(target: str | Path, args: list[str], world_size: int, port: int, launcher: str = "accelerate",
                  python: str = sys.executable) -> list[str]:
    """The argument list that starts ``target`` (a module, or a ``.py`` script) on ``world_size`` local processes."""
    tail = [*target_argv(target), *args]
    if world_size == 1 or launcher == "direct":  # direct: each of the N ranks runs this (see direct_envs)
        return [python, *tail]
    if launcher == "torchrun":
        return [*_launcher("torchrun", python), "--nnodes", "1", "--nproc-per-node", str(world_size),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", *tail]
    return [*_launcher("accelerate", python), "--multi_gpu", "--num_processes", str(world_size),
            "--num_machines", "1", "--main_process_port", str(port), *ACCELERATE_DEFAULTS, *tail]


def direct_envs(base: dict[str, str], world_size: int, port: int) -> list[dict[str, str]]:
    """The environment of each rank of a ``direct`` launch on this machine: ``base`` plus the ``env://``
    rendezvous on 127.0.0.1:``port`` (rank k is local rank k of one node)."""
    return [{**base, **rendezvous_env(k, world_size, k, world_size, 0, "127.0.0.1", port)} for k in range(world_size)]


def check_gpu_world_sizes(world_sizes: list[int] | tuple[int, ...], gpus: list[str] | None = None) -> None:
    """On a machine whose ``nvidia-smi -L`` shows GPUs (``gpus``, default: the ones this process may use), a world
    size above their count is a one-line UserError; a machine without GPUs runs any world size as CPU processes.
    Costs one nvidia-smi call (~0.1 s) when ``gpus`` is not given."""
    gpus = visible_gpus() if gpus is None else gpus
    too_big = sorted({n for n in world_sizes if n > len(gpus)})
    if gpus and too_big:
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UserError(f"world size {', '.join(map(str, too_big))} needs one GPU per process but this machine shows "
                        f"{len(gpus)} GPU(s){f' (CUDA_VISIBLE_DEVICES={vis})' if vis is not None else ''}; use world "
                        f"sizes up to {len(gpus)}, or a multi-node backend")


def point_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a point: OMP_NUM_THREADS set when ``threads`` > 0 (CPU: one thread per process)."""
    env = dict(os.environ if base is None else base)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _error_line(text: str) -> str:
    """The most telling line of a failed launch's log: a cnnscale one-line error, else the last exception line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"^\S+\.py: error: |^cnnscale(\.\w+)*: error: ", ln):
            return ln[:300]
    for ln in reversed(lines):
        if re.search(r"\b\w*(Error|Exception)\b:", ln) and not any(w in ln for w in _WRAPPER_ERRORS):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def oom_kills() -> int | None:
    """The kernel's count of OOM-killer kills since boot (``oom_kill`` in /proc/vmstat, Linux 4.13+); None where
    there is none to read."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def classify_failure(returncode: int | None, log_text: str, timed_out: bool = False,
                     oom_killed: int | None = None) -> tuple[str, str]:
    """(status, one-line error) of a launch: timeout, oom (CUDA/CPU allocator, the OOM killer), failed, or ok.

    ``oom_killed``: how many OOM-killer kills the kernel counted during the launch (:func:`oom_kills` after minus
    before), None where unknown. A SIGKILLed rank is "oom" when the kernel's OOM killer struck during the launch
    (or, unknown, as the likeliest reading), and "failed" when it did not (a ``kill -9``, a cluster's reaper)."""
    if timed_out:
        return "timeout", "point exceeded its timeout; the process group was killed"
    if any(s in log_text for s in _OOM):
        line = next((ln.strip() for ln in log_text.splitlines() if any(s in ln for s in _OOM)), "out of memory")
        return "oom", line[:300]
    if returncode in (-9, 137) or "exitcode  : -9" in log_text or "Signals.SIGKILL" in log_text:
        if oom_killed is None:
            return "oom", "killed by SIGKILL (out of host memory? this kernel does not count OOM kills)"
        if oom_killed > 0:
            return "oom", f"killed by SIGKILL: the kernel's OOM killer struck {oom_killed}x during the launch"
        return "failed", "killed by SIGKILL, not by the OOM killer (/proc/vmstat oom_kill unchanged): killed by hand?"
    if returncode:
        return "failed", f"exit {returncode}: {_error_line(log_text)}"
    return "ok", ""


def _kill_groups(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each launch's group (the ranks stop at the next step with a checkpoint), SIGKILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        live = [p for p in procs if p.poll() is None]
        for proc in live:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        for proc in live:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass
        if all(p.poll() is not None for p in procs):
            return


def _wait_group(procs: list[subprocess.Popen], timeout_s: float, grace_s: float) -> tuple[bool, int | None]:
    """Wait for every process: (whether ``timeout_s`` passed first, the index of the first that failed). Once one
    has failed, the rest get ``grace_s`` to exit (a rank waiting on a dead peer would sit out gloo's timeout)."""
    deadline, failed_at, first = time.monotonic() + timeout_s, 0.0, None
    while True:
        codes = [p.poll() for p in procs]
        now = time.monotonic()
        if first is None and any(codes):
            first, failed_at = next(i for i, c in enumerate(codes) if c), now
        if all(c is not None for c in codes):
            return False, first
        if now > deadline or (first is not None and now > failed_at + grace_s):
            return now > deadline, first
        time.sleep(0.05)


def run_group(cmds: list[list[str]], envs: list[dict[str, str]], log_path: Path, timeout_s: float,
              grace_s: float = 15.0) -> Outcome:
    """Start each command (one per rank, or one launcher) in its own session and process group, in the study's
    working directory, all writing to ``log_path``; wait for all of them. On a timeout, a failed rank whose peers
    do not follow within ``grace_s``, Ctrl-C or :class:`~cnnscale.study.stop.StudyStopped`, every group is ended
    (SIGTERM, then SIGKILL). The return code is the first failing rank's, else 0."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0, procs, kills = time.monotonic(), [], oom_kills()
    with open(log_path, "w") as log:
        for cmd in cmds:
            log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            for cmd, env in zip(cmds, envs):
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                              start_new_session=True,  # own group: a timeout ends every rank
                                              preexec_fn=die_with_parent))  # SIGTERM to it if the study dies
            timed_out, first = _wait_group(procs, timeout_s, grace_s)
            if any(p.poll() is None for p in procs):
                _kill_groups(procs)
        except BaseException:  # Ctrl-C, StudyStopped: the ranks are in their own sessions and would not see it
            _kill_groups(procs)
            raise
    text = log_path.read_text(errors="replace")
    code = procs[first].returncode if first is not None else next((p.returncode for p in procs if p.returncode), 0)
    after = oom_kills()
    status, error = classify_failure(code, text, timed_out, None if kills is None or after is None else after - kills)
    return Outcome(status, error, code, time.monotonic() - t0)


class LocalBackend:
    """Runs each launch as a subprocess on this machine; output goes to ``log_path``."""

    name = "local"

    def run(self, cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> Outcome:
        return run_group([cmd], [env], log_path, timeout_s)


def port_in_use(log_text: str) -> bool:
    """Whether a launch failed because its rendezvous port was taken meanwhile (worth one retry)."""
    return any(s in log_text for s in _PORT_IN_USE)


BACKENDS: dict[str, type] = {"local": LocalBackend}
