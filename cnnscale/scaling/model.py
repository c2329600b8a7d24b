"""Analytic data-parallel scaling model: compute time per step against the time to all-reduce the gradients.

For weak scaling (same per-worker batch at every N), one optimiser step on N workers takes

    t(N) = t_compute + exposed_comm(N),        efficiency(N) = t_compute / t(N)

``t_compute`` is the measured single-worker time per optimiser step. The gradient (params x bytes per element: 4 in
fp32, 2 with an fp16/bf16 DDP comm hook) is all-reduced once per optimiser step (gradient accumulation runs the
other micro-steps under ``no_sync``), in DDP buckets of ``bucket_mb``. Each bucket is a ring all-reduce (α-β model):

    t_ar(bytes, N) = 2(N-1)/N · bytes / bandwidth + 2(N-1) · α

Overlap: bucket k is ready once the backward has produced its share of the gradient (buckets fill in proportion to
bytes, the backward taking ``backward_frac`` of the compute time); buckets go out one at a time. Everything except
what is still running when the backward ends can hide under the backward. An interconnect's ``overlap`` (0..1) says
how much of that hiding really happens: 1 on GPUs (NCCL runs on its own stream), 0 on CPU, where gloo's reduction
needs the same cores as the compute. So exposed = overlap · exposed_if_overlapped + (1 - overlap) · total_comm.

What the model leaves out (and where its misses come from): compute slowing down when workers share a machine
(memory bandwidth, the other engineers' jobs on a shared box), stragglers, DDP's per-step bookkeeping and the
first-bucket latency of the launch, and the network's contention in multi-node rings. The switchable terms of
:mod:`cnnscale.scaling.terms` (gloo's real ring, DDP's buckets, partial overlap, the straggler, the
communication's CPU work slowing the backward) add the first three; :mod:`cnnscale.scaling.fit` fits them on one
part of a lab matrix and checks them on the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from cnnscale.errors import choices_error

__all__ = [
    "Interconnect", "PRESETS", "get_interconnect", "ring_allreduce_s", "wire_bytes", "bucket_sizes", "exposed_comm_s",
    "step_time_s", "predict_efficiency", "grad_bytes", "fit_alpha_beta", "interconnect_from_fit",
    "WORLD_SIZES",
]

WORLD_SIZES = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Interconnect:
    """A link's all-reduce cost: per-step latency α (s) and bus bandwidth (bytes/s), plus compute/comm overlap."""

    name: str
    bandwidth_Bps: float
    """Achievable all-reduce bus bandwidth per worker, bytes/s."""
    latency_s: float
    """α: cost of one ring step (a message and its synchronisation), seconds."""
    overlap: float = 1.0
    """Fraction of the hideable communication that really overlaps the backward (0: none, CPU; 1: GPU)."""
    note: str = ""


# Bandwidths are achievable all-reduce bus bandwidths (about 80-90% of the link's line rate), not the line rate.
PRESETS: dict[str, Interconnect] = {
    "nvlink": Interconnect("nvlink", 360e9, 5e-6, 1.0, "NVLink 4 (H100 SXM), NCCL bus bw ~360 GB/s"),
    "ib-hdr": Interconnect("ib-hdr", 23e9, 6e-6, 1.0, "InfiniBand HDR 200 Gb/s per GPU"),
    "ib-ndr": Interconnect("ib-ndr", 46e9, 5e-6, 1.0, "InfiniBand NDR 400 Gb/s per GPU"),
    "100gbe": Interconnect("100gbe", 10e9, 30e-6, 1.0, "100 Gb Ethernet, TCP/RoCE"),
    "cpu-shm": Interconnect("cpu-shm", 2e9, 50e-6, 0.0, "gloo over loopback on one CPU host (no overlap)"),
}


def get_interconnect(name: str, measured: Interconnect | None = None) -> Interconnect:
    """A preset by name, or ``"measured"`` (the fit from an all-reduce benchmark, when there is one)."""
    if name == "measured" and measured is not None:
        return measured
    if name not in PRESETS:
        raise choices_error("interconnect", name, [*PRESETS, "measured"] if measured else list(PRESETS))
    return PRESETS[name]


def wire_bytes(nbytes: float, n: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes`` over ``n`` (``2(n-1)/n`` of them; 0 for n <= 1)."""
    return 2 * (n - 1) / n * nbytes if n > 1 else 0.0


def ring_allreduce_s(nbytes: float, n: int, ic: Interconnect) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` workers: ``2(n-1)/n · bytes / bw + 2(n-1) · α`` (0 for n <= 1)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return wire_bytes(nbytes, n) / ic.bandwidth_Bps + 2 * (n - 1) * ic.latency_s


def bucket_sizes(total_bytes: float, bucket_mb: float) -> list[float]:
    """DDP's buckets: full ``bucket_mb`` MiB buckets and the remainder (DDP's first bucket is 1 MiB; ignored)."""
    if total_bytes <= 0:
        return []
    cap = bucket_mb * 2**20
    full = int(total_bytes // cap)
    rest = total_bytes - full * cap
    return [cap] * full + ([rest] if rest > 0 else [])


def exposed_comm_s(buckets: Sequence[float], n: int, ic: Interconnect, backward_s: float) -> float:
    """Communication time left over after the backward ends (see the module docstring)."""
    times = [ring_allreduce_s(b, n, ic) for b in buckets]
    total = sum(times)
    if not times:
        return 0.0
    produced, t_free = 0.0, 0.0
    grad_total = sum(buckets)
    for size, t in zip(buckets, times):
        produced += size
        ready = backward_s * produced / grad_total  # buckets fill as the backward proceeds
        t_free = max(ready, t_free) + t
    overlapped = max(t_free - backward_s, 0.0)
    return ic.overlap * overlapped + (1 - ic.overlap) * total


def step_time_s(compute_s: float, nbytes: float, n: int, ic: Interconnect, bucket_mb: float = 25.0,
                backward_frac: float = 2 / 3) -> float:
    """Predicted time of one optimiser step on ``n`` workers (weak scaling)."""
    return compute_s + exposed_comm_s(bucket_sizes(nbytes, bucket_mb), n, ic, compute_s * backward_frac)


def predict_efficiency(compute_s: float, nbytes: float, n: int, ic: Interconnect, bucket_mb: float = 25.0,
                       base_n: int = 1, backward_frac: float = 2 / 3) -> float:
    """Weak-scaling efficiency at ``n`` workers relative to ``base_n`` workers (``compute_s`` measured at 1)."""
    def eff(k: int) -> float:
        return compute_s / step_time_s(compute_s, nbytes, k, ic, bucket_mb, backward_frac)

    return eff(n) / eff(base_n)


def grad_bytes(params: int, comm_hook: str = "none") -> float:
    """Bytes all-reduced per optimiser step: fp32 gradients, halved by an fp16/bf16 compression hook."""
    return params * (2 if comm_hook in ("fp16", "bf16") else 4)


def fit_alpha_beta(sizes: Sequence[float], times: Sequence[float], n: int, name: str = "measured",
                   weight_power: float = 2.0) -> Interconnect:
    """Least-squares fit of the ring model to measured all-reduce times: t = 2(n-1)·α + 2(n-1)/n·bytes·β.

    Each size is weighted by ``1 / t**weight_power``: 2 (the default) makes every size count alike (relative
    error); 1 leans toward the large messages, where a gradient's buckets are, for a benchmark whose small messages
    are erratic (a shaped link's burst, TCP's delayed acks). α and β are clamped at a tiny positive value (a noisy
    fit can go negative). Returns a CPU-style interconnect (overlap 0) named ``name``; callers on GPUs can
    ``dataclasses.replace`` the overlap.
    """
    if len(sizes) != len(times) or len(sizes) < 2:
        raise ValueError("need at least two (size, time) pairs to fit α and β")
    a = [2 * (n - 1)] * len(sizes)
    b = [2 * (n - 1) / n * s for s in sizes]
    w = [1.0 / max(t, 1e-9) ** weight_power for t in times]
    saa = sum(wi * ai * ai for wi, ai in zip(w, a))
    sab = sum(wi * ai * bi for wi, ai, bi in zip(w, a, b))
    sbb = sum(wi * bi * bi for wi, bi in zip(w, b))
    sat = sum(wi * ai * t for wi, ai, t in zip(w, a, times))
    sbt = sum(wi * bi * t for wi, bi, t in zip(w, b, times))
    det = saa * sbb - sab * sab
    if det == 0:
        raise ValueError("degenerate all-reduce benchmark (all sizes equal?)")
    alpha = (sat * sbb - sbt * sab) / det
    beta = (saa * sbt - sab * sat) / det
    alpha, beta = max(alpha, 1e-9), max(beta, 1e-15)
    return Interconnect(name, 1.0 / beta, alpha, 0.0, f"fitted: α={alpha * 1e6:.1f} µs, bw={1 / beta / 1e9:.2f} GB/s")


def interconnect_from_fit(fit: dict, overlap: float | None = None, weight_power: float = 2.0) -> Interconnect:
    """The ``measured`` interconnect from an ``allreduce.json`` written by launch/bench_allreduce.py (weights as
    :func:`fit_alpha_beta`)."""
    ic = fit_alpha_beta(fit["sizes_bytes"], fit["times_s"], int(fit["world_size"]), weight_power=weight_power)
    if overlap is None:
        overlap = 0.0 if fit.get("device_type", "cpu") == "cpu" else 1.0
    return replace(ic, overlap=overlap, note=f"{ic.note} ({fit.get('backend', '?')}, {fit['world_size']} procs)")

