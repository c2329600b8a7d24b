#!/usr/bin/env python3
"""A bare PyTorch DDP training loop (no Accelerate, no cnnscale loop): the efficiency baseline cnnscale is held to.

Same model, synthetic batch, SGD and cross-entropy as a cnnscale run; one fixed in-memory batch per process, so there
is no data loading at all. On a GPU node each process uses its own GPU (``cuda:LOCAL_RANK``) and NCCL, as cnnscale's
Accelerator does; without CUDA, the CPU and gloo. Step times are CUDA events on GPU (read once, at the end), so
timing adds no synchronisation per step. Run it like launch/train.py (plain python for 1 process, accelerate launch
or torchrun for several); a study runs it as a settings variant with ``script: launch/bench_ddp_bare.py``. It writes
a run directory (config.yaml, env.json, summary.json) in the same schema, so ``cnnscale report`` shows it beside
cnnscale's points.

Flags it uses: --model, --micro-batch, --max-steps, --out, --seed, --grad-accum (no_sync on the others),
--dist.bucket_mb, --dist.comm_hook; every other ``--section.field value`` is accepted and ignored (listed in
summary.json under "ignored_args").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from cnnscale.config import COMM_HOOKS  # noqa: E402
from cnnscale.models import create_model  # noqa: E402
from cnnscale.records.io import write_yaml  # noqa: E402
from cnnscale.records.schema import Env, Summary, write_env, write_summary  # noqa: E402


def _args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description="bare PyTorch DDP loop (efficiency baseline)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps at the start")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dist.bucket_mb", dest="bucket_mb", type=int, default=25)
    p.add_argument("--dist.comm_hook", dest="comm_hook", default="none", choices=COMM_HOOKS)
    return p.parse_known_args(argv)


def device_and_backend() -> tuple[torch.device, str]:
    """This process's device and its process-group backend: ``cuda:LOCAL_RANK`` and nccl when CUDA is usable, else
    the CPU and gloo (the choice cnnscale's Accelerator makes)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), "nccl"
    return torch.device("cpu"), "gloo"


def _ddp(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> DDP:
    ids = [device.index] if device.type == "cuda" else None
    ddp = DDP(model, device_ids=ids, bucket_cap_mb=args.bucket_mb)
    if args.comm_hook != "none":
        hook = default_hooks.fp16_compress_hook if args.comm_hook == "fp16" else default_hooks.bf16_compress_hook
        ddp.register_comm_hook(None, hook)
    return ddp


class _Clock:
    """Step marks: perf_counter on CPU; CUDA events on GPU, read after one synchronise at the end."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def seconds(self, a: object, b: object) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a  # type: ignore[attr-defined,operator]


def _train(model: torch.nn.Module, args: argparse.Namespace, device: torch.device, world: int) -> tuple[float, list]:
    """Warm-up steps, then the timed ones: (wall seconds of the timed steps, seconds per timed step)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.micro_batch, 3, 32, 32).to(device)
    y = torch.randint(0, 10, (args.micro_batch,)).to(device)
    clock = _Clock(device)
    marks = []
    for step in range(args.warmup_steps + args.max_steps):
        if step == args.warmup_steps:
            if clock.cuda:
                torch.cuda.synchronize(device)
            marks.append(clock.mark())
            t_timed = time.perf_counter()
        for micro in range(args.grad_accum):
            last = micro == args.grad_accum - 1
            ctx = model.no_sync() if world > 1 and not last else contextlib.nullcontext()
            with ctx:
                F.cross_entropy(model(x), y).div(args.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup_steps:
            marks.append(clock.mark())
    if clock.cuda:
        torch.cuda.synchronize(device)  # the only synchronise of the timed loop
    wall = time.perf_counter() - t_timed
    return wall, [clock.seconds(a, b) for a, b in zip(marks, marks[1:])]


def main(argv: list[str] | None = None) -> int:
    args, ignored = _args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device, backend = device_and_backend()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(backend)
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(args.seed)
    model = create_model(args.model).to(device)
    model = _ddp(model, args, device) if world > 1 else model
    wall, step_times = _train(model, args, device, world)
    if rank == 0:
        _write(Path(args.out), args, world, wall, step_times, sum(p.numel() for p in model.parameters()), ignored,
               device, backend)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _write(out: Path, args: argparse.Namespace, world: int, wall: float, step_times: list[float], params: int,
           ignored: list[str], device: torch.device, backend: str) -> None:
    """config.yaml, env.json and summary.json in cnnscale's schema, so the report shows this run beside others."""
    gb = args.micro_batch * args.grad_accum * world
    write_yaml(out / "config.yaml", {"model": {"name": args.model}, "train": {
        "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "max_steps": args.max_steps},
        "dist": {"bucket_mb": args.bucket_mb, "comm_hook": args.comm_hook}, "runner": "bench_ddp_bare"})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    write_env(out, Env(world_size=world, num_nodes=1, hostnames=[socket.gethostname()], device_type=device.type,
                       device_name=name, torch_threads=torch.get_num_threads(), runner="bench_ddp_bare",
                       backend=backend if world > 1 else None, model=args.model, params=params))
    rate = gb * args.max_steps / wall
    write_summary(out, Summary(
        status="ok", model=args.model, world_size=world, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
        global_batch=gb, mixed_precision="no", steps=args.max_steps, wall_s=wall, img_per_s=rate,
        compute_img_per_s=rate, step_ms_p50=statistics.median(step_times) * 1000, runner="bench_ddp_bare",
        params=params, ignored_args=ignored))


if __name__ == "__main__":
    sys.exit(main())
