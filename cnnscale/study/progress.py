"""A study's progress lines: plain ``[study] ...`` lines (under SLURM, in a log), or a rich live bar on a TTY.

Each finished point prints its status and figures from the run's summary (img/s, median step, exposed sync share,
MFU); a figure that cannot be true is printed as "suspect" with the reason from the one check that the report and
bench use too (:mod:`cnnscale.records.checks`), never as fact."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cnnscale.records.checks import check_mfu, check_share, check_time
from cnnscale.records.schema import Summary
from cnnscale.study.matrix import Point
from cnnscale.study.outcome import PointRecord

__all__ = ["StudyProgress", "RichStudyProgress", "make_study_progress", "figures", "point_label"]


def _figure(text: str, reason: str | None) -> str:
    return f"suspect {text} ({reason})" if reason else text


def figures(summary: Summary | None) -> str:
    """The figures of a finished run, each checked: ``" 2903.8 img/s, step 22.0 ms, sync 12%, MFU 1.2%"``."""
    if summary is None:
        return ""
    out = []
    if summary.img_per_s is not None:
        out.append(f"{summary.img_per_s:.1f} img/s")  # no rule for a rate (report.md's checks: share, mfu, time)
    if summary.step_ms_p50 is not None:
        out.append(_figure(f"step {summary.step_ms_p50:.1f} ms", check_time(summary.step_ms_p50)))
    if summary.sync_share is not None:
        out.append(_figure(f"sync {100 * summary.sync_share:.0f}%", check_share(summary.sync_share)))
    if summary.mfu is not None:
        out.append(_figure(f"MFU {100 * summary.mfu:.1f}%", check_mfu(summary.mfu)))
    return " " + ", ".join(out) if out else ""


def point_label(p: Point) -> str:
    """``lenet5-ws2-no-mb64 repeat 2/3`` (the id alone when the point runs once)."""
    return f"{p.id} repeat {p.repeat + 1}/{p.repeats}" if p.repeats > 1 else p.id


class StudyProgress:
    """Plain lines (as under SLURM or in a log); :class:`RichStudyProgress` adds a live bar on a TTY."""

    def __init__(self) -> None:
        self.total = self.n = 0
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[study] {text}", flush=True)

    def start(self, points: list[Point]) -> None:
        self.total = len(points)
        distinct = len({p.id for p in points})
        counts = sorted({p.repeats for p in points})
        reps = f"{counts[0]}" if len(counts) == 1 else "-".join(map(str, (counts[0], counts[-1])))
        self.say(f"{self.total} points" + (f" ({distinct} x {reps} repeats, round-robin)" if self.total > distinct
                                           else ""))

    def begin(self, p: Point, resume: bool = False) -> None:
        how = ", resuming from its checkpoint" if resume else ""
        self.say(f"{self.n + 1}/{self.total} {point_label(p)} (global batch {p.global_batch}{how}) ...")

    def done(self, p: Point, rec: PointRecord, summary: Summary | None, skipped: bool) -> None:
        """One point finished (or was ``skipped``, done earlier); its figures from the run's ``summary``."""
        self.n += 1
        what = "done earlier, skipped" if skipped else f"{rec.seconds or 0:.0f} s"
        figs = figures(summary) if rec.status == "ok" else ""
        err = f" - {rec.error}" if rec.status != "ok" else ""
        self.say(f"{self.n}/{self.total} {point_label(p)}: {rec.status}{figs} ({what}){err}")

    def close(self) -> None:
        self.say(f"finished in {time.monotonic() - self.t0:.0f} s")


class RichStudyProgress(StudyProgress):
    """The plain lines above a live bar (points done / total, elapsed, the point running)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = Progress(TextColumn("[bold]study"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("{task.fields[info]}"))
        self.task = self.p.add_task("study", total=None, info="")
        self.p.start()

    def say(self, text: str) -> None:
        self.p.console.print(text)

    def start(self, points: list[Point]) -> None:
        self.total = len(points)
        self.p.update(self.task, total=self.total)

    def begin(self, p: Point, resume: bool = False) -> None:
        self.p.update(self.task, info=f"running {point_label(p)}" + (" (resumed)" if resume else ""))

    def done(self, p: Point, rec: PointRecord, summary: Summary | None, skipped: bool) -> None:
        super().done(p, rec, summary, skipped)
        self.p.advance(self.task)

    def close(self) -> None:
        self.p.update(self.task, info="")
        self.p.stop()


def make_study_progress() -> StudyProgress:
    """The rich bar on a TTY, plain lines otherwise."""
    return RichStudyProgress() if sys.stdout.isatty() else StudyProgress()
