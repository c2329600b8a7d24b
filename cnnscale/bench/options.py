"""``cnnscale bench``'s flags, their checks, the goals of its ratios, and the run config each measured model gets."""

from __future__ import annotations

import argparse
from typing import Any

from cnnscale.config import PRECISIONS, CommandParser, Config, load_config
from cnnscale.errors import UserError
from cnnscale.models import SEED_MODELS, list_models

__all__ = ["GOALS", "OVERHEAD_GOAL_MODELS", "RATIOS", "parse_args", "bench_config"]

GOALS = {"overhead": 0.98, "data": 5.0, "e2e": 3.0}
"""The least each ratio should reach (ours / theirs, img/s)."""
OVERHEAD_GOAL_MODELS = ("lenet5", "resnet18")
"""Models whose overhead ratio has a goal (others are measured and shown without a verdict)."""
RATIOS = ("overhead", "data", "e2e", "all", "none")


def _parser() -> CommandParser:
    p = CommandParser(prog="cnnscale bench", description="Per-model throughput, step split, memory, utilisation, "
                      "FLOPs and MFU on synthetic data, and three side-by-side ratios (overhead against a bare loop; "
                      "the data path and end to end against torchvision's DataLoader, on real images).")
    p.add_argument("--models", default=",".join(SEED_MODELS),
                   help=f"comma-separated model names (default: the seed's, {','.join(SEED_MODELS)})")
    p.add_argument("--steps", type=int, default=20, help="timed optimiser steps per model (and per ratio chunk)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--micro-batch", type=int, default=64, help="images per step")
    p.add_argument("--mixed-precision", default="no", choices=PRECISIONS, help="autocast precision")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (both sides)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (both sides of the overhead ratio)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--ratios", default="all", choices=RATIOS, help="which side-by-side ratios to measure")
    p.add_argument("--overhead-models", default=",".join(OVERHEAD_GOAL_MODELS),
                   help="models for the overhead ratio, among --models (default: those with a goal)")
    p.add_argument("--rounds", default="5", help="alternations of the two sides of each ratio, or auto: until the "
                   "95%% interval's half-width is under 2%% of the ratio or --budget-s is spent")
    p.add_argument("--budget-s", type=float, gt=0, cap=86400, default=300.0,
                   help="time budget per ratio under --rounds auto")
    p.add_argument("--remeasure-peak", action="store_true", help="measure the CPU peak (matmul and convolution) "
                   "for MFU again and refresh this host's cached value (CNNSCALE_CACHE_DIR) before measuring")
    p.add_argument("--data-batches", type=int, default=100, help="batches per side per round, data-path ratio")
    p.add_argument("--e2e-steps", type=int, default=100, help="steps per side per round, end-to-end ratio")
    p.add_argument("--data-dir", default="", help="ImageFolder root with train/ and test/ (the real images)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the torchvision side")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed flags plus ``model_list``; a one-line :class:`UserError` for a bad value."""
    args = _parser().parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.model_list if m not in list_models()]
    if unknown:
        raise UserError(f"unknown model {unknown[0]!r} (choose from: {', '.join(sorted(list_models()))})")
    if args.rounds != "auto":
        try:
            args.rounds = int(args.rounds)
        except ValueError:
            raise UserError(f"--rounds must be a whole number >= 1 or auto, got {args.rounds!r}") from None
    for name in ("steps", "micro_batch", "data_batches", "e2e_steps") + (("rounds",) if args.rounds != "auto" else ()):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.threads < 0 or args.workers < 0:
        raise UserError("--warmup, --threads and --workers must be >= 0")
    if args.ratios in ("data", "e2e") and not args.data_dir:
        raise UserError(f"--ratios {args.ratios} needs the real images: --data-dir DIR (ImageFolder train/, test/)")
    return args


def bench_config(args: argparse.Namespace, model: str, **data: Any) -> Config:
    """The run config of one measured model: synthetic data on the device loader unless ``data`` says otherwise."""
    d = {"name": "synthetic", "loader": "device", "val_size": 0, "synthetic_size": args.micro_batch * 8, **data}
    return load_config(overrides={
        "model": {"name": model}, "data": d,
        "train": {"micro_batch": args.micro_batch, "mixed_precision": args.mixed_precision, "max_steps": 1,
                  "progress": "none", "seed": 0},
        "fast": {"channels_last": args.channels_last, "compile": args.compile}, "profile": {"enabled": True}})
