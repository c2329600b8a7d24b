"""``cnnscale study STUDY``: expand a study matrix, run every point as a real multi-process launch (locally or as
SLURM job arrays), then print the scaling report.

STUDY is a YAML file or the name of a built-in study (``cnnscale study quickstart``; the built-in files are
package data, :mod:`cnnscale.resources`). A study file (see configs/studies/quickstart.yaml)::

    name: quickstart
    scaling: weak              # weak: fixed micro_batch per process | strong: fixed global_batch
    models: [lenet5, {name: resnet18, micro_batches: [16], max_steps: 12}]
    world_sizes: [1, 2]
    precisions: [no]
    micro_batches: [32]        # weak scaling
    global_batch: 256          # strong scaling
    max_steps: 20
    repeats: 3                 # every point 3 times, round-robin: the report's median and spread (default 1)
    repeats_at: {1: 5}         # ... but the points of these world sizes this many times
    data: synthetic
    timeout_s: 600             # per point; the whole process group is killed after it
    threads_per_process: 1     # OMP_NUM_THREADS per process (CPU); 0 leaves it alone (GPU)
    overrides: {data.num_workers: 0}                     # passed to every point as --section.field value
    settings: {default: {}, bf16_hook: {dist.comm_hook: bf16}, bare: {script: launch/bench_ddp_bare.py}}
    max_batch: {start: 1024, steps: 3}                   # optional: largest micro-batch that fits, per model
    allreduce_bench: true      # fit the "measured" interconnect (cnnscale.study.allreduce_bench) into the study dir
    networks: [1gbit, 200mbit] # network lab (root): N >= 2 points once per profile, one process per namespace
    # network: {profile: 1gbit} # the same with one profile; unshaped, or a tc rate <number><kbit|mbit|gbit>

The batch rules are in :mod:`cnnscale.study.matrix`, the local runner in :mod:`cnnscale.study.local`, the SLURM one
in :mod:`cnnscale.study.slurm`, the network lab in :mod:`cnnscale.lab`. The command imports no torch: every point is
a subprocess.

Behaviour: one ``cnnscale study`` per study directory (an ``fcntl.flock`` on ``OUT/.lock``; a second one is refused
with one line naming the holder, exit 2). Points run in the caller's working directory with absolute run
directories. SIGTERM, SIGINT or SIGHUP end the running point (it stops with a checkpoint) and the study
(:mod:`cnnscale.study.stop`); a SIGKILLed study's launcher gets SIGTERM from the kernel. Running the same command
again skips the points and repeats already done and resumes a half-done one from its checkpoint. Exit code: 0 when
every point is ok, else 1 after the report, with one line counting the points by status.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from cnnscale.config import CommandParser
from cnnscale.records.io import LOCK, hold_lock
from cnnscale.records.schema import POINT_STATUSES
from cnnscale.report import main as report
from cnnscale.resources import find_builtin
from cnnscale.study.launcher import BACKENDS, build_command, target_argv
from cnnscale.study.local import preflight, run_study
from cnnscale.study.matrix import expand, point_args
from cnnscale.study.outcome import PointRecord, is_done
from cnnscale.study.slurm import run_slurm_study
from cnnscale.study.spec import StudySpec, load_spec
from cnnscale.study.stop import StudyStopped, stop_on_signals

__all__ = ["main", "dry_run", "status_counts"]


def dry_run(spec: StudySpec, out: Path) -> None:
    """Print every point and repeat (done or todo) with the command that would launch it; run nothing."""
    for p in expand(spec):
        run_dir = out / p.run_name
        state = "done" if is_done(run_dir, p) else "todo"
        rep = f"  repeat {p.repeat + 1}/{p.repeats}" if p.repeats > 1 else ""
        args = point_args(p, spec, run_dir)
        if spec.profiles and p.world_size > 1:  # the lab: one process per namespace, env:// rendezvous
            net = p.network or "unshaped"
            cmd = [f"{p.world_size} x ip netns exec <lab ns k> [{net}]", sys.executable, *target_argv(p.script), *args]
        else:
            cmd = build_command(p.script, args, p.world_size, 0, spec.launcher)
            if spec.launcher == "direct" and p.world_size > 1:  # one process per rank, env:// on 127.0.0.1
                cmd = [f"{p.world_size} x RANK=<k> WORLD_SIZE={p.world_size}", *cmd]
        print(f"{state}  {p.id}{rep}  global_batch={p.global_batch}\n      {' '.join(cmd)}")


def status_counts(results: list[PointRecord]) -> str:
    """``"3 ok, 1 failed, 1 diverged"``: the points by status, ok first, then the order of POINT_STATUSES."""
    counts = Counter(r.status for r in results)
    return ", ".join(f"{counts[s]} {s}" for s in POINT_STATUSES if counts[s])


def _parser() -> CommandParser:
    ap = CommandParser(prog="cnnscale study", description="Run a scaling study: models x world sizes x "
                                 "precision x batch, one real multi-process launch per point, then print the report.")
    ap.add_argument("file", metavar="STUDY", help="study YAML, or a built-in study's name (e.g. quickstart)")
    ap.add_argument("--out", help="study directory (default: runs/<name>)")
    ap.add_argument("--dry-run", action="store_true", help="list the points and their commands, run nothing")
    ap.add_argument("--backend", default="local", choices=sorted([*BACKENDS, "slurm"]), help="where points run")
    ap.add_argument("--slurm", nargs="?", const="", default=None, metavar="SBATCH_OPTS",
                    help="run the points as SLURM job arrays (slurm/study.sbatch), wait, then report; extra sbatch "
                    "options as one string: --slurm='--partition=gpu --account=x'")
    ap.add_argument("--timeout", type=float, help="override the per-point timeout (s)")
    return ap


def main(argv: list[str]) -> int:
    """``cnnscale study STUDY [--out DIR] [--dry-run] [--slurm[=OPTS]] [--timeout S]``.

    Exit 0 when every point is ok; 1 otherwise (after the report, with one line counting the points by status);
    2 for bad input or a study directory that another ``cnnscale study`` holds; 128 + N when stopped by signal N."""
    args = _parser().parse_args(argv)
    spec = load_spec(find_builtin("studies", args.file))
    if args.timeout:
        spec = replace(spec, timeout_s=args.timeout)
    out = Path(args.out or f"runs/{spec.name}").resolve()
    if args.dry_run:
        dry_run(spec, out)
        return 0
    t0 = time.monotonic()
    slurm = args.slurm is not None or args.backend == "slurm"
    preflight(spec, "slurm" if slurm else args.backend)  # bad input: one line, before the directory exists
    with hold_lock(out / LOCK, f"study directory {out}"):  # one writer: a second study is one line, exit 2
        try:
            with stop_on_signals():
                if slurm:
                    results = run_slurm_study(spec, out, args.slurm or "")
                else:
                    results = run_study(spec, out, BACKENDS[args.backend]())
        except (StudyStopped, KeyboardInterrupt) as exc:
            signum = exc.signum if isinstance(exc, StudyStopped) else signal.SIGINT
            what = ("its SLURM arrays keep running; run the same command again to watch them" if slurm else
                    "the running point was ended and recorded; run the same command again to resume")
            print(f"cnnscale study: stopped by {signal.Signals(signum).name}; {what} -> {out}", file=sys.stderr)
            return 128 + signum
        code = report.main([str(out), "--plots", str(out / "plots")])
    bad = sum(r.status != "ok" for r in results)
    print(f"study {spec.name}: {len(results)} points: {status_counts(results)}, {time.monotonic() - t0:.0f} s "
          f"-> {out}", file=sys.stderr)
    return 1 if bad or code else 0
