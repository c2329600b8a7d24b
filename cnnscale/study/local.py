"""The local study runner: every point of a study's matrix as a real multi-process launch on this machine.

Each point writes one run directory ``OUT/<point id>/``: the trainer's records, ``launch.log``, and the study's
``point.json`` (:mod:`cnnscale.study.outcome`). Points already done (point.json and summary.json both ok at the
right world size) are skipped, so a study resumes where it stopped. A point that fails is recorded with status
failed | oom | timeout and its error line, and the study goes on. Model names are checked by the trainer, inside
the point, so a bad name is a failed point with the trainer's one-line error.

Before the matrix: an optional max_batch search (the largest micro-batch per model that fits, by halving on
out-of-memory), and an all-reduce benchmark (:mod:`cnnscale.study.allreduce_bench`) that fits the "measured"
interconnect into ``OUT/allreduce.json``. Nothing here imports torch: the launches are subprocesses.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from cnnscale.errors import UserError
from cnnscale.records import io as records
from cnnscale.study.launcher import (
    BACKENDS,
    Backend,
    build_command,
    check_gpu_world_sizes,
    free_port,
    point_env,
    port_in_use,
)
from cnnscale.study.matrix import Point, check_targets, expand, point_args
from cnnscale.study.outcome import PointRecord, read_done, record_point, run_summary
from cnnscale.study.progress import StudyProgress, make_study_progress
from cnnscale.study.spec import StudySpec

__all__ = ["run_point", "run_study", "find_max_batch", "ALLREDUCE_MODULE"]

ALLREDUCE_MODULE = "cnnscale.study.allreduce_bench"


def run_point(p: Point, spec: StudySpec, run_dir: Path, backend: Backend) -> PointRecord:
    """Launch one point (one retry if its port was taken meanwhile) and record how it ended (point.json)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale failed attempt: metrics.jsonl is appended to, so start clean
    run_dir.mkdir(parents=True)
    attempts = 0
    for _attempt in range(2):
        attempts += 1
        cmd = build_command(p.script, point_args(p, spec, run_dir), p.world_size, free_port(), spec.launcher)
        out = backend.run(cmd, point_env(spec.threads_per_process), run_dir / "launch.log", spec.timeout_s)
        if out.status != "failed" or not port_in_use((run_dir / "launch.log").read_text(errors="replace")):
            break
    return record_point(run_dir, p, spec.name, out.status, out.error, out.seconds, attempts=attempts,
                        backend=backend.name)


def find_max_batch(probe: Callable[[int], str], start: int) -> int:
    """Largest micro-batch ``start / 2^k`` for which ``probe(batch)`` does not report "oom" (halving on each
    out-of-memory, as Accelerate's ``find_executable_batch_size`` does). ``probe`` returns a status string; each
    probe is a real launch, so this costs up to log2(start) launches."""
    batch = start
    while batch >= 1:
        status = probe(batch)
        if status == "ok":
            return batch
        if status != "oom":
            raise UserError(f"max_batch search: probe at micro_batch {batch} ended '{status}', not oom")
        batch //= 2
    raise UserError(f"max_batch search: every micro-batch from {start} down to 1 ran out of memory")


def _max_batches(spec: StudySpec, out: Path, backend: Backend, say: Callable[[str], None]) -> dict[str, int]:
    if not spec.max_batch:
        return {}
    path = out / "max_batch.json"
    found: dict[str, int] = records.read_json(path) if path.is_file() else {}
    for m in spec.models:
        if m.name in found:
            continue

        def probe(bs: int, name: str = m.name) -> str:
            p = Point(name, 1, spec.precisions[0], bs, 1, spec.max_batch["steps"], "probe", tuple(spec.overrides))
            return run_point(p, spec, out / "_max_batch" / p.id, backend).status

        found[m.name] = find_max_batch(probe, spec.max_batch["start"])
        say(f"max_batch {m.name}: {found[m.name]}")
        records.write_json(path, found)
    return found


def _allreduce_bench(spec: StudySpec, out: Path, backend: Backend, say: Callable[[str], None]) -> None:
    path = out / "allreduce.json"
    if not spec.allreduce_bench or path.is_file() or max(spec.world_sizes) < 2:
        return
    args = ["--out", str(path), "--max-mb", "32", "--repeats", "3"]
    cmd = build_command(ALLREDUCE_MODULE, args, 2, free_port(), spec.launcher)
    res = backend.run(cmd, point_env(spec.threads_per_process), out / "allreduce.log", 180)
    say(f"all-reduce benchmark: {res.status} ({res.seconds:.0f} s){' ' + res.error if res.error else ''}")


def _img_per_s(run_dir: Path) -> float | None:
    summary = run_summary(run_dir)
    return summary.img_per_s if summary is not None else None


def run_study(spec: StudySpec, out: Path, backend: Backend | None = None,
              progress: StudyProgress | None = None) -> list[PointRecord]:
    """Run every point not already done; returns the point records (done and new), in matrix order."""
    backend = backend or BACKENDS["local"]()
    too_big = [n for n in spec.world_sizes if spec.gpus_per_node and n > spec.gpus_per_node]
    if too_big and backend.name == "local":
        raise UserError(f"{spec.source}: world sizes {too_big} exceed gpus_per_node {spec.gpus_per_node}; "
                        "the local backend runs one machine (use a multi-node backend)")
    if backend.name == "local":
        check_gpu_world_sizes(spec.world_sizes)  # GPU machine: at most one process per visible GPU
    check_targets(spec, expand(spec))  # the batch rules and missing scripts fail here, before anything is written
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    records.write_yaml(out / "study.yaml", spec.raw)
    prog = progress or make_study_progress()
    _allreduce_bench(spec, out, backend, prog.say)
    points = expand(spec, _max_batches(spec, out, backend, prog.say))
    prog.start(len(points))
    results = []
    for p in points:
        run_dir = out / p.id
        rec = read_done(run_dir, p)
        skipped = rec is not None
        if rec is None:
            prog.begin(p)
            rec = run_point(p, spec, run_dir, backend)
        prog.done(p, rec, _img_per_s(run_dir), skipped=skipped)
        results.append(rec)
    prog.close()
    return results
