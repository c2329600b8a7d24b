"""Gradient communication timed where it happens: a wrapper around DDP's communication hook.

DDP calls its communication hook once per gradient bucket, as soon as the bucket's last gradient is ready, and
waits for the future the hook returns before ``backward()`` returns. :class:`CommTimer` wraps the hook the config
names (DDP's plain all-reduce for ``dist.comm_hook none``, the fp16/bf16 compression hooks otherwise) and marks, per
bucket, the hook's launch and the completion of its future (``perf_counter`` on CPU; CUDA events on GPU, the
completion event recorded on the stream the future's value is ready on, read only at log steps).

Per optimiser step, from those marks (:func:`step_figures`):

- **comm**: the time at least one bucket was in flight (the union of the buckets' launch-to-done intervals);
- **exposed**: the communication left after the backward's compute ends. The last bucket launches when the last
  gradient is computed, so the compute ends at the latest launch, and what is left is the latest completion minus
  that launch (the step waits for it);
- **overlap**: the share of comm that ran while backward still computed, ``1 - exposed / comm`` (Holistic Trace
  Analysis's comm/compute overlap).

A step with no bucket (``dist.compute_only``, whose steps all run under no_sync; an accumulation micro-step) has no
communication: 0 s. Where DDP does not wrap the model (DeepSpeed, one process) there is no hook, and the profiler
says n/a or 0 s; it never guesses.

Registration: Accelerate registers the hook when it wraps the model (``Accelerator.prepare``), through its
``ddp_handler``. :func:`timed_ddp_handler` swaps that handler for a :class:`TimedDDPKwargs` carrying the same
fields, whose ``register_comm_hook`` registers the timed wrapper (profiling on) or exactly what Accelerate would
(profiling off). The timer is found on the prepared model with :func:`comm_timer`. Cost per bucket: two clock reads
(or two CUDA events) and one extra future callback.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

__all__ = ["CommTimer", "TimedDDPKwargs", "timed_ddp_handler", "comm_timer", "step_figures", "comm_source",
           "comm_figures", "HOOKS", "TIMER_ATTR"]

TIMER_ATTR = "_cnnscale_comm_timer"
"""The attribute of the DDP-wrapped model that holds its :class:`CommTimer`."""

HOOKS: dict[DDPCommunicationHookType, tuple[str, Callable[..., Any]]] = {
    DDPCommunicationHookType.NO: ("allreduce", default_hooks.allreduce_hook),
    DDPCommunicationHookType.FP16: ("fp16_compress", default_hooks.fp16_compress_hook),
    DDPCommunicationHookType.BF16: ("bf16_compress", default_hooks.bf16_compress_hook),
}
"""The hooks that can be timed, by Accelerate's hook type: (name, hook). Others (PowerSGD) run untimed."""


def step_figures(buckets: list[tuple[float, float]]) -> tuple[float, float]:
    """(comm, exposed) seconds of one step from its buckets' (launch, done) times on one clock."""
    if not buckets:
        return 0.0, 0.0
    comm, end = 0.0, float("-inf")
    for a, b in sorted(buckets):
        if b > end:
            comm += b - max(a, end)
            end = b
    exposed = max(max(b for _, b in buckets) - max(a for a, _ in buckets), 0.0)
    return comm, exposed


class CommTimer:
    """Wraps one DDP communication hook; collects each step's buckets and turns them into seconds at log steps."""

    def __init__(self, name: str, hook: Callable[..., Any], cuda: bool) -> None:
        self.name, self.inner, self.cuda = name, hook, cuda
        self._open: list[list[Any]] = []     # this step's buckets: [launch mark, done mark or None, wire bytes]
        self._steps: list[list[list[Any]]] = []  # closed steps not yet read
        self.reset()

    def reset(self) -> None:
        """Forget everything measured (the end of warm-up, a fresh profiler on the same model)."""
        self._open, self._steps = [], []
        self.steps, self.comm_s, self.exposed_s, self.buckets, self.bytes, self.unfinished = 0, 0.0, 0.0, 0, 0, 0

    def _now(self) -> Any:
        """A perf_counter float on CPU; on GPU a CUDA event recorded on the current stream (at launch the compute
        stream; in the completion callback the stream the future's value is ready on)."""
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def hook(self, state: Any, bucket: Any) -> torch.futures.Future:
        """The hook DDP calls per bucket: the inner hook, with its launch and its future's completion marked."""
        buf = bucket.buffer()
        rec = [self._now(), None, buf.numel() * (2 if self.name.endswith("_compress") else buf.element_size())]
        self._open.append(rec)

        def done(fut: torch.futures.Future) -> torch.Tensor:
            rec[1] = self._now()
            return fut.value()

        return self.inner(state, bucket).then(done)

    def close_step(self) -> None:
        """The optimiser step is done: its buckets (none under no_sync) form one step."""
        self._steps.append(self._open)
        self._open = []

    def flush(self) -> None:
        """Turn the closed steps into seconds (on GPU the caller has synchronised already)."""
        for recs in self._steps:
            done = [r for r in recs if r[1] is not None]
            self.unfinished += len(recs) - len(done)
            if self.cuda and done:
                ref = done[0][0]
                times = [(ref.elapsed_time(a) / 1000.0, ref.elapsed_time(b) / 1000.0) for a, b, _ in done]
            else:
                times = [(a, b) for a, b, _ in done]
            comm, exposed = step_figures(times)
            self.steps += 1
            self.comm_s += comm
            self.exposed_s += exposed
            self.buckets += len(done)
            self.bytes += sum(r[2] for r in done)
        self._steps = []

    def figures(self) -> dict[str, Any]:
        """Run figures over the steps read so far: comm and exposed seconds, overlap, buckets and bytes per step."""
        self.flush()
        n = max(self.steps, 1)
        return {"comm_s": self.comm_s, "comm_exposed_s": self.exposed_s,
                "comm_overlap": 1 - self.exposed_s / self.comm_s if self.comm_s > 0 else None,
                "comm_buckets_per_step": self.buckets / n, "comm_bytes_per_step": self.bytes / n,
                "comm_timed_hook": self.name}


# DDP checks a hook's annotations against the real objects (dist.GradBucket, Future[Tensor]); with postponed
# annotations they are strings, which it refuses ("bucket annotation should be dist.GradBucket").
CommTimer.hook.__annotations__ = {"state": Any, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}


@dataclasses.dataclass
class TimedDDPKwargs(DistributedDataParallelKwargs):
    """Accelerate's DDP kwargs, whose hook registration wraps the named hook in a :class:`CommTimer` when
    ``timed``. The extra fields are not DDP arguments (left out of :meth:`to_dict`)."""

    timed: bool = False

    def to_dict(self, ignore_keys: tuple[str, ...] = ("comm_hook", "comm_wrapper", "comm_state_option",
                                                        "timed")) -> dict[str, Any]:
        return super().to_dict(ignore_keys=ignore_keys)

    def register_comm_hook(self, model: Any) -> None:
        """Register the named hook on the DDP-wrapped ``model``, timed when asked and timeable (see :data:`HOOKS`)."""
        kind = DDPCommunicationHookType(self.comm_hook)
        if not self.timed or kind not in HOOKS or self.comm_wrapper != DDPCommunicationHookType.NO:
            super().register_comm_hook(model)
            return
        name, hook = HOOKS[kind]
        cuda = next(model.parameters()).device.type == "cuda"
        timer = CommTimer(name, hook, cuda)
        model.register_comm_hook(state=None, hook=timer.hook)
        setattr(model, TIMER_ATTR, timer)


def timed_ddp_handler(handler: DistributedDataParallelKwargs | None, timed: bool) -> TimedDDPKwargs:
    """A :class:`TimedDDPKwargs` with ``handler``'s fields (for ``accelerator.ddp_handler``, set after the
    Accelerator is built: Accelerate looks its handlers up by exact class)."""
    fields = {f.name: getattr(handler, f.name) for f in dataclasses.fields(DistributedDataParallelKwargs)} \
        if handler is not None else {}
    return TimedDDPKwargs(**fields, timed=timed)


def comm_timer(model: Any) -> CommTimer | None:
    """The :class:`CommTimer` of a prepared model (through torch.compile's wrapper); None when DDP does not wrap it
    or the hook is not timed."""
    timer = getattr(model, TIMER_ATTR, None)
    if timer is None and hasattr(model, "_orig_mod"):
        timer = getattr(model._orig_mod, TIMER_ATTR, None)
    return timer


def comm_source(timer: CommTimer | None, world_size: int, deepspeed: bool) -> str:
    """How communication is timed (env.json's ``comm_timing``): the DDP hook, nothing to time, or n/a and why."""
    if timer is not None:
        return f"ddp comm hook ({timer.name})"
    if world_size == 1:
        return "none: one process"
    return "n/a: DeepSpeed runs its own collectives" if deepspeed else "n/a: no timed DDP hook"


def comm_figures(timer: CommTimer | None, world_size: int, deepspeed: bool) -> dict[str, Any]:
    """The timer's run figures; 0 s with one process; None (n/a) where no hook timed them (DeepSpeed, ``deepspeed``
    only names the reason in :func:`comm_source`)."""
    if timer is not None:
        return timer.figures()
    zero = 0.0 if world_size == 1 else None
    return {"comm_s": zero, "comm_exposed_s": zero, "comm_overlap": None, "comm_buckets_per_step": zero,
            "comm_bytes_per_step": zero, "comm_timed_hook": None}
