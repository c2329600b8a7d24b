"""Terms that extend the scaling model (:mod:`cnnscale.scaling.model`) where it misses, each one switchable.

A step on N workers takes ``compute(N) + exposed(N)``; the efficiency against one worker is
``compute(1) / (compute(N) + exposed(N))``. With every term off (:data:`BASE`) this is exactly
:func:`cnnscale.scaling.model.predict_efficiency` at ``base_n`` 1. The terms, named as the report names them:

- **(a) algorithm** ``"gloo"``: the all-reduce gloo really runs for a dense CPU tensor. ProcessGroupGloo's
  allreduce calls ``gloo::allreduce`` with no algorithm set, which is gloo's ring (gloo/allreduce.cc): a ring
  reduce-scatter then a ring allgather, the tensor cut into ``S = roundUp(max(ceil(bytes / 1 MiB), 2N), N)``
  segments (at most 1 MiB each, at least two per rank), so each rank sends ``2(N-1)·S/N`` messages, not the
  textbook ``2(N-1)``, and ``2(N-1)/N`` of the bytes. Two segments are in flight while the reduce-scatter sums the
  one that arrived, so the CPU's reduction (``(N-1)/N`` of the bytes, at ``reduce_Bps``) hides behind the link and
  shows only where it is the slower of the two: ``t = 2(N-1)s·α + (N-1)s·seg·(β + max(β, 1/reduce_Bps))``, with
  ``s = S/N`` segments per rank and ``seg = bytes/S``. The α of this form is per message (half the ring form's α
  for a tensor of at most 2N MiB), so it is fitted with its own regressors (:func:`fit_gloo`). ProcessGroupGloo runs
  each collective on one of its worker threads (two by default), so two buckets may be in flight at once over the
  same link; the model sends them one after the other, which takes as long where the link is the limit.
- **(b) buckets**: DDP's first bucket closes at 1 MiB (``dist._DEFAULT_FIRST_BUCKET_BYTES``), the others at
  ``bucket_mb``, a layer never split, so the first holds at least the last (largest) layer; it is ready soon after
  the backward starts. DDP cuts buckets by fp32 bytes, also under a compression hook. This gives the bucket counts
  DDP's hook recorded here (mobilenet_v2 2, resnet18 3, vgg16 3). Every bucket also costs a fixed
  ``bucket_cost_s`` (the hook's launch, the copy into the bucket's flat tensor and back, the future's completion):
  fitted.
- **(c) overlap**: the share of the hideable communication that really hides under the backward. On CPU the
  interconnect says 0 (gloo's thread needs the cores the backward uses); with one thread per process and spare
  cycles some of it does hide: a fitted fraction instead of 0.
- **(d) straggler**: the compute time at N is the ``dist.compute_only`` calibration's step at that same N (N
  processes sharing the machine, no all-reduce) instead of the single-worker one. The records keep rank 0's step
  time only, not each rank's, so this is one rank's time (about the mean), not the slowest; ``straggler_frac``
  (fitted) adds ``straggler_frac·(N-1)/N`` of it for the wait on the slowest rank that every all-reduce imposes.
- **(e) contention**: during training an all-reduce takes ``1 + contention`` times what the idle micro-benchmark
  took: gloo's threads (the TCP stack, the copies, the reduction) share the cores with N backward passes. DDP's
  communication hook measured it on this machine: over loopback (the quickstart, N=2), where the CPU is the limit,
  2.8x (vgg16) to 4.2x (mobilenet_v2) the benchmark's time, overlap 0.7 (resnet18, vgg16); over a 200mbit shaped
  link, where the link is, 1.1x (vgg16) to 1.2x (mobilenet_v2) at N=2 and 2.5x for lenet5's 0.25 MB at N=4,
  overlap 0 (lenet5, one bucket) to 0.8 (resnet18); those shaped-link figures are from the lab's earlier tbf
  bucket (rate/100), which let a small gradient out at the veth's speed; on the 0.5 ms bucket the full lab fits
  contention 1.0x. Fitted, and it may fall below 1x (down to 0.5x): the benchmark times one collective at a time,
  while DDP keeps up to two buckets in flight on gloo's two threads, which can fill a shaped link that one TCP
  stream does not. A later lab on another VM, whose single stream reached 82% of the shaped rate (the first VM's:
  95%), read its 200mbit benchmark at 16.4, 14.0 and 18.3 MB/s for N = 2, 3, 4 where the hook's exposed times
  implied more; the fit there is 0.82x.
- **(f) comm CPU**: the communication's own CPU work (gloo's copies and reduction, the TCP stack on both ends of
  every veth) runs beside the backward on the same cores and slows it: the compute at N grows by
  ``comm_cpu_s_per_byte`` times the bytes each rank sends in the ring (``2(N-1)/N`` of the gradient). Without it
  the straggler share (d) stood in for it. The full lab measured it directly: the forward+backward time per step of
  a training point against its compute_only calibration at the same N grew with the gradient, not with the link's
  time (ResNet-18 at N=2: +0.14, +0.07 and +0.07 s per step at 2gbit, 500mbit and 200mbit for 45 MB; VGG-16
  +0.15 .. +0.17 s for 59 MB; LeNet-5 +0.2 .. +0.8 ms for 0.25 MB; the lab export's ``fwd_bwd_ms`` and
  ``calib_fwd_bwd_ms``): the full fit read 2.6 ns per byte, and 3.6 on a later lab on another VM. Fitted to that growth
  (:func:`cnnscale.scaling.fit.fit_comm_cpu`) where the records have it, else to the efficiency.
- **(g) layer timing**: when each bucket is ready. Without it a bucket is ready once the backward has run the share
  of its time that the bucket's bytes are of the gradient. But the backward reaches the layers last to first, and
  these CNNs hold their bytes at the end and their work at the start: ResNet-18's layer4 is 75% of the parameters
  and 24% of the multiply-accumulates, so three quarters of its gradient is ready a quarter of the way into the
  backward, not three quarters. With (g) the buckets are DDP's, cut from the model's own layers in backward order
  (a 1 MiB first bucket with (b), then ``bucket_mb``; a bucket closes at the layer that reaches its cap), and each
  is ready when the backward has done the layers down to its last, in proportion to their cost
  (:mod:`cnnscale.profile.layers`: MACs per layer). Nothing to fit; off where a case has no layer table.

Pure arithmetic, no torch. Cost: microseconds per prediction.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cnnscale.scaling.model import Interconnect, bucket_sizes, ring_allreduce_s, wire_bytes

__all__ = ["Terms", "BASE", "TERM_NAMES", "GLOO_MAX_SEGMENT_BYTES", "DDP_FIRST_BUCKET_BYTES", "REDUCE_BPS",
           "gloo_segments", "gloo_allreduce_s", "allreduce_s", "ddp_buckets", "exposed_s", "step_s",
           "efficiency", "fit_gloo", "without", "compute_at", "wire_bytes", "layer_buckets"]

GLOO_MAX_SEGMENT_BYTES = 2**20
"""gloo's AllreduceOptions::kMaxSegmentSize: the largest message of its ring."""
DDP_FIRST_BUCKET_BYTES = 2**20
"""DDP's first gradient bucket (torch.distributed's _DEFAULT_FIRST_BUCKET_BYTES)."""
REDUCE_BPS = 2e9
"""Bytes per second one CPU core sums fp32 in gloo's reduce-scatter (memory bound: two reads and a write per value)."""

TERM_NAMES = {"a": "gloo ring", "b": "DDP buckets", "c": "overlap", "d": "straggler", "e": "contention",
              "f": "comm CPU", "g": "layer timing"}
"""The terms by letter, as the module docstring names them."""


@dataclass(frozen=True)
class Terms:
    """Which terms are on, and their values (fitted ones: :mod:`cnnscale.scaling.fit`)."""

    algorithm: str = "ring"
    """(a) ``ring``: the textbook α-β ring; ``gloo``: gloo's segmented ring with its CPU reduction."""
    reduce_Bps: float = REDUCE_BPS
    """(a) the CPU's reduction throughput (gloo only)."""
    first_bucket: bool = False
    """(b) DDP's 1 MiB first bucket."""
    bucket_cost_s: float = 0.0
    """(b) fixed cost of every bucket, seconds."""
    overlap: float | None = None
    """(c) share of the hideable communication that hides; None: the interconnect's own."""
    straggler: bool = False
    """(d) compute time at N from the compute_only calibration at N."""
    straggler_frac: float = 0.0
    """(d) extra wait on the slowest rank, as a share of the compute time at N, times (N-1)/N."""
    contention: float | None = None
    """(e) an all-reduce takes 1 + this times its benchmark time during training; None: off (0)."""
    comm_cpu_s_per_byte: float | None = None
    """(f) compute seconds the communication takes from the backward per byte a rank sends; None: off (0)."""
    layer_timing: bool = False
    """(g) buckets cut from the model's layers and ready when the backward has done them (by their cost)."""

    def label(self) -> str:
        """The terms that are on, e.g. ``a+b+d`` (``none`` when none is)."""
        on = [k for k, v in (("a", self.algorithm == "gloo"), ("b", self.first_bucket or self.bucket_cost_s > 0),
                             ("c", self.overlap is not None), ("d", self.straggler),
                             ("e", self.contention is not None), ("f", self.comm_cpu_s_per_byte is not None),
                             ("g", self.layer_timing))
              if v]
        return "+".join(on) or "none"


BASE = Terms()
"""Every term off: today's model (:func:`cnnscale.scaling.model.predict_efficiency`)."""


def without(terms: Terms, letter: str) -> Terms:
    """``terms`` with term ``letter`` (a .. f) switched off."""
    off = {"a": {"algorithm": "ring"}, "b": {"first_bucket": False, "bucket_cost_s": 0.0}, "c": {"overlap": None},
           "d": {"straggler": False, "straggler_frac": 0.0}, "e": {"contention": None},
           "f": {"comm_cpu_s_per_byte": None}, "g": {"layer_timing": False}}
    if letter not in off:
        raise ValueError(f"unknown term {letter!r} (choose from: {', '.join(off)})")
    return replace(terms, **off[letter])


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def gloo_segments(nbytes: float, n: int) -> tuple[int, float]:
    """(segments per rank ``s``, bytes per segment) of gloo's ring for ``nbytes`` over ``n`` ranks."""
    total = max(int(math.ceil(nbytes)), 1)
    segments = _round_up(max(-(-total // GLOO_MAX_SEGMENT_BYTES), 2 * n), n)
    return segments // n, total / segments


def gloo_allreduce_s(nbytes: float, n: int, ic: Interconnect, reduce_Bps: float = REDUCE_BPS) -> float:
    """gloo's ring all-reduce of ``nbytes`` over ``n`` (see the module docstring, term (a)); α per message."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    s, seg = gloo_segments(nbytes, n)
    beta = 1.0 / ic.bandwidth_Bps
    return 2 * (n - 1) * s * ic.latency_s + (n - 1) * s * seg * (beta + max(beta, 1.0 / reduce_Bps))


def allreduce_s(nbytes: float, n: int, ic: Interconnect, terms: Terms = BASE) -> float:
    """One bucket's all-reduce: ring or gloo (term a), slowed by contention (term e), plus the per-bucket fixed
    cost (term b)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    t = gloo_allreduce_s(nbytes, n, ic, terms.reduce_Bps) if terms.algorithm == "gloo" else \
        ring_allreduce_s(nbytes, n, ic)
    return t * (1 + (terms.contention or 0.0)) + terms.bucket_cost_s


def ddp_buckets(total_bytes: float, bucket_mb: float, first_bucket: bool = False, largest_bytes: float = 0.0
                ) -> list[float]:
    """Bucket sizes (fp32 gradient bytes) in the order they are all-reduced. Without ``first_bucket``: full
    ``bucket_mb`` MiB buckets and the rest. With it, DDP's rule: parameters go into buckets in reverse order and a
    bucket closes once it holds at least its cap, 1 MiB for the first; a layer is never split, so the first bucket
    holds at least the last layer, here taken as the largest (``largest_bytes``: true of VGG, ResNet and MobileNetV2,
    whose widest convolution comes last), then ``bucket_mb`` MiB buckets."""
    if not first_bucket:
        return bucket_sizes(total_bytes, bucket_mb)
    first = min(total_bytes, max(float(DDP_FIRST_BUCKET_BYTES), largest_bytes))
    if total_bytes <= first:
        return bucket_sizes(total_bytes, bucket_mb)
    return [first] + bucket_sizes(total_bytes - first, bucket_mb)


def layer_buckets(layers: Sequence[tuple[float, float]], bucket_mb: float, first_bucket: bool = False,
                  total_bytes: float = 0.0) -> list[tuple[float, float]]:
    """Term (g): (fp32 bytes, share of the backward done when it is ready) of each DDP bucket, in the order they
    are all-reduced. ``layers``: (parameters, cost) per layer in forward order (:mod:`cnnscale.profile.layers`);
    DDP's rule on them reversed: a bucket closes at the layer that brings it to its cap (1 MiB for the first with
    ``first_bucket``, else ``bucket_mb`` MiB), the rest is the last bucket. ``total_bytes``: scale the layers'
    bytes to this gradient (0: 4 bytes per parameter)."""
    rev = [(4.0 * p, c) for p, c in reversed(layers)]
    total_cost, grad = sum(c for _, c in rev), sum(b for b, _ in rev)
    if grad <= 0 or total_cost <= 0:
        return []
    scale = total_bytes / grad if total_bytes > 0 else 1.0
    cap_rest = bucket_mb * 2**20
    cap = float(DDP_FIRST_BUCKET_BYTES) if first_bucket else cap_rest
    out, size, done = [], 0.0, 0.0
    for nbytes, cost in rev:
        done += cost
        if nbytes <= 0:
            continue
        size += nbytes * scale
        if size >= cap:
            out.append((size, done / total_cost))
            size, cap = 0.0, cap_rest
    if size > 0:
        out.append((size, 1.0))
    return out


def _exposed(buckets: Sequence[float], times: Sequence[float], backward_s: float, overlap: float,
             ready: Sequence[float] | None = None) -> float:
    """The overlap rule of :func:`cnnscale.scaling.model.exposed_comm_s` on given bucket times; ``ready``: the
    share of the backward done when each bucket is ready (term g), else its bytes' share of the gradient."""
    produced, t_free, grad_total = 0.0, 0.0, sum(buckets)
    for i, (size, t) in enumerate(zip(buckets, times)):
        produced += size
        at = ready[i] if ready is not None else produced / grad_total
        t_free = max(backward_s * at, t_free) + t
    return overlap * max(t_free - backward_s, 0.0) + (1 - overlap) * sum(times)


def exposed_s(buckets: Sequence[float], n: int, ic: Interconnect, backward_s: float, terms: Terms = BASE) -> float:
    """Communication left after the backward ends (the model's overlap rule, the overlap from term c)."""
    if not buckets or n <= 1:
        return 0.0
    times = [allreduce_s(b, n, ic, terms) for b in buckets]
    return _exposed(buckets, times, backward_s, ic.overlap if terms.overlap is None else terms.overlap)


@functools.lru_cache(maxsize=4096)
def _bucket_times(nbytes: float, n: int, ic: Interconnect, bucket_mb: float, algorithm: str, first_bucket: bool,
                  reduce_Bps: float, compression: float, largest_bytes: float,
                  layers: tuple[tuple[float, float], ...] = ()
                  ) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...] | None]:
    """The buckets (bytes on the wire), their all-reduce times before the per-bucket cost and the contention, and
    their ready shares of the backward (term g, from ``layers``; None without) (cached: fits call this ~10^5
    times). DDP fills buckets by fp32 bytes; a hook then sends 1/compression of them."""
    ready = None
    if layers:
        cut = layer_buckets(layers, bucket_mb, first_bucket, nbytes * compression)
        buckets, ready = tuple(b / compression for b, _ in cut), tuple(r for _, r in cut)
    else:
        buckets = tuple(b / compression for b in ddp_buckets(nbytes * compression, bucket_mb, first_bucket,
                                                              largest_bytes))
    plain = Terms(algorithm=algorithm, reduce_Bps=reduce_Bps)
    return buckets, tuple(allreduce_s(b, n, ic, plain) for b in buckets), ready


def compute_at(n: int, compute1_s: float, computeN_s: float | None, terms: Terms, nbytes: float = 0.0) -> float:
    """Compute time per step at ``n`` (term d: from the calibration at n, plus the wait on the slowest rank; term f:
    plus the communication's CPU work on ``nbytes`` of gradient on the wire)."""
    if n <= 1:
        return compute1_s
    base = compute1_s
    if terms.straggler and computeN_s:
        base = computeN_s * (1 + terms.straggler_frac * (n - 1) / n)
    return base + (terms.comm_cpu_s_per_byte or 0.0) * wire_bytes(nbytes, n)


def step_s(compute1_s: float, nbytes: float, n: int, ic: Interconnect, bucket_mb: float = 25.0,
           terms: Terms = BASE, computeN_s: float | None = None, backward_frac: float = 2 / 3,
           compression: float = 1.0, largest_bytes: float = 0.0,
           layers: tuple[tuple[float, float], ...] = ()) -> float:
    """Predicted seconds per optimiser step at ``n`` workers (weak scaling). ``nbytes``: bytes on the wire;
    ``compression``: fp32 gradient bytes per byte on the wire (2 under an fp16/bf16 hook: DDP's buckets are cut
    by fp32 bytes); ``largest_bytes``: the largest layer's fp32 gradient (term b's first bucket); ``layers``:
    (parameters, cost) per layer in forward order (term g; :mod:`cnnscale.profile.layers`)."""
    compute = compute_at(n, compute1_s, computeN_s, terms, nbytes)
    if n <= 1 or nbytes <= 0:
        return compute
    buckets, times, ready = _bucket_times(nbytes, n, ic, bucket_mb, terms.algorithm, terms.first_bucket,
                                          terms.reduce_Bps, compression, largest_bytes,
                                          tuple(layers) if terms.layer_timing else ())
    slow = 1 + (terms.contention or 0.0)
    times = tuple(t * slow + terms.bucket_cost_s for t in times)
    overlap = ic.overlap if terms.overlap is None else terms.overlap
    return compute + _exposed(buckets, times, compute * backward_frac, overlap, ready)


def efficiency(compute1_s: float, nbytes: float, n: int, ic: Interconnect, bucket_mb: float = 25.0,
               terms: Terms = BASE, computeN_s: float | None = None, backward_frac: float = 2 / 3,
               compression: float = 1.0, largest_bytes: float = 0.0,
               layers: tuple[tuple[float, float], ...] = ()) -> float:
    """Predicted weak-scaling efficiency at ``n`` against one worker: ``compute(1) / step(n)`` (arguments as
    :func:`step_s`)."""
    return compute1_s / step_s(compute1_s, nbytes, n, ic, bucket_mb, terms, computeN_s, backward_frac, compression,
                               largest_bytes, layers)


def fit_gloo(sizes: Sequence[float], times: Sequence[float], n: int, name: str = "measured",
             weight_power: float = 2.0) -> Interconnect:
    """Least-squares fit of gloo's ring (term a, reduction hidden) to all-reduce times:
    ``t = 2(n-1)s·α + 2(n-1)s·seg·β``, each size weighted by ``1 / t**weight_power`` as
    :func:`cnnscale.scaling.model.fit_alpha_beta` does; α per message. Overlap 0 (CPU)."""
    if len(sizes) != len(times) or len(sizes) < 2:
        raise ValueError("need at least two (size, time) pairs to fit α and β")
    rows = []
    for b in sizes:
        s, seg = gloo_segments(b, n)
        rows.append((2 * (n - 1) * s, 2 * (n - 1) * s * seg))
    w = [1.0 / max(t, 1e-9) ** weight_power for t in times]
    saa = sum(wi * a * a for wi, (a, _) in zip(w, rows))
    sab = sum(wi * a * b for wi, (a, b) in zip(w, rows))
    sbb = sum(wi * b * b for wi, (_, b) in zip(w, rows))
    sat = sum(wi * a * t for wi, (a, _), t in zip(w, rows, times))
    sbt = sum(wi * b * t for wi, (_, b), t in zip(w, rows, times))
    det = saa * sbb - sab * sab
    if det == 0:
        raise ValueError("degenerate all-reduce benchmark (all sizes equal?)")
    alpha = max((sat * sbb - sbt * sab) / det, 1e-9)
    beta = max((saa * sbt - sab * sat) / det, 1e-15)
    return Interconnect(name, 1.0 / beta, alpha, 0.0,
                        f"fitted (gloo ring): α={alpha * 1e6:.1f} µs/message, bw={1 / beta / 1e9:.3f} GB/s")
