"""Step timing: a wall clock that waits for queued GPU work, and marks that are CUDA events on GPU.

On CPU a mark is a ``perf_counter`` float. On GPU it is a recorded CUDA event: recording costs no synchronisation,
and the span between two events is read only later, after one ``synchronize`` (see :class:`Marks.span`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["percentile", "StepClock", "Marks"]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]) of ``values``; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class StepClock:
    """Wall clock; synchronises the device before reading so queued GPU work is counted."""

    def __init__(self, device: torch.device, clock: Any = time.perf_counter) -> None:
        self.device = device
        self.clock = clock

    def now(self) -> float:
        """Seconds on ``clock``; note: a CPU-GPU sync point on a CUDA device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.clock()


class Marks:
    """Timestamps that are floats on CPU and CUDA events on GPU; spans between two marks are read lazily."""

    def __init__(self, device: torch.device, clock: Any) -> None:
        self.cuda = device.type == "cuda"
        self.clock = clock

    def mark(self) -> Any:
        """A timestamp now (no synchronisation)."""
        if not self.cuda:
            return self.clock()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def span(self, a: Any, b: Any) -> float:
        """Seconds from ``a`` to ``b``; on GPU the caller has synchronised already."""
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a
