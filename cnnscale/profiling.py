"""Profiling stepped by the training loop: throughput, step-time split, memory.

The loop always calls the same methods; with profiling off it gets a :class:`NullProfiler`, whose methods do
nothing, so the loop has no ``if``.

Throughput is total images over total time, never a mean of per-step rates. "compute" throughput excludes time spent
waiting for the next batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["Profiler", "NullProfiler", "build_profiler", "percentile", "StepClock"]


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
        if self.device.type == "cuda":  # note: a CPU-GPU sync point
            torch.cuda.synchronize(self.device)
        return self.clock()


class NullProfiler:
    """Same interface as :class:`Profiler`; records only what the summary always needs (images and wall time)."""

    def __init__(self, clock: Any = time.perf_counter) -> None:
        self.clock = clock
        self.images = 0
        self.t0: float | None = None
        self.t_end: float | None = None

    def start(self) -> None:
        self.t0 = self.clock()

    def iter_data(self, it: Iterable[Any]) -> Iterator[Any]:
        return iter(it)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    def step(self, images: int) -> None:
        self.images += images

    def log_metrics(self) -> dict[str, Any]:
        return {}

    def stop(self) -> None:
        self.t_end = self.clock()

    def summary(self) -> dict[str, Any]:
        end = self.t_end if self.t_end is not None else self.clock()
        wall = max(end - (self.t0 or end), 1e-9)
        return {"images": self.images, "train_time_s": wall, "img_per_s": self.images / wall}


class Profiler(NullProfiler):
    """Times data wait, forward+backward and optimiser phases per optimiser step (perf_counter after a device
    synchronise on GPU), and keeps per-step times for percentiles."""

    def __init__(self, device: torch.device, world_size: int = 1, clock: Any = time.perf_counter) -> None:
        super().__init__(clock)
        self.sclock = StepClock(device, clock)
        self.world_size = world_size
        self.phase_s: dict[str, float] = {"data": 0.0, "fwd_bwd": 0.0, "optim": 0.0}
        self.step_times: list[float] = []
        self._last_step_end: float | None = None
        self._window_images = 0
        self._window_t0: float | None = None

    def start(self) -> None:
        self.t0 = self.sclock.now()
        self._last_step_end = self._window_t0 = self.t0

    def iter_data(self, it: Iterable[Any]) -> Iterator[Any]:
        iterator = iter(it)
        while True:
            t = self.clock()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.phase_s["data"] += self.clock() - t
            yield batch

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = self.sclock.now()
        try:
            yield
        finally:
            self.phase_s[name] = self.phase_s.get(name, 0.0) + self.sclock.now() - t

    def step(self, images: int) -> None:
        super().step(images)
        self._window_images += images
        now = self.clock()
        if self._last_step_end is not None:
            self.step_times.append(now - self._last_step_end)
        self._last_step_end = now

    def log_metrics(self) -> dict[str, Any]:
        now = self.sclock.now()
        dt = max(now - (self._window_t0 or now), 1e-9)
        out = {"window_img_per_s": self._window_images / dt}
        self._window_images, self._window_t0 = 0, now
        return out

    def summary(self) -> dict[str, Any]:
        s = super().summary()
        compute = max(s["train_time_s"] - self.phase_s["data"], 1e-9)
        s.update({
            "compute_img_per_s": self.images / compute,
            "data_wait_s": self.phase_s["data"],
            "fwd_bwd_s": self.phase_s["fwd_bwd"],
            "optim_s": self.phase_s["optim"],
            "step_ms_p50": _ms(percentile(self.step_times, 50)),
            "step_ms_p90": _ms(percentile(self.step_times, 90)),
        })
        return s


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def build_profiler(enabled: bool, device: torch.device, world_size: int = 1, **_: Any) -> NullProfiler:
    return Profiler(device, world_size) if enabled else NullProfiler()
