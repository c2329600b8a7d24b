"""``cnnscale bench``: per-model throughput, step split, memory, utilisation, FLOPs and MFU, and three ratios.

Each model runs ``--warmup`` untimed then ``--steps`` timed optimiser steps of the real cnnscale training step
(:mod:`cnnscale.bench.harness`: the training step on Accelerate, the device-resident loader on synthetic data, the
profiler on). Then the ratios of :mod:`cnnscale.bench.ratios` (overhead against a bare loop; the data path and end to
end against torchvision's DataLoader, on real images), each measured in the same run with its two sides alternated.
Tables and the ``--json`` document: :mod:`cnnscale.bench.output`. Flags: :mod:`cnnscale.bench.options`.

Cost: a few seconds per model on a GPU; on a 2-core CPU, ResNet-18 takes about 2.4 s per step of 64 images.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from cnnscale.bench.harness import BenchSetup, bench_model
from cnnscale.bench.options import bench_config, parse_args
from cnnscale.bench.output import print_ratios, print_table, results_doc
from cnnscale.bench.ratios import overhead_ratio, real_image_ratios
from cnnscale.profile.mfu import compute_dtype, cpu_peak
from cnnscale.records.io import write_json
from cnnscale.train.build import build_accelerator

__all__ = ["main"]


def _overhead(args: argparse.Namespace, setups: dict[str, BenchSetup]) -> dict[str, Any]:
    chosen = [m for m in args.overhead_models.split(",") if m in setups] or args.model_list[:1]
    return {m: overhead_ratio(args, setups[m]) for m in chosen}


def _remeasure_peak(args: argparse.Namespace, device: torch.device) -> None:
    """``--remeasure-peak``: refresh this host's cached CPU peak at the bench's thread count (a GPU's is a table)."""
    if device.type != "cpu":
        print(f"--remeasure-peak: the {device.type} peak comes from the data-sheet table; nothing to measure")
        return
    dtype = compute_dtype(args.mixed_precision, "cpu", True)
    tflops, status, _ = cpu_peak(dtype, refresh=True)
    print(f"CPU peak {status}: {tflops:.4g} TFLOP/s ({dtype}, threads={torch.get_num_threads()}), cached")


def main(argv: list[str] | None = None) -> int:
    """``cnnscale bench [--models a,b] [--steps N] [--ratios ...] [--json FILE]``; ``--help`` lists every flag."""
    args = parse_args(list(argv or []))
    if args.threads:
        torch.set_num_threads(args.threads)
    acc = build_accelerator(bench_config(args, args.model_list[0]))
    if args.remeasure_peak:
        _remeasure_peak(args, acc.device)
    rows, ratios, setups = [], {}, {}
    for name in args.model_list:
        row, setups[name] = bench_model(args, acc, name)
        rows.append(row)
    print_table(rows, acc.device)
    if args.ratios in ("overhead", "all"):
        ratios["overhead"] = _overhead(args, setups)
    setups.clear()  # free the models before the real-image ratios build theirs
    if args.ratios in ("data", "e2e", "all") and args.data_dir:
        ratios.update(real_image_ratios(args, acc))
    elif args.ratios == "all":
        print("data and e2e ratios skipped: they need the real images (--data-dir DIR)")
    print_ratios(ratios)
    if args.json:
        write_json(args.json, results_doc(args, acc.device, rows, ratios))
    return 0
