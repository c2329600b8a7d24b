"""``cnnscale submit``: render an sbatch script for one training run and submit it with ``sbatch``.

The script is the packaged ``slurm/train.sbatch`` (:mod:`cnnscale.resources`) with its ``#SBATCH`` header replaced
by one made from the options (nodes, GPUs per node, CPUs, partition, time, account, preemption signal) and the
training arguments baked in, so what runs is exactly what ``--dry-run`` prints. Submission passes the script on
sbatch's stdin and the command as an argument list, never through a shell string. The rendered copy is kept as
``RUNS/submitted/<job name>-<job id>.sbatch``. It names the interpreter (``--python``, default: this one) and runs
``-m cnnscale.train``, so it needs an installed package and names no path of a source checkout.

Why not submitit: submitit pickles a Python function and runs it as one srun task per process; here each node must
run ``accelerate launch`` (which starts the processes), and preemption is a shell-level trap that forwards SIGUSR1
and calls ``scontrol requeue``, with resume decided from the run directory. submitit's own checkpoint/requeue
(``Checkpointable``) would duplicate :mod:`cnnscale.train.preempt` and hide the script users also run by hand
(``sbatch slurm/train.sbatch``). A plain script is reviewable, golden-tested, and adds no dependency.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cnnscale.config import CommandParser, load_config
from cnnscale.errors import UserError
from cnnscale.resources import resource_path

__all__ = ["JobSpec", "render", "submit", "main", "BODY_MARKER", "TEMPLATE"]

TEMPLATE = "slurm/train.sbatch"
"""The template, a packaged file: ``resource_path(TEMPLATE)``."""
BODY_MARKER = "# ---- cnnscale body:"
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")
_WORD = re.compile(r"^[A-Za-z0-9_.,:@+=/-]+$")  # what an #SBATCH value may hold (sbatch reads it without a shell)
_PATH_FLAGS = ("--config", "--data-dir")


@dataclass(frozen=True)
class JobSpec:
    """Everything the rendered script depends on (no hidden environment)."""

    python: str
    """The interpreter on the nodes; it must have cnnscale installed."""
    runs: str
    train_args: tuple[str, ...] = ()
    nodes: int = 1
    gpus_per_node: int | None = None
    """None: detect on the node (SLURM_GPUS_ON_NODE, nvidia-smi); 0: CPU processes."""
    procs_per_node: int = 1
    """Processes per node when there are no GPUs."""
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    job_name: str = "cnnscale"
    signal_lead_s: int = 120
    sbatch_opts: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("nodes", "procs_per_node"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            raise UserError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise UserError(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        if self.signal_lead_s < 0:
            raise UserError(f"--signal-lead must be >= 0 seconds, got {self.signal_lead_s}")
        if self.time is not None and not _TIME.match(self.time):
            raise UserError(f"--time {self.time!r} is not a SLURM time (MM, HH:MM:SS, D-HH, D-HH:MM:SS)")
        for name in ("partition", "account", "job_name"):
            value = getattr(self, name)
            if value is not None and not _WORD.match(value):
                raise UserError(f"--{name.replace('_', '-')} {value!r}: use letters, digits and _.,:@+=/- only")
        for opt in self.sbatch_opts:
            if not opt.startswith("--") or "\n" in opt:
                raise UserError(f"--sbatch-opt {opt!r}: give one long sbatch option, e.g. --sbatch-opt=--qos=high")


def _header(spec: JobSpec) -> list[str]:
    opts = [f"--job-name={spec.job_name}", f"--nodes={spec.nodes}", "--ntasks-per-node=1"]
    if spec.gpus_per_node:
        opts.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        opts.append(f"--cpus-per-task={spec.cpus_per_task}")
    opts += [f"--{k}={v}" for k, v in (("partition", spec.partition), ("account", spec.account),
                                        ("time", spec.time)) if v]
    opts += [f"--signal=B:USR1@{spec.signal_lead_s}", "--requeue", "--open-mode=append",
             f"--output={spec.runs}/%x-%j.out", *spec.sbatch_opts]
    lines = ["#!/bin/bash", "# Rendered by `cnnscale submit` from slurm/train.sbatch (header above the body marker).",
             *(f"#SBATCH {o}" for o in opts)]
    env = {"CNNSCALE_PYTHON": spec.python, "CNNSCALE_RUNS": spec.runs}
    if spec.gpus_per_node is not None:
        env["CNNSCALE_GPUS_PER_NODE"] = str(spec.gpus_per_node)
    env["CNNSCALE_CPU_PROCS"] = str(spec.procs_per_node)
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append("set -- " + " ".join(shlex.quote(a) for a in spec.train_args) + "  # the training arguments")
    return lines


def render(spec: JobSpec, template: str | None = None) -> str:
    """The complete sbatch script: a header from ``spec`` followed by the body of ``slurm/train.sbatch``."""
    text = resource_path(TEMPLATE).read_text() if template is None else template
    idx = text.find(BODY_MARKER)
    if idx < 0:
        raise UserError(f"{TEMPLATE}: body marker {BODY_MARKER!r} not found")
    return "\n".join(_header(spec)) + "\n" + text[idx:]


def submit(script: str, sbatch: str = "sbatch", timeout: float = 60) -> str:
    """Submit ``script`` on sbatch's stdin; return the job id."""
    exe = shutil.which(sbatch)
    if exe is None:
        raise UserError(f"{sbatch!r} not found on PATH: is SLURM installed here? (--dry-run prints the script)")
    try:
        proc = subprocess.run([exe, "--parsable"], input=script, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"sbatch did not answer within {timeout:.0f} s (is slurmctld up?)") from None
    if proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[-1]
        raise UserError(f"sbatch failed: {msg}")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError(f"sbatch printed no job id: {proc.stdout.strip()!r}")
    return job_id


def _parser() -> CommandParser:
    p = CommandParser(prog="cnnscale submit", description="Render slurm/train.sbatch for one run and submit it. "
                      "Options not listed here (and everything after --) go to training, e.g. --max-steps 2000.")
    p.add_argument("--nodes", type=int, default=1, help="nodes (one srun task, one accelerate launch each)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: detect; 0: CPU)")
    p.add_argument("--procs-per-node", type=int, default=1, help="processes per node without GPUs (default 1)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node's task")
    p.add_argument("--partition", "-p")
    p.add_argument("--account", "-A")
    p.add_argument("--time", "-t", help="time limit: MM, HH:MM:SS, D-HH:MM:SS")
    p.add_argument("--job-name", "-J", default="cnnscale")
    p.add_argument("--signal-lead", type=int, default=120, metavar="SECONDS",
                   help="send SIGUSR1 this long before the time limit (checkpoint + requeue); default 120")
    p.add_argument("--sbatch-opt", action="append", default=[], metavar="--OPT=VALUE",
                   help="any other sbatch option, repeatable (e.g. --sbatch-opt=--qos=high)")
    p.add_argument("--runs", default="runs", help="parent of the run directories and job logs (default runs/)")
    p.add_argument("--python", default=sys.executable, help="interpreter on the nodes (default: this one)")
    p.add_argument("--model", help="model name (passed to training)")
    p.add_argument("--config", help="training config YAML (passed to training)")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    return p


def _train_args(args: argparse.Namespace, rest: list[str]) -> tuple[str, ...]:
    out = [*(["--model", args.model] if args.model else []), *(["--config", args.config] if args.config else []),
           *rest]
    for bad in ("--out", "--resume"):
        if any(a == bad or a.startswith(bad + "=") for a in out):
            raise UserError(f"{bad} is set by the sbatch script (the run directory is keyed by the job id)")
    for i, a in enumerate(out[:-1]):  # the job may start in another directory: make file arguments absolute
        if a in _PATH_FLAGS and Path(out[i + 1]).exists():
            out[i + 1] = str(Path(out[i + 1]).resolve())
    load_config(out)  # bad flags or values fail here, before anything is queued
    return tuple(out)


def main(argv: list[str]) -> int:
    """``cnnscale submit [options] [training args]``: print the job id (or the script with --dry-run)."""
    argv = list(argv)
    tail = argv[argv.index("--") + 1:] if "--" in argv else []
    head = argv[:argv.index("--")] if "--" in argv else argv
    args, rest = _parser().parse_known_args(head)
    runs = Path(args.runs).resolve()
    spec = JobSpec(python=args.python, runs=str(runs), train_args=_train_args(args, rest + tail),
                   nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
                   cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account, time=args.time,
                   job_name=args.job_name, signal_lead_s=args.signal_lead, sbatch_opts=tuple(args.sbatch_opt))
    script = render(spec)
    if args.dry_run:
        print(script, end="")
        return 0
    runs.mkdir(parents=True, exist_ok=True)  # the job's --output lands here; sbatch does not create it
    job_id = submit(script)
    kept = runs / "submitted" / f"{spec.job_name}-{job_id}.sbatch"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(script)
    print(job_id)
    print(f"submitted job {job_id}: run dir {runs}/{spec.job_name}-{job_id}, log {runs}/{spec.job_name}-{job_id}.out,"
          f" script {kept}", file=sys.stderr)
    return 0
