"""The profiler the training loop steps: throughput, step-time split, gradient sync, memory, utilisation, MFU.

The loop always calls the same methods (``start``, ``iter_data``, ``phase``, ``step``, ``log_metrics``, ``stop``,
``summary``); with ``profile.enabled`` off :func:`build_profiler` gives a :class:`NullProfiler`, whose methods do
nothing but count images over wall time, so the loop has no ``if``.

- Throughput is total images over total time, never a mean of per-step rates. ``compute_img_per_s`` excludes the
  time spent waiting for the next batch. On GPU that wait is the device time between two CUDA events recorded
  around fetching the batch: the GPU idle while the batch was not ready, plus the loader's own kernels (the device
  loader's augmentation). A host blocked on a full launch queue while the GPU works is not data wait (host time
  would count it); env.json says which clock (``data_wait_clock``).
- Under DeepSpeed the optimiser step runs inside ``accelerator.backward`` (the engine steps there), so it is part of
  ``fwd_bwd_s`` and ``optim_s`` is None (n/a), not the ~0 s the empty ``optimizer.step()`` would read.
- Phases are timed with perf_counter on CPU and CUDA events on GPU (:mod:`.clock`); events are read only at log
  steps and at the end (one synchronise each), so timing does not serialise the host with the device.
- Gradient communication is timed in DDP's communication hook (:mod:`.commhook`): per step the time buckets were
  in flight (``comm_s``), what was left after the backward's compute ended (``comm_exposed_s``, which is
  ``sync_s``) and the overlap. Under DeepSpeed there is no DDP hook: n/a (None). The no_sync probe of :mod:`.comm`
  (with the task's own loss, e.g. distillation's) stays as a cross-check (``sync_probe_s``), never during warm-up;
  its time is excluded from every figure.
- ``profile.trace_steps`` N > 0: a torch.profiler trace of the first N steps through ``accelerator.profile()``,
  written to ``RUN/trace/`` (those steps run slower under the tracer).
- Memory (:mod:`.memory`): allocator peaks and NVML's used memory (:mod:`.nvml`, which also sees NCCL's buffers)
  on GPU; peak RSS and process CPU % always. GPU figures are ``None`` without a GPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate.utils import ProfileKwargs, gather_object

from cnnscale.config import ProfileConfig
from cnnscale.profile import memory
from cnnscale.profile.clock import Marks, StepClock, percentile
from cnnscale.profile.comm import SYNC_PROBE_EVERY, SyncProbe
from cnnscale.profile.commhook import comm_figures, comm_source, comm_timer
from cnnscale.profile.mfu import MfuInputs, host_syncs_per_step, mfu, mfu_setup
from cnnscale.profile.nvml import NvmlSampler

__all__ = ["Profiler", "NullProfiler", "build_profiler", "percentile", "StepClock", "SYNC_PROBE_EVERY", "MfuInputs"]

_RANK_MAX_KEYS = ("gpu_util_pct_peak", "gpu_mem_used_bytes_peak", "max_memory_allocated_bytes",
                  "max_memory_reserved_bytes")


class NullProfiler:
    """Same interface as :class:`Profiler`; records only what the summary always needs (images and wall time)."""

    def __init__(self, clock: Any = time.perf_counter) -> None:
        self.clock = clock
        self.images = 0
        self.t0: float | None = None
        self.t_end: float | None = None
        self.excluded_s = 0.0
        self.warmup_steps = 0  # no counters to restart

    def env(self) -> dict[str, Any]:
        """Start-up facts for env.json."""
        return {"profiling": False}

    def start(self) -> None:
        """Start the clock (just before the first batch is fetched)."""
        self.t0 = self.clock()

    def iter_data(self, it: Iterable[Any]) -> Iterator[Any]:
        """The batches of ``it`` (the Profiler times the wait for each)."""
        return iter(it)

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time the block as phase ``name`` (``fwd_bwd`` or ``optim``)."""
        return _NOTHING

    def step(self, images: int) -> None:
        """One optimiser step of ``images`` images (all ranks, all micro-batches) is done."""
        self.images += images

    def log_metrics(self) -> dict[str, Any]:
        """Figures for this log step's metrics.jsonl line."""
        return {}

    def stop(self) -> None:
        """Stop the clock (before the final checkpoint and evaluation)."""
        self.t_end = self.clock()

    def summary(self) -> dict[str, Any]:
        """Run figures for summary.json: images, train time, img/s."""
        end = self.t_end if self.t_end is not None else self.clock()
        wall = max(end - (self.t0 if self.t0 is not None else end) - self.excluded_s, 1e-9)
        return {"images": self.images, "train_time_s": wall, "img_per_s": self.images / wall}


class Profiler(NullProfiler):
    """The measuring profiler. ``accelerator``, ``model`` and ``pcfg`` are optional so that the arithmetic can be
    tested alone with a fake clock; without them there is no sync probe, trace, FLOP count or peak."""

    def __init__(self, device: torch.device, world_size: int = 1, clock: Any = time.perf_counter,
                 accelerator: Any = None, model: Any = None, pcfg: ProfileConfig | None = None, sampler: Any = None,
                 run_dir: Any = None, mfu_inputs: MfuInputs | None = None, channels_last: bool = False,
                 task: Any = None) -> None:
        super().__init__(clock)
        pcfg = pcfg or ProfileConfig(warmup_steps=0)
        self.device, self.world_size, self.acc, self.pcfg, self.mfu_inputs = (device, world_size, accelerator, pcfg,
                                                                             mfu_inputs)
        self.sclock = StepClock(device, clock)
        self.marks = Marks(device, clock)
        self.phase_s: dict[str, float] = {"data": 0.0, "fwd_bwd": 0.0, "optim": 0.0}
        self.step_times: list[float] = []
        self.steps = 0
        self._pending: list[tuple[str, Any, Any]] = []  # (phase or "step", mark, mark) not yet read
        self._last_mark: Any = None
        self._last_fwd_bwd: Any = None
        self._last_batch: Any = None
        self._phases: dict[str, _Phase] = {}
        self._window_images = 0
        self._window_t0: float | None = None
        self._window_excluded = 0.0
        self.sync = SyncProbe(accelerator, model, world_size, pcfg.sync_probe_every, self.sclock, channels_last,
                              loss_fn=getattr(task, "loss", None))
        self.comm = comm_timer(model) if model is not None else None
        # DeepSpeed steps its optimiser inside backward: no separate optimiser time to measure.
        self.deepspeed = str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED")
        self.optim_measured = not self.deepspeed
        self.warmup_steps = pcfg.warmup_steps
        self.measured_steps = 0
        self.sampler = sampler if sampler is not None else NvmlSampler.for_device(device, pcfg.nvml_hz)
        self._setup: dict[str, Any] | None = None
        self.trace_steps = pcfg.trace_steps if accelerator is not None and run_dir else 0
        self.trace_dir = Path(run_dir) / "trace" if run_dir else None
        self._trace = contextlib.ExitStack()
        self._proc: Any = None
        self.cpu_percent: float | None = None
        self.peak_rss: int | None = None

    # ------------------------------------------------------------------------------------------ start-up
    def env(self) -> dict[str, Any]:
        """Start-up measurements (FLOPs per image, peak TFLOP/s), also written to env.json."""
        if self._setup is None:
            self._setup = mfu_setup(self.device, self.mfu_inputs, self.pcfg.peak_tflops)
            self._setup.update({"profiling": True, "nvml": self.sampler.status, "sync_probe_every": self.sync.every,
                                "comm_timing": comm_source(self.comm, self.world_size, self.deepspeed),
                                "sync_measured": self.sync.possible or self.world_size == 1,
                                "data_wait_clock": "cuda events" if self.marks.cuda else "host"})
            if self.mfu_inputs is not None:
                self._setup["host_syncs_per_step"] = host_syncs_per_step(self.mfu_inputs.mixed_precision)
        return dict(self._setup)

    def start(self) -> None:
        self.env()
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        memory.reset_peak_rss()
        memory.reset_allocator_peaks(self.device)
        self.sampler.start()
        if self.comm is not None:
            self.comm.reset()
        if self.trace_steps:
            activities = ["cpu", "cuda"] if self.marks.cuda else ["cpu"]
            self._trace.enter_context(self.acc.profile(ProfileKwargs(activities=activities, record_shapes=True,
                                                                     output_trace_dir=str(self.trace_dir))))
        self.t0 = self._window_t0 = self.sclock.now()
        self._last_mark = self.marks.mark()

    # ------------------------------------------------------------------------------------------ the loop
    def iter_data(self, it: Iterable[Any]) -> Iterator[Any]:
        iterator = iter(it)
        while True:
            a = self.marks.mark()  # CPU: host time blocked on the loader; GPU: device time the batch held it up
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self._pending.append(("data", a, self.marks.mark()))
            self._last_batch = batch
            yield batch

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._phases.get(name) or self._phases.setdefault(name, _Phase(self, name))

    def step(self, images: int) -> None:
        super().step(images)
        self.steps += 1
        self.measured_steps += 1
        self._window_images += images
        mark = self.marks.mark()
        if self._last_mark is not None:
            self._pending.append(("step", self._last_mark, mark))
        self._last_mark = mark
        if self.comm is not None:
            self.comm.close_step()
        if self.steps == self.warmup_steps:
            self._end_warmup()
        probe = self.steps > self.warmup_steps and self.sync.due(self.steps - self.warmup_steps)  # never in warm-up
        if probe and self._last_batch is not None and self._last_fwd_bwd is not None:
            self._excluded(lambda: self.sync.probe(self.marks.span(*self._last_fwd_bwd), self._last_batch))
        if self.steps == self.trace_steps:
            self._excluded(self._trace.close)  # writes one Chrome-trace JSON per rank under RUN/trace/

    def _end_warmup(self) -> None:
        """Restart the run-level counters: throughput, phases and step times cover only the steps after warm-up
        (the windowed img/s in metrics.jsonl still covers every step)."""
        self._flush()
        self.images, self.measured_steps, self.excluded_s = 0, 0, 0.0
        self.phase_s = dict.fromkeys(self.phase_s, 0.0)
        self.step_times.clear()
        if self.comm is not None:
            self.comm.reset()
        self.t0 = self.sclock.now()
        self._last_mark = self.marks.mark()

    def _excluded(self, work: Any) -> None:
        """Run ``work`` (a probe, writing the trace) outside every figure: the next step's time starts after it."""
        t0 = self.sclock.now()
        work()
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
        if self.comm is not None:
            self.comm.flush()

    # ------------------------------------------------------------------------------------------ records
    def log_metrics(self) -> dict[str, Any]:
        self._flush()
        now = self.sclock.now()
        dt = max(now - (self._window_t0 if self._window_t0 is not None else now) - self._window_excluded, 1e-9)
        out: dict[str, Any] = {"window_img_per_s": self._window_images / dt, "rss_bytes": memory.rss_bytes()}
        out.update(self.sampler.window())
        self._window_images, self._window_t0, self._window_excluded = 0, now, 0.0
        return out

    def stop(self) -> None:
        self._flush()
        self.t_end = self.sclock.now()
        self._trace.close()  # a run shorter than trace_steps: write what there is
        self.sampler.stop()
        self.cpu_percent = self._proc.cpu_percent(None) if self._proc is not None else None
        self.peak_rss = memory.peak_rss_bytes()  # the training loop's peak: before the final checkpoint and eval

    def summary(self) -> dict[str, Any]:
        """Run figures; in a multi-process run a small gather of memory peaks, so every rank must call it."""
        self._flush()
        s = super().summary()
        wall = s["train_time_s"]
        compute = max(wall - self.phase_s["data"], 1e-9)
        comm = comm_figures(self.comm, self.world_size, self.deepspeed)
        probe_step = self.sync.per_step()
        probe_s = probe_step * self.measured_steps if probe_step is not None else None
        hooked = self.comm is not None or (self.deepspeed and self.world_size > 1)  # the hook's figure, or n/a
        sync_s = comm["comm_exposed_s"] if hooked else probe_s
        s.update({
            "compute_img_per_s": self.images / compute,
            "step_ms_p50": _ms(percentile(self.step_times, 50)),
            "step_ms_p90": _ms(percentile(self.step_times, 90)),
            "data_wait_s": self.phase_s["data"],
            "fwd_bwd_s": max(self.phase_s["fwd_bwd"] - (sync_s or 0.0), 0.0),
            "optim_s": self.phase_s["optim"] if self.optim_measured else None,
            "sync_s": sync_s,
            "sync_share": sync_s / wall if sync_s is not None else None,
            "sync_probe_s": probe_s if self.sync.possible else None,
            "cpu_percent": self.cpu_percent,
            **comm,
        })
        s.update(self.sampler.summary())
        s.update(memory.allocator_peaks(self.device))
        env = self.env()
        s.update(mfu(env.get("train_flops_per_img"), s["img_per_s"] / self.world_size, env.get("peak_tflops")))
        s.update({k: env.get(k) for k in ("peak_tflops", "peak_source", "peak_cache", "peak_age_s")})
        s.update(self._across_ranks(s))
        return s

    def _across_ranks(self, s: dict[str, Any]) -> dict[str, Any]:
        """Peak RSS and memory peaks as the max over ranks (one small gather, at the end only)."""
        mine = {"peak_rss_bytes": self.peak_rss or memory.peak_rss_bytes(), **{k: s.get(k) for k in _RANK_MAX_KEYS}}
        everyone = gather_object([mine]) if self.world_size > 1 and self.acc is not None else [mine]
        out = {k: max((d[k] for d in everyone if d[k] is not None), default=None) for k in mine}
        # Per rank, in rank order (memory by ZeRO stage differs between ranks): CPU RSS and the GPU allocator peak.
        out["rank_peak_rss_bytes"] = [d["peak_rss_bytes"] for d in everyone]
        out["rank_max_memory_allocated_bytes"] = [d["max_memory_allocated_bytes"] for d in everyone]
        return out


_NOTHING = contextlib.nullcontext()


class _Phase:
    """The timing context of one phase name, reused every step (a class, not a generator-based context manager:
    a third of the cost per entry, which shows on LeNet-5's ~10 ms steps)."""

    __slots__ = ("prof", "name", "a")

    def __init__(self, prof: Profiler, name: str) -> None:
        self.prof, self.name, self.a = prof, name, None

    def __enter__(self) -> None:
        self.a = self.prof.marks.mark()

    def __exit__(self, *exc: object) -> None:
        prof, a, b = self.prof, self.a, self.prof.marks.mark()
        prof._pending.append((self.name, a, b))
        if self.name == "fwd_bwd":
            prof._last_fwd_bwd = (a, b)


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def build_profiler(pcfg: ProfileConfig, device: torch.device, world_size: int = 1, *, accelerator: Any = None,
                   model: Any = None, run_dir: str | Path | None = None, total_steps: int | None = None,
                   mfu_inputs: MfuInputs | None = None, channels_last: bool = False,
                   task: Any = None) -> NullProfiler:
    """The measuring :class:`Profiler` when ``pcfg.enabled``, else the no-op :class:`NullProfiler`.

    ``model``: the prepared (DDP-wrapped) model, for the sync probe; ``run_dir``: where a trace goes;
    ``mfu_inputs``: FLOPs per training image and compute dtype (None: MFU n/a); ``channels_last``: the probe's input
    layout; ``task``: the run's task, whose ``loss`` the sync probe uses (None: cross-entropy). ``total_steps``: the
    run's length; warm-up (``pcfg.warmup_steps``) is left out of the figures only when
    at least as many steps follow it. Without it (bench, which warms up on its own) nothing is left out."""
    if not pcfg.enabled:
        return NullProfiler()
    prof = Profiler(device, world_size, accelerator=accelerator, model=model, pcfg=pcfg, run_dir=run_dir,
                    mfu_inputs=mfu_inputs, channels_last=channels_last, task=task)
    if total_steps is None or total_steps < 2 * prof.warmup_steps:
        prof.warmup_steps = 0
    return prof
