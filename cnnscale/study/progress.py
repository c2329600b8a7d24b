"""A study's progress lines: plain ``[study] ...`` lines (under SLURM, in a log), or a rich live bar on a TTY."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cnnscale.study.matrix import Point
from cnnscale.study.outcome import PointRecord

__all__ = ["StudyProgress", "RichStudyProgress", "make_study_progress"]


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

    def done(self, p: Point, rec: PointRecord, img_per_s: float | None, skipped: bool) -> None:
        """One point finished (or was ``skipped``, done earlier); ``img_per_s`` from the run's summary."""
        self.n += 1
        what = "done earlier, skipped" if skipped else f"{rec.seconds or 0:.0f} s"
        rate = f" {img_per_s:.1f} img/s" if rec.status == "ok" and img_per_s else ""
        err = f" - {rec.error}" if rec.status != "ok" else ""
        self.say(f"{self.n}/{self.total} {p.id}: {rec.status}{rate} ({what}){err}")

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

    def start(self, total: int) -> None:
        self.total = total
        self.p.update(self.task, total=total)

    def begin(self, p: Point) -> None:
        self.p.update(self.task, info=f"running {p.id}")

    def done(self, p: Point, rec: PointRecord, img_per_s: float | None, skipped: bool) -> None:
        super().done(p, rec, img_per_s, skipped)
        self.p.advance(self.task)

    def close(self) -> None:
        self.p.update(self.task, info="")
        self.p.stop()


def make_study_progress() -> StudyProgress:
    """The rich bar on a TTY, plain lines otherwise."""
    return RichStudyProgress() if sys.stdout.isatty() else StudyProgress()
