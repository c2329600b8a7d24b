"""``cnnscale study FILE.yaml``: expand a study matrix and run every point as a real multi-process launch.

A study file (see configs/studies/quickstart.yaml)::

    name: quickstart
    scaling: weak              # weak: fixed micro_batch per process | strong: fixed global_batch
    models: [lenet5, {name: resnet18, micro_batches: [16], max_steps: 12}]
    world_sizes: [1, 2]
    precisions: [no]
    micro_batches: [32]        # weak scaling
    global_batch: 256          # strong scaling
    max_steps: 20
    data: synthetic
    timeout_s: 600             # per point; the whole process group is killed after it
    threads_per_process: 1     # OMP_NUM_THREADS per process (CPU); 0 leaves it alone (GPU)
    overrides: {data.num_workers: 0}                     # passed to every point as --section.field value
    settings: {default: {}, bf16_hook: {dist.comm_hook: bf16}, bare: {script: launch/bench_ddp_bare.py}}
    max_batch: {start: 1024, steps: 3}                   # optional: largest micro-batch that fits, per model
    allreduce_bench: true      # fit the "measured" interconnect (launch/bench_allreduce.py) into the study dir

**Batch rules.** Weak: each point runs ``micro_batch`` per process and ``grad_accum`` (default 1), so
``global_batch = micro_batch x grad_accum x N`` grows with N. Strong: ``global_batch`` G is fixed and
``micro_batch = G / (N x grad_accum)``; while that exceeds ``max_micro_batch`` (when set, or the max_batch search's
result), ``grad_accum`` doubles. G must divide exactly, and a micro-batch under ``min_micro_batch`` is an error.

Each point writes one run directory ``OUT/<point id>/`` (the trainer's records plus ``launch.log``). Points whose
summary.json says ``ok`` at the right world size are skipped, so a study resumes where it stopped. A point that
fails is recorded by the study itself: a summary.json with status failed | oom | timeout, an ``error`` line and the
point's parameters, and the study goes on. Model names are checked by the trainer, inside the point, so a bad name
is a failed point with the trainer's one-line error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cnnscale.errors import UserError
from cnnscale.records import io as records
from cnnscale.study.launcher import BACKENDS, REPO, Backend, build_command, free_port, point_env, port_in_use
from cnnscale.study.spec import ModelSpec, StudySpec, load_spec, strong_batch

__all__ = ["Point", "expand", "run_point", "run_study", "find_max_batch", "main", "StudySpec", "load_spec",
           "strong_batch"]


@dataclass(frozen=True)
class Point:
    """One run of a study: a model at a world size, precision, batch and settings variant."""

    model: str
    world_size: int
    precision: str
    micro_batch: int
    grad_accum: int
    max_steps: int
    settings: str = "default"
    overrides: tuple[tuple[str, Any], ...] = ()
    script: str = "launch/train.py"
    scaling: str = "weak"

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def id(self) -> str:
        ga = f"-ga{self.grad_accum}" if self.grad_accum > 1 else ""
        st = "" if self.settings == "default" else f"-{self.settings}"
        return f"{self.model}-ws{self.world_size}-{self.precision}-mb{self.micro_batch}{ga}{st}"

    def meta(self, study: str) -> dict[str, Any]:
        return {"id": self.id, "study": study, "settings": self.settings, "scaling": self.scaling,
                "overrides": dict(self.overrides), "script": self.script}


def _cli_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def point_args(p: Point, spec: StudySpec, run_dir: Path) -> list[str]:
    """The trainer's command-line arguments of a point."""
    args = ["--model", p.model, "--data", spec.data, "--max-steps", str(p.max_steps), "--micro-batch",
            str(p.micro_batch), "--grad-accum", str(p.grad_accum), "--mixed-precision", p.precision,
            "--out", str(run_dir), "--train.progress", "plain"]
    for key, value in p.overrides:
        args += [f"--{key}", _cli_value(value)]
    return args


_GA = "train.grad_accum"


def _model_points(spec: StudySpec, m: ModelSpec, max_micro: int | None) -> list[Point]:
    points = []
    steps = m.max_steps or spec.max_steps
    for sname, sdict in spec.settings:
        script = sdict.get("script", "launch/train.py")
        ga = int(sdict.get("train.grad_accum", spec.grad_accum))  # a batch setting changes the point, not a flag
        over = tuple(spec.overrides) + tuple((k, v) for k, v in sdict.items() if k not in ("script", _GA))
        for prec in spec.precisions:
            if spec.scaling == "weak":
                batches = (max_micro,) if max_micro else (m.micro_batches or spec.micro_batches)
                for mb in batches:
                    for n in spec.world_sizes:
                        if sdict.get("dist.compute_only") and n == 1:
                            continue  # a calibration run: no communication to leave out at one process
                        points.append(Point(m.name, n, prec, mb, ga, steps, sname, over, script))
            else:
                gb = m.global_batch or spec.global_batch
                cap = max_micro or spec.max_micro_batch
                for n in spec.world_sizes:
                    mb, ga_n = strong_batch(gb, n, ga, cap, spec.min_micro_batch)
                    points.append(Point(m.name, n, prec, mb, ga_n, steps, sname, over, script, "strong"))
    return points


def expand(spec: StudySpec, max_batches: dict[str, int] | None = None) -> list[Point]:
    """Every point of the matrix, model-major, world size innermost. ``max_batches``: model -> found micro-batch."""
    points: list[Point] = []
    for m in spec.models:
        points += _model_points(spec, m, (max_batches or {}).get(m.name))
    ids = [p.id for p in points]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"{spec.source}: the matrix repeats points {', '.join(dup)}")
    return points


def is_done(run_dir: Path, p: Point) -> bool:
    """A point is done when its summary.json says ok at the expected world size."""
    try:
        s = records.read_json(run_dir / records.SUMMARY)
    except (OSError, ValueError):
        return False
    return isinstance(s, dict) and s.get("status") == "ok" and s.get("world_size") == p.world_size


def _aborted_after_success(run_dir: Path, summary: dict[str, Any], p: Point) -> bool:
    """A rank sometimes dies at interpreter exit with "terminate called without an active exception" (SIGABRT)
    after a successful run (seen about 1 run in 10 with gloo on CPU). rank 0 writes an ok summary.json only after
    every rank finished training and the final checkpoint, so such a run is complete and is counted as ok."""
    complete = summary.get("status") == "ok" and summary.get("steps") == p.max_steps
    if not complete or summary.get("world_size") != p.world_size:
        return False
    log = (run_dir / "launch.log").read_text(errors="replace") if (run_dir / "launch.log").is_file() else ""
    return "terminate called without an active exception" in log


def _record(run_dir: Path, p: Point, spec: StudySpec, status: str, error: str, seconds: float) -> dict[str, Any]:
    """Annotate an ok summary with the point, or write the failure summary the report shows."""
    try:
        summary = records.read_json(run_dir / records.SUMMARY)
    except (OSError, ValueError):
        summary = {}
    if status == "failed" and _aborted_after_success(run_dir, summary, p):
        status = "ok"  # the run's own record is complete; the abort came after it (judge by the record)
        summary["exit_warning"] = f"a rank aborted at exit after the run completed ({error})"
    if status == "ok" and summary.get("status") != "ok":
        status, error = "failed", "run exited 0 without an ok summary.json"
    if status == "ok" and summary.get("world_size") != p.world_size:
        status, error = "failed", f"launched world size {summary.get('world_size')}, expected {p.world_size}"
    if status != "ok":
        summary = {"status": status, "error": error, "model": p.model, "world_size": p.world_size,
                   "micro_batch": p.micro_batch, "grad_accum": p.grad_accum, "global_batch": p.global_batch,
                   "mixed_precision": p.precision, "steps": 0, "wall_s": seconds}
    summary["point"] = {**p.meta(spec.name), "launch_s": round(seconds, 1)}
    records.write_json(run_dir / records.SUMMARY, summary)
    return summary


def run_point(p: Point, spec: StudySpec, run_dir: Path, backend: Backend) -> dict[str, Any]:
    """Launch one point (one retry if its port was taken meanwhile) and record how it ended."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale failed attempt: metrics.jsonl is appended to, so start clean
    run_dir.mkdir(parents=True)
    script = REPO / p.script
    for _attempt in range(2):
        cmd = build_command(script, point_args(p, spec, run_dir), p.world_size, free_port(), spec.launcher)
        out = backend.run(cmd, point_env(spec.threads_per_process), run_dir / "launch.log", spec.timeout_s)
        if out.status != "failed" or not port_in_use((run_dir / "launch.log").read_text(errors="replace")):
            break
    return _record(run_dir, p, spec, out.status, out.error, out.seconds)


def find_max_batch(probe: Any, start: int) -> int:
    """Largest micro-batch ``start / 2^k`` for which ``probe(batch)`` does not report "oom", by Accelerate's
    ``find_executable_batch_size`` (halving on each out-of-memory). ``probe`` returns a status string."""
    from accelerate.utils import find_executable_batch_size

    def attempt(batch_size: int) -> int:
        status = probe(batch_size)
        if status == "oom":
            raise RuntimeError(f"CUDA out of memory. (probe at micro_batch {batch_size})")
        if status != "ok":
            raise UserError(f"max_batch search: probe at micro_batch {batch_size} ended '{status}', not oom")
        return batch_size

    return int(find_executable_batch_size(attempt, starting_batch_size=start,
                                          reduce_batch_size_fn=_halver(start))())


def _halver(start: int) -> Any:
    state = {"bs": start}

    def reduce() -> int:
        state["bs"] //= 2
        return state["bs"]

    return reduce


def _max_batches(spec: StudySpec, out: Path, backend: Backend, say: Any) -> dict[str, int]:
    if not spec.max_batch:
        return {}
    path = out / "max_batch.json"
    found: dict[str, int] = records.read_json(path) if path.is_file() else {}
    for m in spec.models:
        if m.name in found:
            continue

        def probe(bs: int, name: str = m.name) -> str:
            p = Point(name, 1, spec.precisions[0], bs, 1, spec.max_batch["steps"], "probe", tuple(spec.overrides))
            return run_point(p, spec, out / "_max_batch" / p.id, backend)["status"]

        found[m.name] = find_max_batch(probe, spec.max_batch["start"])
        say(f"max_batch {m.name}: {found[m.name]}")
        records.write_json(path, found)
    return found


def _allreduce_bench(spec: StudySpec, out: Path, backend: Backend, say: Any) -> None:
    path = out / "allreduce.json"
    if not spec.allreduce_bench or path.is_file() or max(spec.world_sizes) < 2:
        return
    args = ["--out", str(path), "--max-mb", "32", "--repeats", "3"]
    cmd = build_command(REPO / "launch" / "bench_allreduce.py", args, 2, free_port(), spec.launcher)
    res = backend.run(cmd, point_env(spec.threads_per_process), out / "allreduce.log", 180)
    say(f"all-reduce benchmark: {res.status} ({res.seconds:.0f} s){' ' + res.error if res.error else ''}")


def run_study(spec: StudySpec, out: Path, backend: Backend | None = None, progress: Any = None) -> list[dict]:
    """Run every point not already done; returns the summaries (done and new), in matrix order."""
    backend = backend or BACKENDS["local"]()
    too_big = [n for n in spec.world_sizes if spec.gpus_per_node and n > spec.gpus_per_node]
    if too_big and backend.name == "local":
        raise UserError(f"{spec.source}: world sizes {too_big} exceed gpus_per_node {spec.gpus_per_node}; "
                        "the local backend runs one machine (use a multi-node backend)")
    expand(spec)  # the batch rules fail here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    records.write_yaml(out / "study.yaml", spec.raw)
    prog = progress or make_study_progress()
    _allreduce_bench(spec, out, backend, prog.say)
    points = expand(spec, _max_batches(spec, out, backend, prog.say))
    prog.start(len(points))
    results = []
    for p in points:
        run_dir = out / p.id
        if is_done(run_dir, p):
            summary = records.read_json(run_dir / records.SUMMARY)
            prog.done(p, summary, skipped=True)
        else:
            prog.begin(p)
            summary = run_point(p, spec, run_dir, backend)
            prog.done(p, summary, skipped=False)
        results.append(summary)
    prog.close()
    return results


class StudyProgress:
    """Plain lines (as under SLURM or in a log); :class:`RichStudyProgress` adds a live bar on a TTY."""

    def __init__(self) -> None:
        self.total = self.n = 0
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[study] {text}", flush=True)

    def start(self, total: int) -> None:
        self.total = total
        self.say(f"{total} points")

    def begin(self, p: Point) -> None:
        self.say(f"{self.n + 1}/{self.total} {p.id} (global batch {p.global_batch}) ...")

    def done(self, p: Point, summary: dict[str, Any], skipped: bool) -> None:
        self.n += 1
        status = summary.get("status")
        what = "done earlier, skipped" if skipped else f"{(summary.get('point') or {}).get('launch_s', 0):.0f} s"
        rate = f" {summary['img_per_s']:.1f} img/s" if status == "ok" and summary.get("img_per_s") else ""
        err = f" - {summary.get('error')}" if status != "ok" else ""
        self.say(f"{self.n}/{self.total} {p.id}: {status}{rate} ({what}){err}")

    def close(self) -> None:
        self.say(f"finished in {time.monotonic() - self.t0:.0f} s")


class RichStudyProgress(StudyProgress):
    def __init__(self) -> None:
        super().__init__()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("[bold]study"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("{task.fields[info]}"))
        self.task = self.p.add_task("study", total=None, info="")
        self.p.start()

    def say(self, text: str) -> None:
        self.p.console.print(text)

    def start(self, total: int) -> None:
        self.total = total
        self.p.update(self.task, total=total)

    def begin(self, p: Point) -> None:
        self.p.update(self.task, info=f"running {p.id}")

    def done(self, p: Point, summary: dict[str, Any], skipped: bool) -> None:
        super().done(p, summary, skipped)
        self.p.advance(self.task)

    def close(self) -> None:
        self.p.update(self.task, info="")
        self.p.stop()


def make_study_progress() -> StudyProgress:
    return RichStudyProgress() if sys.stdout.isatty() else StudyProgress()


def _dry_run(spec: StudySpec, out: Path) -> None:
    for p in expand(spec):
        run_dir = out / p.id
        state = "done" if is_done(run_dir, p) else "todo"
        cmd = build_command(REPO / p.script, point_args(p, spec, run_dir), p.world_size, 0, spec.launcher)
        print(f"{state}  {p.id}  global_batch={p.global_batch}\n      {' '.join(cmd)}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="cnnscale study", description="Run a scaling study: models x world sizes x "
                                 "precision x batch, one real multi-process launch per point, then print the report.")
    ap.add_argument("file", help="study YAML (configs/studies/*.yaml)")
    ap.add_argument("--out", help="study directory (default: runs/<name>)")
    ap.add_argument("--dry-run", action="store_true", help="list the points and their commands, run nothing")
    ap.add_argument("--backend", default="local", choices=sorted([*BACKENDS, "slurm"]), help="where points run")
    ap.add_argument("--slurm", nargs="?", const="", default=None, metavar="SBATCH_OPTS",
                    help="run the points as SLURM job arrays (slurm/study.sbatch), wait, then report; extra sbatch "
                    "options as one string: --slurm='--partition=gpu --account=x'")
    ap.add_argument("--timeout", type=float, help="override the per-point timeout (s)")
    args = ap.parse_args(argv)
    spec = load_spec(args.file)
    if args.timeout:
        spec = replace(spec, timeout_s=args.timeout)
    out = Path(args.out or f"runs/{spec.name}")
    if args.dry_run:
        _dry_run(spec, out)
        return 0
    t0 = time.monotonic()
    if args.slurm is not None or args.backend == "slurm":
        from cnnscale.study.slurm import run_slurm_study

        results = run_slurm_study(spec, out, args.slurm or "")
    else:
        results = run_study(spec, out, BACKENDS[args.backend]())
    bad = sum(r.get("status") != "ok" for r in results)
    print(f"study {spec.name}: {len(results)} points, {bad} not ok, {time.monotonic() - t0:.0f} s -> {out}",
          file=sys.stderr)
    from cnnscale.report import main as report

    return report.main([str(out), "--plots", str(out / "plots")])

