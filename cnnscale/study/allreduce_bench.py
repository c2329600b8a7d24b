"""All-reduce micro-benchmark on the real backend (gloo on CPU, nccl on GPU), for the scaling model's "measured"
interconnect. A launch target, not a library: the study runs it as a module under a launcher with 2 (or more)
processes, for example::

    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --main_process_port P \\
        -m cnnscale.study.allreduce_bench --out runs/study/allreduce.json

It all-reduces fp32 tensors of 1 KB .. 64 MB (doubling), takes the median of a few repeats per size, and rank 0 writes
``{backend, world_size, device_type, sizes_bytes, times_s, fit: {alpha_s, bandwidth_Bps}}``. Cost: about 2 x
(sizes x (repeats + 1)) collectives, seconds on CPU for the study's 32 MB cap.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from cnnscale.config import CommandParser
from cnnscale.errors import run_cli
from cnnscale.records.io import write_json
from cnnscale.scaling.model import fit_alpha_beta

__all__ = ["time_allreduce", "main"]


def time_allreduce(nbytes: int, device: torch.device, repeats: int) -> float:
    """Median seconds of one all-reduce of ``nbytes`` of fp32 (after one warm-up call) in the current group."""
    x = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    dist.all_reduce(x)  # warm-up: the first call of a size sets up buffers
    samples = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        dist.all_reduce(x)
        if device.type == "cuda":  # note: sync point, to time the collective itself
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main(argv: list[str]) -> int:
    """``-m cnnscale.study.allreduce_bench --out FILE.json [--min-kb 1] [--max-mb 64] [--repeats 5]``."""
    p = CommandParser(prog="cnnscale.study.allreduce_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file written by rank 0")
    p.add_argument("--min-kb", type=int, default=1, help="smallest tensor, KiB")
    p.add_argument("--max-mb", type=int, default=64, help="largest tensor, MiB (sizes double from the smallest)")
    p.add_argument("--repeats", type=int, default=5, help="timed all-reduces per size (the median is kept)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    world = dist.get_world_size()
    sizes, times = [], []
    size = args.min_kb * 1024
    while size <= args.max_mb * 2**20:
        sizes.append(size)
        times.append(time_allreduce(size, device, args.repeats))
        size *= 2
    if dist.get_rank() == 0:
        ic = fit_alpha_beta(sizes, times, world)
        write_json(args.out, {"backend": backend, "world_size": world, "device_type": device.type,
                              "threads": torch.get_num_threads(), "sizes_bytes": sizes, "times_s": times,
                              "fit": {"alpha_s": ic.latency_s, "bandwidth_Bps": ic.bandwidth_Bps}})
        print(f"all-reduce fit ({backend}, {world} procs): α={ic.latency_s * 1e6:.1f} µs, "
              f"bandwidth={ic.bandwidth_Bps / 1e9:.2f} GB/s -> {args.out}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="cnnscale.study.allreduce_bench"))
