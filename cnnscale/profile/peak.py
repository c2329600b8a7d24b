"""``python -m cnnscale.profile.peak --threads N [--dtypes fp32,bf16] [--refresh]``: measure this host's CPU matmul
peak at N torch threads into the cache (:mod:`.peakcache`) unless it is there, and print one JSON line, a list of
``{"dtype", "tflops", "peak_cache", "peak_age_s"}``. :func:`cnnscale.profile.peakcache.warm_peak_cache` runs it in a
child process, so that the parent (a study) imports no torch."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from cnnscale.profile.mfu import cpu_peak

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Measure (or find) the peak for each dtype; print the JSON line; exit 0."""
    p = argparse.ArgumentParser(prog="python -m cnnscale.profile.peak")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--dtypes", default="fp32")
    p.add_argument("--refresh", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = []
    for dtype in [d for d in args.dtypes.split(",") if d]:
        tflops, status, age = cpu_peak(dtype, args.refresh)
        out.append({"dtype": dtype, "tflops": tflops, "peak_cache": status, "peak_age_s": age})
    print(json.dumps(out, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
