"""Profiling stepped by the training loop: throughput, step-time split, gradient sync, memory, utilisation, MFU.

The loop always calls the same methods (``start``, ``iter_data``, ``phase``, ``step``, ``log_metrics``, ``stop``,
``summary``); with profiling off it gets a :class:`NullProfiler`, whose methods do nothing, so the loop has no ``if``.

- Throughput is total images over total time, never a mean of per-step rates. ``compute_img_per_s`` excludes the
  time spent waiting for the next batch.
- Phases are timed with perf_counter on CPU and CUDA events on GPU; events are read only at log steps and at the end
  (one synchronise each), so timing does not serialise the host with the device.
- Gradient synchronisation is measured, not guessed: at optimiser step 2 and every ``profile.sync_probe_every``
  steps after (auto: 25) the profiler re-runs the step's last micro-batch forward+backward under
  ``accelerator.no_sync`` and compares it with the synced forward+backward just timed. The probe restores gradients,
  buffers and RNG state, so training is unchanged, and its time is excluded from every figure. World size 1: 0 s.
- ``profile.trace_steps`` N > 0: a torch.profiler trace of the first N steps through ``accelerator.profile()``,
  written to ``RUN/trace/`` (those steps run slower under the tracer).
- Memory: allocator peaks (``max_memory_allocated/reserved``) and NVML's used memory (which also sees NCCL's
  buffers) on GPU; peak RSS and process CPU % always. GPU figures are ``None`` without a GPU.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from statistics import median
from typing import Any

import torch

from cnnscale.profile.mfu import mfu_setup
from cnnscale.profile.nvml import NvmlSampler

__all__ = ["Profiler", "NullProfiler", "build_profiler", "percentile", "StepClock", "SYNC_PROBE_EVERY"]

SYNC_PROBE_EVERY = 25  # auto probe interval (optimiser steps): one extra fwd+bwd per 25 steps, excluded from timings


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


class _Marks:
    """Timestamps that are floats on CPU and CUDA events on GPU; spans between two marks are read lazily."""

    def __init__(self, device: torch.device, clock: Any) -> None:
        self.cuda = device.type == "cuda"
        self.clock = clock

    def mark(self) -> Any:
        if not self.cuda:
            return self.clock()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def span(self, a: Any, b: Any) -> float:
        """Seconds from ``a`` to ``b``; on GPU the caller has synchronised already."""
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a


class NullProfiler:
    """Same interface as :class:`Profiler`; records only what the summary always needs (images and wall time)."""

    def __init__(self, clock: Any = time.perf_counter) -> None:
        self.clock = clock
        self.images = 0
        self.t0: float | None = None
        self.t_end: float | None = None
        self.excluded_s = 0.0

    def env(self) -> dict[str, Any]:
        return {"profiling": False}

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
        wall = max(end - (self.t0 if self.t0 is not None else end) - self.excluded_s, 1e-9)
        return {"images": self.images, "train_time_s": wall, "img_per_s": self.images / wall}


class Profiler(NullProfiler):
    """The measuring profiler. ``accelerator``, ``model`` and ``cfg`` are optional so that the arithmetic can be
    tested alone with a fake clock; without them there is no sync probe, FLOP count or peak."""

    def __init__(self, device: torch.device, world_size: int = 1, clock: Any = time.perf_counter,
                 accelerator: Any = None, model: Any = None, cfg: Any = None, sampler: Any = None,
                 run_dir: Any = None) -> None:
        super().__init__(clock)
        self.device, self.world_size, self.acc, self.model, self.cfg = device, world_size, accelerator, model, cfg
        self.sclock = StepClock(device, clock)
        self.marks = _Marks(device, clock)
        self.phase_s: dict[str, float] = {"data": 0.0, "fwd_bwd": 0.0, "optim": 0.0}
        self.step_times: list[float] = []
        self.steps = 0
        self._pending: list[tuple[str, Any, Any]] = []  # (phase or "step", mark, mark) not yet read
        self._last_mark: Any = None
        self._last_fwd_bwd: Any = None
        self._last_batch: Any = None
        self._window_images = 0
        self._window_t0: float | None = None
        self._window_excluded = 0.0
        self.synced_s: list[float] = []
        self.unsynced_s: list[float] = []
        pcfg = getattr(cfg, "profile", None)
        self.probe_every = (pcfg.sync_probe_every or SYNC_PROBE_EVERY) if pcfg is not None else SYNC_PROBE_EVERY
        self.warmup_steps = pcfg.warmup_steps if pcfg is not None else 0
        self.measured_steps = 0
        self.sampler = sampler if sampler is not None else NvmlSampler.for_device(device, getattr(pcfg, "nvml_hz", 10))
        self._setup: dict[str, Any] | None = None
        self.trace_steps = pcfg.trace_steps if pcfg is not None and accelerator is not None and run_dir else 0
        self.trace_dir = Path(run_dir) / "trace" if run_dir else None
        self._trace = contextlib.ExitStack()
        self._proc: Any = None
        self.cpu_percent: float | None = None

    # ------------------------------------------------------------------------------------------ start-up
    def env(self) -> dict[str, Any]:
        """Start-up measurements (FLOPs per image, peak TFLOP/s), also written to env.json."""
        if self._setup is None:
            self._setup = mfu_setup(self.device, self.cfg)
            self._setup.update({"profiling": True, "nvml": self.sampler.status, "sync_probe_every": self.probe_every,
                                "sync_measured": self._can_probe() or self.world_size == 1})
        return dict(self._setup)

    def start(self) -> None:
        import psutil

        self.env()
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        _reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sampler.start()
        if self.trace_steps:
            self._start_trace()
        self.t0 = self._window_t0 = self.sclock.now()
        self._last_mark = self.marks.mark()

    # ------------------------------------------------------------------------------------------ the loop
    def iter_data(self, it: Iterable[Any]) -> Iterator[Any]:
        iterator = iter(it)
        while True:
            t = self.clock()  # host time blocked on the loader
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.phase_s["data"] += self.clock() - t
            self._last_batch = batch
            yield batch

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        a = self.marks.mark()
        try:
            yield
        finally:
            b = self.marks.mark()
            self._pending.append((name, a, b))
            if name == "fwd_bwd":
                self._last_fwd_bwd = (a, b)

    def step(self, images: int) -> None:
        super().step(images)
        self.steps += 1
        self.measured_steps += 1
        self._window_images += images
        mark = self.marks.mark()
        if self._last_mark is not None:
            self._pending.append(("step", self._last_mark, mark))
        self._last_mark = mark
        if self.steps == self.warmup_steps:
            self._end_warmup()
        if self._can_probe() and self.steps >= 2 and (self.steps - 2) % self.probe_every == 0:
            self._probe_sync()
        if self.steps == self.trace_steps:
            self._end_trace()

    def _end_warmup(self) -> None:
        """Restart the run-level counters: throughput, phases and step times cover only the steps after warm-up
        (the windowed img/s in metrics.jsonl still covers every step)."""
        self._flush()
        self.images, self.measured_steps, self.excluded_s = 0, 0, 0.0
        self.phase_s = dict.fromkeys(self.phase_s, 0.0)
        self.step_times.clear()
        self.t0 = self.sclock.now()
        self._last_mark = self.marks.mark()

    def _start_trace(self) -> None:
        from accelerate.utils import ProfileKwargs

        activities = ["cpu", "cuda"] if self.marks.cuda else ["cpu"]
        self._trace.enter_context(self.acc.profile(ProfileKwargs(activities=activities, record_shapes=True,
                                                                 output_trace_dir=str(self.trace_dir))))

    def _end_trace(self) -> None:
        """Write the trace (one Chrome-trace JSON per rank under RUN/trace/); the writing time is excluded."""
        t0 = self.sclock.now()
        self._trace.close()
        spent = self.sclock.now() - t0
        self.excluded_s += spent
        self._window_excluded += spent
        self._last_mark = self.marks.mark()

    def _flush(self) -> None:
        """Read every pending span (on GPU, after one synchronise)."""
        if self.marks.cuda and self._pending:
            torch.cuda.synchronize(self.device)  # note: a CPU-GPU sync point, at log steps and probes only
        for name, a, b in self._pending:
            dt = self.marks.span(a, b)
            if name == "step":
                self.step_times.append(dt)
            else:
                self.phase_s[name] = self.phase_s.get(name, 0.0) + dt
        self._pending.clear()

    # ------------------------------------------------------------------------------------------ gradient sync
    def _can_probe(self) -> bool:
        return (self.world_size > 1 and self.acc is not None and self.model is not None
                and hasattr(self.model, "no_sync") and _is_ddp(self.acc))

    def _probe_sync(self) -> None:
        if self._last_batch is None or self._last_fwd_bwd is None:
            return
        t0 = self.sclock.now()
        synced = self.marks.span(*self._last_fwd_bwd)
        self.synced_s.append(synced)
        self.unsynced_s.append(_nosync_fwd_bwd(self.acc, self.model, self._last_batch, self.cfg, self.sclock))
        spent = self.sclock.now() - t0
        self.excluded_s += spent
        self._window_excluded += spent
        self._last_mark = self.marks.mark()  # the next step's time starts after the probe

    def sync_per_step(self) -> float | None:
        """Median synced minus median unsynced forward+backward: the all-reduce time not hidden by backward."""
        if self.world_size == 1:
            return 0.0
        if not self.synced_s:
            return None
        return max(median(self.synced_s) - median(self.unsynced_s), 0.0)

    # ------------------------------------------------------------------------------------------ records
    def log_metrics(self) -> dict[str, Any]:
        self._flush()
        now = self.sclock.now()
        dt = max(now - (self._window_t0 if self._window_t0 is not None else now) - self._window_excluded, 1e-9)
        out: dict[str, Any] = {"window_img_per_s": self._window_images / dt, "rss_bytes": _rss_bytes()}
        out.update(self.sampler.window())
        self._window_images, self._window_t0, self._window_excluded = 0, now, 0.0
        return out

    def stop(self) -> None:
        self._flush()
        self.t_end = self.sclock.now()
        self._trace.close()  # a run shorter than trace_steps: write what there is
        self.sampler.stop()
        self.cpu_percent = self._proc.cpu_percent(None) if self._proc is not None else None
        self.peak_rss = _peak_rss_bytes()  # the training loop's peak: before the final checkpoint and evaluation

    def summary(self) -> dict[str, Any]:
        self._flush()
        s = super().summary()
        wall = s["train_time_s"]
        compute = max(wall - self.phase_s["data"], 1e-9)
        sync_step = self.sync_per_step()
        sync_s = sync_step * self.measured_steps if sync_step is not None else None
        s.update({
            "compute_img_per_s": self.images / compute,
            "step_ms_p50": _ms(percentile(self.step_times, 50)),
            "step_ms_p90": _ms(percentile(self.step_times, 90)),
            "data_wait_s": self.phase_s["data"],
            "fwd_bwd_s": max(self.phase_s["fwd_bwd"] - (sync_s or 0.0), 0.0),
            "optim_s": self.phase_s["optim"],
            "sync_s": sync_s,
            "sync_share": sync_s / wall if sync_s is not None else None,
            "cpu_percent": self.cpu_percent,
        })
        s.update(self.sampler.summary())
        s.update(_allocator_peaks(self.device))
        s.update(self._mfu(s["img_per_s"]))
        s.update(self._across_ranks(s))
        return s

    def _mfu(self, img_per_s: float) -> dict[str, Any]:
        from cnnscale.profile.mfu import mfu

        env = self.env()
        out = mfu(env.get("flops_per_img"), img_per_s / self.world_size, env.get("peak_tflops"))
        out.update({"peak_tflops": env.get("peak_tflops"), "peak_source": env.get("peak_source")})
        return out

    def _across_ranks(self, s: dict[str, Any]) -> dict[str, Any]:
        """Peak RSS and memory peaks as the max over ranks (one small gather, at the end only)."""
        keys = ("gpu_util_pct_peak", "gpu_mem_used_bytes_peak", "max_memory_allocated_bytes",
                "max_memory_reserved_bytes")
        mine = {"peak_rss_bytes": getattr(self, "peak_rss", None) or _peak_rss_bytes(), **{k: s.get(k) for k in keys}}
        everyone = [mine]
        if self.world_size > 1 and self.acc is not None:
            from accelerate.utils import gather_object

            everyone = gather_object([mine])
        out = {k: max((d[k] for d in everyone if d[k] is not None), default=None) for k in mine}
        # Per rank, in rank order (memory by ZeRO stage differs between ranks): CPU RSS and the GPU allocator peak.
        out["rank_peak_rss_bytes"] = [d["peak_rss_bytes"] for d in everyone]
        out["rank_max_memory_allocated_bytes"] = [d["max_memory_allocated_bytes"] for d in everyone]
        return out


# ---------------------------------------------------------------------------------------------- helpers
def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def _is_ddp(accelerator: Any) -> bool:
    return str(accelerator.distributed_type).split(".")[-1] in ("MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_XPU")


def _nosync_fwd_bwd(acc: Any, model: Any, batch: Any, cfg: Any, sclock: StepClock) -> float:
    """Time one forward+backward of ``batch`` under no_sync, leaving grads, buffers and RNG as they were."""
    import torch.nn.functional as F

    images, labels = batch[0], batch[1]
    if cfg is not None and cfg.fast.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    params = list(model.parameters())
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    buffers = [b.detach().clone() for b in model.buffers()]
    devices = [images.device.index or 0] if images.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            t0 = sclock.now()
            with acc.no_sync(model):
                with acc.autocast():
                    loss = F.cross_entropy(model(images), labels)
                loss.backward()
            return sclock.now() - t0
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)


def _allocator_peaks(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"max_memory_allocated_bytes": None, "max_memory_reserved_bytes": None}
    return {"max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "max_memory_reserved_bytes": torch.cuda.max_memory_reserved(device)}


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux >= 4.0), so a second run in one process (bench) gets its own."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_rss_bytes() -> int:
    """Peak resident set since the last reset (VmHWM), else the process's lifetime peak."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return max(int(line.split()[1]) * 1024, _rss_bytes())
    return max(int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, _rss_bytes())  # Linux: KiB


def build_profiler(enabled: bool, device: torch.device, world_size: int = 1, accelerator: Any = None,
                   model: Any = None, cfg: Any = None, run_dir: Any = None, total_steps: int | None = None,
                   **_: Any) -> NullProfiler:
    """The measuring :class:`Profiler` when ``enabled``, else the no-op :class:`NullProfiler`.

    ``total_steps``: the run's length; warm-up (``profile.warmup_steps``) is left out of the figures only when at
    least as many steps follow it. Without it (bench, which warms up on its own) nothing is left out."""
    if not enabled:
        return NullProfiler()
    prof = Profiler(device, world_size, accelerator=accelerator, model=model, cfg=cfg, run_dir=run_dir)
    if total_steps is None or total_steps < 2 * prof.warmup_steps:
        prof.warmup_steps = 0
    return prof
