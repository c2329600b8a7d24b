"""The records of a run directory: ``env.json`` (:class:`Env`), ``summary.json`` (:class:`Summary`) and the study's
``point.json`` (:class:`Point`), each with one writer and one reader.

- The trainer writes env.json at the start and summary.json at the start (``running``), on a stop (``preempted``)
  and at the end (``ok``), only through :func:`write_env` / :func:`write_summary`.
- The study writes point.json beside the trainer's files (:func:`write_point`) and never touches summary.json.
- The report reads all three and nothing else; a point the study marked failed is failed, whatever summary says.

Units are in the key: ``_s`` seconds, ``_ms`` milliseconds, ``_bytes``, ``_pct`` percent (0-100); a bare share or
efficiency is a fraction (0-1). Every field is optional (None: not measured, or not known to the writer) unless it
has no default. Conversion, validation and versions: :mod:`cnnscale.records.base`. Costs: a read or write is one
small JSON file; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnnscale.records.base import SCHEMA_VERSION, Record, RecordError, read_record, write_record
from cnnscale.records.io import ENV, POINT, SUMMARY

__all__ = ["Env", "Summary", "Point", "write_env", "read_env", "write_summary", "read_summary", "write_point",
           "read_point", "RUN_STATUSES", "POINT_STATUSES", "SCALINGS", "SCHEMA_VERSION", "RecordError"]

RUN_STATUSES = ("ok", "failed", "oom", "timeout", "running", "preempted", "diverged")
"""summary.json's ``status``: ``running`` while training, ``preempted`` when checkpointed on a signal (resumable),
``diverged`` when a non-finite loss stopped it (the last good checkpoint kept). Whether a ``running`` run is alive:
:func:`cnnscale.records.run.liveness`."""
POINT_STATUSES = ("ok", "failed", "oom", "timeout", "diverged")
"""point.json's ``status``: how the study judged the launch."""
SCALINGS = ("weak", "strong")
"""A study's scaling: weak (fixed per-process batch) or strong (fixed global batch); study specs use it too."""


def _one_of(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RecordError(f"{what}: unknown value {value!r} (choose from: {', '.join(choices)})")


@dataclass(frozen=True, kw_only=True)
class Env(Record):
    """env.json: what a run ran on, written once at its start (rank 0)."""

    FILE = ENV
    LEGACY = ("flops_per_img",)
    schema_version: int = SCHEMA_VERSION
    # the model, so that a report never builds one
    model: str | None = None
    params: int | None = None                 # all parameters of the model
    fwd_flops_per_img: float | None = None    # forward FLOPs of one 32x32 image
    train_flops_per_img: float | None = None  # training FLOPs of one image: forward + backward (about 3x forward)
    flops_error: str | None = None            # why FLOPs could not be counted (then both FLOP fields are None)
    param_count: int | None = None            # trainable parameters (the ZeRO memory model's Psi)
    largest_layer_params: int | None = None   # the biggest module's own parameters
    layers: list | None = None                # [parameters, cost] per layer, forward order (cnnscale.profile.layers)
    predicted_rank_bytes: dict | None = None  # cnnscale.scaling.memory.predict_rank_bytes for this run
    # the processes
    world_size: int | None = None
    num_nodes: int | None = None
    hostnames: list | None = None             # one per rank, in rank order
    host: str | None = None
    distributed_type: str | None = None       # Accelerate's: NO, MULTI_CPU, MULTI_GPU, DEEPSPEED ...
    backend: str | None = None                # gloo, nccl
    mixed_precision: str | None = None        # what the run really used (under DeepSpeed: from its JSON)
    global_batch: int | None = None
    loader: str | None = None                 # torch | device
    loader_reason: str | None = None          # why (data.loader auto: the set's size against the memory budget)
    decode_cache: dict | None = None          # ImageFolder, device loader: {"train": hit|built|shared|off, "test": ..}
    bad_images_skipped: int | None = None     # unreadable ImageFolder files left out (data.skip_bad_images)
    bad_images: list | None = None            # the first of them, "path: reason", at most 20
    runner: str | None = None                 # set by scripts that are not the trainer (bench_ddp_bare)
    # the hardware and software
    device_type: str | None = None            # cpu | cuda
    device_name: str | None = None
    device_count: int | None = None
    cuda: str | None = None
    cudnn: int | None = None
    torch_threads: int | None = None
    cpu_count: int | None = None
    python: str | None = None
    platform: str | None = None
    versions: dict | None = None              # package -> version (None: not installed)
    git_sha: str | None = None
    slurm: dict | None = None                 # SLURM_* variables present at the start
    # switches
    fast_path: dict | None = None             # the run's fast-path config
    fast_path_applied: dict | None = None     # what was really applied (None: not applicable on this device)
    zero_stage: int | None = None             # DeepSpeed ZeRO stage; None: plain DDP
    zero_offload_optimizer: str | None = None
    zero_offload_param: str | None = None
    deepspeed_config_file: str | None = None
    # profiling set-up
    profiling: bool | None = None
    peak_tflops: float | None = None          # per device, what MFU is measured against
    peak_source: str | None = None            # "table:...", "measured:cpu matmul+conv fp32", "config:..."
    nvml: str | None = None                   # "ok" or why NVML is n/a
    sync_probe_every: int | None = None
    sync_measured: bool | None = None
    comm_timing: str | None = None            # "ddp comm hook (allreduce|bf16_compress|...)", or why none / n/a
    peak_cache: str | None = None             # CPU peak: "hit" (the host's cached value), "measured", "remeasured"
    peak_age_s: float | None = None           # seconds since the CPU peak in use was measured
    host_syncs_per_step: int | None = None    # CPU-GPU syncs per optimiser step the precision adds (fp16: 1)
    data_wait_clock: str | None = None        # "cuda events" (GPU idle + loader kernels) or "host" (CPU)
    # the emulated interconnect (cnnscale.lab), from CNNSCALE_NETWORK: {profile, rate_bps, interface, qdisc,
    # burst_bytes, gso_max_bytes, measured: {bandwidth_Bps, rtt_s, bytes, seconds, message_bytes, message_s,
    # message_Bps}, namespaces}; None: not run in the lab
    network: dict | None = None
    # schema 0 only (read, never written): the name train_flops_per_img had
    flops_per_img: float | None = None


@dataclass(frozen=True, kw_only=True)
class Summary(Record):
    """summary.json: the run's final figures (rank 0; the per-rank lists are in rank order)."""

    FILE = SUMMARY
    LEGACY = ("point", "exit_warning")
    schema_version: int = SCHEMA_VERSION
    status: str
    model: str | None = None
    world_size: int | None = None
    params: int | None = None
    micro_batch: int | None = None
    grad_accum: int | None = None
    global_batch: int | None = None
    mixed_precision: str | None = None
    loader: str | None = None
    data: str | None = None
    steps: int | None = None                  # optimiser steps done
    total_steps: int | None = None
    epochs_done: int | None = None
    wall_s: float | None = None
    error: str | None = None
    signal: str | None = None                 # preempted: the signal's name
    resume: str | None = None                 # preempted: the flag that resumes it
    runner: str | None = None
    ignored_args: list | None = None
    # the owner (rank 0), for telling a live run from a dead one (cnnscale.records.run.liveness)
    pid: int | None = None
    host: str | None = None
    heartbeat_at: float | None = None         # epoch seconds, rewritten every ~10 s of training while running
    # results
    final_loss: float | None = None           # last logged training loss
    test_loss: float | None = None
    test_acc: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    # throughput and step time (after the profiler's warm-up steps)
    images: int | None = None
    train_time_s: float | None = None
    img_per_s: float | None = None            # images over time, all ranks
    compute_img_per_s: float | None = None    # data wait excluded
    step_ms_p50: float | None = None
    step_ms_p90: float | None = None
    data_wait_s: float | None = None
    fwd_bwd_s: float | None = None
    optim_s: float | None = None
    sync_s: float | None = None               # gradient all-reduce time not hidden by the backward
    sync_share: float | None = None
    sync_probe_s: float | None = None         # the no_sync probe's estimate of sync_s (a cross-check)
    comm_s: float | None = None               # gradient communication in flight, timed in DDP's hook (None: n/a)
    comm_exposed_s: float | None = None       # of it, left after the backward's compute ended (= sync_s)
    comm_overlap: float | None = None         # share of comm_s hidden behind the backward's compute
    comm_buckets_per_step: float | None = None
    comm_bytes_per_step: float | None = None  # bytes all-reduced per step (2 per gradient under fp16/bf16 hooks)
    comm_timed_hook: str | None = None        # allreduce, fp16_compress, bf16_compress
    # utilisation and FLOPs
    cpu_percent: float | None = None
    gpu_util_pct_mean: float | None = None
    gpu_util_pct_peak: float | None = None
    gpu_power_w_mean: float | None = None
    gflops_per_img: float | None = None
    achieved_tflops: float | None = None      # per device
    mfu: float | None = None
    peak_tflops: float | None = None
    peak_source: str | None = None
    peak_cache: str | None = None
    peak_age_s: float | None = None
    # memory: max over ranks, then per rank
    peak_rss_bytes: int | None = None
    gpu_mem_used_bytes_peak: int | None = None
    max_memory_allocated_bytes: int | None = None
    max_memory_reserved_bytes: int | None = None
    rank_peak_rss_bytes: list | None = None
    rank_max_memory_allocated_bytes: list | None = None
    # schema 0 only: what the study wrote into summary.json before point.json existed (read, never written)
    point: dict | None = None
    exit_warning: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("Summary.status", self.status, RUN_STATUSES)


@dataclass(frozen=True, kw_only=True)
class Point(Record):
    """point.json: what the study knows of one point of its matrix and how the launch ended."""

    FILE = POINT
    schema_version: int = SCHEMA_VERSION
    study: str
    id: str                                   # the point's id, also its run directory's name
    model: str
    world_size: int
    status: str
    precision: str = "no"
    micro_batch: int | None = None
    grad_accum: int = 1
    global_batch: int | None = None
    max_steps: int | None = None
    scaling: str = "weak"                     # weak | strong
    settings: str = "default"                 # the study's settings variant; "probe": a max_batch search probe
    overrides: dict | None = None             # --section.field values passed to the point
    script: str | None = None
    repeat: int = 0                           # which repetition of this point (round-robin)
    point_id: str | None = None               # the matrix point's id without the repeat (None in old files: id)
    attempts: int = 1                         # launches made (a retry after a taken port counts)
    error: str | None = None                  # one line, when status is not ok
    exit_warning: str | None = None           # ok, but something went wrong after the run's record was complete
    seconds: float | None = None              # the launch's wall time
    run_dir: str | None = None
    backend: str | None = None                # local, slurm, ...
    job_id: str | None = None                 # SLURM array task, when there is one
    network: str | None = None                # the lab's network profile (1gbit, unshaped); None: no network axis

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("Point.status", self.status, POINT_STATUSES)
        _one_of("Point.scaling", self.scaling, SCALINGS)


def write_env(run_dir: str | Path, env: Env) -> Path:
    """The one writer of ``run_dir/env.json`` (atomic)."""
    if env.flops_per_img is not None:
        raise RecordError("Env.flops_per_img is the schema 0 name: write train_flops_per_img")
    return write_record(run_dir, env)


def read_env(run_dir: str | Path) -> Env:
    """``run_dir/env.json``; OSError when absent, RecordError when corrupt, UserError when from a newer cnnscale."""
    return read_record(run_dir, Env)


def write_summary(run_dir: str | Path, summary: Summary) -> Path:
    """The one writer of ``run_dir/summary.json`` (atomic). The study's view of a point goes to point.json."""
    if summary.point is not None or summary.exit_warning is not None:
        raise RecordError("Summary.point and Summary.exit_warning are schema 0 only: write a Point (write_point)")
    return write_record(run_dir, summary)


def read_summary(run_dir: str | Path) -> Summary:
    """``run_dir/summary.json``; OSError when absent, RecordError when corrupt, UserError when newer."""
    return read_record(run_dir, Summary)


def write_point(run_dir: str | Path, point: Point) -> Path:
    """The one writer of ``run_dir/point.json`` (atomic)."""
    return write_record(run_dir, point)


def read_point(run_dir: str | Path) -> Point:
    """``run_dir/point.json``; OSError when absent, RecordError when corrupt, UserError when newer."""
    return read_record(run_dir, Point)

