"""How a study point ended: the study's judgement of a launch, written to ``point.json`` beside the trainer's files.

The trainer owns ``summary.json`` and the study never writes it. The study writes one :class:`PointRecord` per point
(:func:`record_point`): the point's parameters, and its status, error line and launch seconds. A launch that exited
0 counts as ok only when the run's own summary says ok at the expected world size (a launcher that silently ran
world size 1 is a failure); a run whose summary says ``diverged`` (the trainer stopped on a non-finite loss, exit 3)
is recorded as diverged. Each repeat of a point is its own run directory (:attr:`Point.run_name`) with its own
record, which carries the repeat and the point's id (``point_id``); ``id`` is the run directory's name. Both
backends (local, SLURM) record through here. Costs: two small JSON files per point.
"""

from __future__ import annotations

from pathlib import Path

from cnnscale.records.run import has_checkpoint
from cnnscale.records.schema import Point as PointRecord
from cnnscale.records.schema import Summary, read_point, read_summary, write_point
from cnnscale.study.matrix import Point

__all__ = ["PointRecord", "judge", "record_point", "is_done", "read_done", "run_summary", "resumable"]


def run_summary(run_dir: Path) -> Summary | None:
    """The trainer's summary.json of a run directory, or None when it is absent or unreadable."""
    try:
        return read_summary(run_dir)
    except (OSError, ValueError):  # absent, or corrupt (RecordError is a ValueError)
        return None


def judge(summary: Summary | None, p: Point, status: str, error: str) -> tuple[str, str]:
    """(status, error) of a launch that the backend classified as ``status``: an ok launch must have left an ok
    summary.json at the point's world size; a failed launch stays failed whatever the summary says, except that a
    run whose own summary says ``diverged`` (at the point's world size) is diverged."""
    if summary is not None and summary.status == "diverged" and summary.world_size == p.world_size:
        return "diverged", summary.error or error or "the loss became non-finite"
    if status != "ok":
        return status, error
    if summary is None or summary.status != "ok":
        return "failed", "run exited 0 without an ok summary.json"
    if summary.world_size != p.world_size:
        return "failed", f"launched world size {summary.world_size}, expected {p.world_size}"
    return "ok", ""


def record_point(run_dir: Path, p: Point, study: str, status: str, error: str, seconds: float, *,
                 attempts: int = 1, backend: str = "local", job_id: str | None = None) -> PointRecord:
    """Judge a launch (see :func:`judge`) and write ``run_dir/point.json``; returns the record."""
    status, error = judge(run_summary(run_dir), p, status, error)
    rec = PointRecord(study=study, id=p.run_name, point_id=p.id, repeat=p.repeat, model=p.model,
                      world_size=p.world_size, status=status, precision=p.precision, micro_batch=p.micro_batch,
                      grad_accum=p.grad_accum, global_batch=p.global_batch, max_steps=p.max_steps, scaling=p.scaling,
                      settings=p.settings, overrides=dict(p.overrides), script=p.script, attempts=attempts,
                      error=error or None, seconds=round(seconds, 1), run_dir=str(run_dir), backend=backend,
                      job_id=job_id, network=p.network or None)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_point(run_dir, rec)
    return rec


def read_done(run_dir: Path, p: Point) -> PointRecord | None:
    """The point's record when it is done: point.json ok for this point and repeat at the point's world size, and
    the run's summary.json ok at that world size too. None otherwise (absent, failed, or a record that does not
    read). A record from before repeats (no ``point_id``) counts as repeat 0 of the point named by its ``id``."""
    try:
        rec = read_point(run_dir)
    except (OSError, ValueError):
        return None
    summary = run_summary(run_dir)
    same = (rec.point_id or rec.id) == p.id and rec.repeat == p.repeat and rec.id == p.run_name
    ok = rec.status == "ok" and rec.world_size == p.world_size and same
    if not ok or summary is None or summary.status != "ok" or summary.world_size != p.world_size:
        return None
    return rec


def resumable(run_dir: Path) -> bool:
    """Whether a point's earlier attempt should carry on from its checkpoint rather than start again: it has a
    complete checkpoint and it did not diverge (a resume would diverge again, from the last good weights)."""
    if not has_checkpoint(run_dir):
        return False
    summary = run_summary(run_dir)
    return summary is None or summary.status != "diverged"


def is_done(run_dir: Path, p: Point) -> bool:
    """Whether a study may skip the point (see :func:`read_done`)."""
    return read_done(run_dir, p) is not None
