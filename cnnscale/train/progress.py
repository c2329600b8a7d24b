"""Progress display: a rich bar on a TTY, plain log lines otherwise (as under SLURM), nothing on other ranks."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["make_progress", "NullProgress", "PlainProgress", "RichProgress"]


def _fmt(rec: dict[str, Any]) -> str:
    parts = []
    for k, v in rec.items():
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


class NullProgress:
    def advance(self) -> None: ...

    def log(self, rec: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class PlainProgress(NullProgress):
    def __init__(self, total: int) -> None:
        self.total = total

    def log(self, rec: dict[str, Any]) -> None:
        print(f"[cnnscale] step {rec.get('step')}/{self.total} " + _fmt({k: v for k, v in rec.items() if k != 'step'}),
              flush=True)


class RichProgress(NullProgress):
    def __init__(self, total: int, start: int = 0) -> None:
        # lazy: only a TTY run draws a bar; every study point and SLURM job (plain lines) skips ~40 ms of import
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          TextColumn("{task.fields[info]}"))
        self.task = self.p.add_task("train", total=total, completed=start, info="")
        self.p.start()

    def advance(self) -> None:
        self.p.advance(self.task)

    def log(self, rec: dict[str, Any]) -> None:
        info = f"loss {rec.get('loss', float('nan')):.4f} lr {rec.get('lr', 0):.3g}"
        if "window_img_per_s" in rec:
            info += f" {rec['window_img_per_s']:.0f} img/s"
        self.p.update(self.task, info=info)

    def close(self) -> None:
        self.p.stop()


def make_progress(mode: str, total: int, is_main: bool, start: int = 0) -> NullProgress:
    if not is_main or mode == "none":
        return NullProgress()
    if mode == "rich" or (mode == "auto" and sys.stdout.isatty()):
        return RichProgress(total, start)
    return PlainProgress(total)
