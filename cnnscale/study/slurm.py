"""``cnnscale study FILE --slurm``: run a study's points as SLURM job arrays (slurm/study.sbatch), watch them, and
record each point (point.json) as the local backend does, so ``cnnscale report`` reads the results as usual.

Placement: a point of world size N runs on ``ceil(N / gpus_per_node)`` nodes with ``min(N, gpus_per_node)``
processes each (``gpus_per_node: 0`` puts the whole point on one node). GPUs are requested (``--gpus-per-node``)
when the study says ``threads_per_process: 0`` (the GPU setting); a CPU study (``threads_per_process`` >= 1) reads
``gpus_per_node`` as processes per node. Points of the same shape share one array; the manifest
``OUT/slurm/points-<nodes>x<per node>.json`` holds each task's run directory and training arguments.

The array ids are kept in ``OUT/slurm/jobs.json``: running the command again while they are queued watches them
instead of submitting twice. Points already ``ok`` are skipped, as with the local backend. Each task's time limit is
the study's ``timeout_s`` (plus 2 minutes for start-up) unless the extra sbatch options give ``--time``.

The templates are the installed package's (:mod:`cnnscale.resources`); the job runs ``-m cnnscale.train`` with the
interpreter that submitted it, so the nodes need the same installation (a shared filesystem), not a checkout.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnscale.errors import UserError
from cnnscale.records import io as records
from cnnscale.records.schema import read_point
from cnnscale.resources import resource_path
from cnnscale.study.launcher import classify_failure, is_script
from cnnscale.study.matrix import Point, check_targets, expand, point_args
from cnnscale.study.outcome import PointRecord, is_done, read_done, record_point, run_summary
from cnnscale.study.spec import StudySpec

__all__ = ["placement", "run_slurm_study", "sbatch_command", "queued"]


def placement(p: Point, spec: StudySpec) -> tuple[int, int, bool]:
    """(nodes, processes per node, request GPUs) of a point."""
    per = spec.gpus_per_node or p.world_size
    if p.world_size > per and p.world_size % per:
        raise UserError(f"{spec.source}: world size {p.world_size} is not a multiple of gpus_per_node {per}")
    return max(1, math.ceil(p.world_size / per)), min(p.world_size, per), bool(spec.gpus_per_node and
                                                                                not spec.threads_per_process)


def _entry(p: Point, spec: StudySpec, run_dir: Path) -> dict[str, Any]:
    args = point_args(p, spec, run_dir)
    i = args.index("--out")
    target = str(Path(p.script).resolve()) if is_script(p.script) else p.script  # the job starts elsewhere
    # sbatch adds --out
    return {"id": p.run_name, "out": str(run_dir), "target": target, "args": args[:i] + args[i + 2:]}


def sbatch_command(spec: StudySpec, shape: tuple[int, int, bool], count: int, manifest: Path, out: Path,
                   extra: list[str], python: str = sys.executable) -> list[str]:
    """The sbatch argument list of one array (no shell involved)."""
    nodes, per, gpus = shape
    env = [f"CNNSCALE_MANIFEST={manifest}", f"CNNSCALE_TRAIN_SBATCH={resource_path('slurm/train.sbatch')}",
           f"CNNSCALE_PYTHON={python}",
           f"CNNSCALE_GPUS_PER_NODE={per if gpus else 0}", f"CNNSCALE_CPU_PROCS={per}"]
    if spec.threads_per_process:
        env.append(f"CNNSCALE_THREADS={spec.threads_per_process}")
    minutes = math.ceil(spec.timeout_s / 60) + 2
    return ["sbatch", "--parsable", f"--array=0-{count - 1}", f"--nodes={nodes}", "--ntasks-per-node=1",
            *([f"--gpus-per-node={per}"] if gpus else []), f"--job-name=study-{spec.name}",
            f"--output={out}/slurm/%x-%A_%a.out", f"--time={minutes}", "--export=ALL," + ",".join(env), *extra,
            str(resource_path("slurm/study.sbatch"))]


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise UserError(f"{cmd[0]!r} not found on PATH: --slurm needs a SLURM cluster (sbatch, squeue, scontrol)")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"{cmd[0]} did not answer within {timeout:.0f} s (is slurmctld up?)") from None


def queued(job_ids: list[str]) -> set[str]:
    """The task ids (``ARRAY_INDEX`` form) of these arrays still pending or running."""
    if not job_ids:
        return set()
    proc = _run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i"])
    return set(proc.stdout.split()) if proc.returncode == 0 else set()


def _submit(spec: StudySpec, out: Path, todo: list[Point], extra: list[str], say: Callable[[str], None]) -> dict:
    groups: dict[tuple[int, int, bool], list[Point]] = {}
    for p in todo:
        groups.setdefault(placement(p, spec), []).append(p)
    jobs: dict[str, Any] = {}
    for shape, pts in groups.items():
        manifest = out / "slurm" / f"points-{shape[0]}x{shape[1]}.json"
        for p in pts:
            shutil.rmtree(out / p.run_name, ignore_errors=True)  # a stale failed attempt: start clean
        records.write_json(manifest, [_entry(p, spec, out / p.run_name) for p in pts])
        proc = _run(sbatch_command(spec, shape, len(pts), manifest, out, extra))
        if proc.returncode != 0:
            raise UserError(f"sbatch failed: {(proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1]}")
        job_id = proc.stdout.strip().split(";")[0]
        jobs[job_id] = [p.run_name for p in pts]
        say(f"submitted array {job_id}: {len(pts)} point(s) on {shape[0]} node(s) x {shape[1]} process(es)")
    return jobs


def _watch(jobs: dict[str, list[str]], say: Callable[[str], None], poll_s: float) -> None:
    total, last = sum(len(v) for v in jobs.values()), -1
    while True:
        left = len(queued(list(jobs)))
        if left != last:
            say(f"{total - left}/{total} point(s) finished, {left} queued or running")
            last = left
        if not left:
            return
        time.sleep(poll_s)


def _outcome(job_id: str, index: int, name: str, run_dir: Path, out: Path) -> tuple[str, str, float]:
    summary = run_summary(run_dir)
    if summary is not None and summary.status == "ok":
        return "ok", "", float(summary.wall_s or 0)
    info = _run(["scontrol", "show", "job", "-o", f"{job_id}_{index}"]).stdout
    state = next((t.split("=", 1)[1] for t in info.split() if t.startswith("JobState=")), "UNKNOWN")
    log = out / "slurm" / f"study-{name}-{job_id}_{index}.out"
    text = log.read_text(errors="replace") if log.is_file() else ""
    if state == "TIMEOUT":
        return "timeout", "the array task hit its SLURM time limit", 0.0
    if summary is not None and summary.status == "preempted":
        return "failed", f"preempted at step {summary.steps} and not resumed (job state {state})", 0.0
    status, error = classify_failure(1, text)
    return status, f"job {job_id}_{index} {state}: {error}", 0.0


def run_slurm_study(spec: StudySpec, out: Path, sbatch_opts: str = "", poll_s: float = 2.0,
                    say: Callable[[str], None] | None = None) -> list[PointRecord]:
    """Submit the points not yet done, wait for them, record them; returns every point's record in matrix order."""
    say = say or (lambda s: print(f"[study] {s}", flush=True))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    records.write_yaml(out / "study.yaml", spec.raw)
    cached = out / "max_batch.json"
    if spec.max_batch and not cached.is_file():
        raise UserError(f"{spec.source}: the max_batch search runs locally; run the study once without --slurm "
                        f"(it caches {cached.name}) or drop max_batch")
    points = expand(spec, records.read_json(cached) if spec.max_batch else None)
    check_targets(spec, points)
    by_id = {p.run_name: p for p in points}  # one entry per point and repeat
    jobs_file = out / "slurm" / "jobs.json"
    jobs: dict[str, list[str]] = records.read_json(jobs_file) if jobs_file.is_file() else {}
    if queued(list(jobs)):
        say(f"arrays {', '.join(jobs)} from an earlier call are still queued: watching them")
    else:
        todo = [p for p in points if not is_done(out / p.run_name, p)]
        say(f"{len(points)} points, {len(points) - len(todo)} done earlier")
        jobs = _submit(spec, out, todo, shlex.split(sbatch_opts), say) if todo else {}
        records.write_json(jobs_file, jobs)
    _watch(jobs, say, poll_s)
    for job_id, ids in jobs.items():
        for index, pid in enumerate(ids):
            if pid in by_id:  # (absent only if the study file changed while its arrays ran)
                status, error, seconds = _outcome(job_id, index, spec.name, out / pid, out)
                record_point(out / pid, by_id[pid], spec.name, status, error, seconds, backend="slurm",
                             job_id=f"{job_id}_{index}")
    return [_final(out / p.run_name, p, spec) for p in points]


def _final(run_dir: Path, p: Point, spec: StudySpec) -> PointRecord:
    """A point's record after the arrays ended: done (now or earlier), else what point.json says, else failed."""
    rec = read_done(run_dir, p)
    if rec is not None:
        return rec
    try:
        return read_point(run_dir)
    except (OSError, ValueError):
        return record_point(run_dir, p, spec.name, "failed", "no record: the point was not run", 0.0,
                            backend="slurm")
