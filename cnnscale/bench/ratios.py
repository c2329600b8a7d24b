"""The side-by-side ratios of ``cnnscale bench``, each measured with its two sides alternated round by round (the
order flipped every round). Each ratio is the median of the per-round ratios with its interval, by the one rule of
:mod:`cnnscale.records.stats` (min-max below 5 rounds, a bootstrap 95% interval from 5 on), and the number of
rounds. A loaded machine (other jobs on the cores) slows both sides of a round alike, so the per-round ratio is
fair where a ratio of two separately measured rates is not. ``--rounds auto`` alternates until the interval's
half-width is under :data:`AUTO_HALF_WIDTH` of the median (at least :data:`AUTO_MIN_ROUNDS` rounds) or the ratio's
``--budget-s`` is spent.

1. overhead: the full cnnscale step against a bare PyTorch loop, same model, batch, threads and batches;
2. data: the device-resident loader against torchvision's DataLoader with PIL transforms, loader alone, real images;
3. e2e: LeNet-5 on the real images, cnnscale with the device loader against the seed tutorial's plain loop
   (DataLoader with 2 workers, ``.item()`` every step).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from statistics import median
from typing import Any

import torch

from cnnscale.bench.harness import BenchSetup, clock, timed
from cnnscale.bench.options import GOALS, OVERHEAD_GOAL_MODELS, bench_config
from cnnscale.config import Config
from cnnscale.data.datasets import build_datasets, build_loaders
from cnnscale.data.device import build_device_loaders
from cnnscale.models import create_model
from cnnscale.records.stats import BOOTSTRAP_FROM, ratio_interval

__all__ = ["measure_ratio", "overhead_ratio", "real_image_ratios", "AUTO_HALF_WIDTH", "AUTO_MIN_ROUNDS",
           "AUTO_MAX_ROUNDS", "seed_step"]

AUTO_HALF_WIDTH = 0.02
"""``--rounds auto`` stops once the interval's half-width is under this share of the median ratio."""
AUTO_MIN_ROUNDS = BOOTSTRAP_FROM
"""``--rounds auto`` runs at least this many rounds (the bootstrap interval starts there)."""
AUTO_MAX_ROUNDS = 200


def _half_width(lo: float, hi: float, mid: float) -> float:
    return (hi - lo) / 2 / abs(mid) if mid else float("inf")


def measure_ratio(ours: Callable[[], float], theirs: Callable[[], float], rounds: int | str,
                  budget_s: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Alternate the two sides (order flipped every round) for ``rounds`` rounds, or with ``"auto"`` until the
    half-width is under :data:`AUTO_HALF_WIDTH` or ``budget_s`` (> 0) is spent. The ratio is the median of the
    per-round ratios; ``lo``/``hi`` its interval (``interval``: its kind), ``half_width`` relative to it."""
    auto = rounds == "auto"
    limit = AUTO_MAX_ROUNDS if auto else int(rounds)
    a: list[float] = []
    b: list[float] = []
    t0, stop = clock(), "rounds"
    while len(a) < limit:
        if len(a) % 2:
            b.append(theirs())
            a.append(ours())
        else:
            a.append(ours())
            b.append(theirs())
        iv = ratio_interval(a, b)
        if auto and len(a) >= AUTO_MIN_ROUNDS and _half_width(iv.lo, iv.hi, iv.median) < AUTO_HALF_WIDTH:
            stop = "half-width"
            break
        if auto and budget_s > 0 and clock() - t0 >= budget_s:
            stop = "budget"
            break
    ratios = [x / y for x, y in zip(a, b)]
    iv = ratio_interval(a, b)
    return {"ours_img_per_s": median(a), "theirs_img_per_s": median(b), "ratio": iv.median, "lo": iv.lo,
            "hi": iv.hi, "interval": iv.kind, "half_width": _half_width(iv.lo, iv.hi, iv.median),
            "ratios": ratios, "rounds": len(a), "stopped_by": stop, "seconds": clock() - t0}


def _profiled(setup: BenchSetup, batches: Any, steps: int, images: int) -> Callable[[], float]:
    """The cnnscale side: ``steps`` steps with a fresh profiler on, as img/s. The profiler's own warm-up steps (after
    which it flushes and restarts its counters) run first, untimed, as they do once at the start of a training run:
    inside the timed chunk they were a per-round cost of a few percent of a 5-step LeNet-5 chunk."""
    def ours() -> float:
        prof = setup.profiler()
        prof.start()
        if prof.warmup_steps:
            setup.train(batches, prof.warmup_steps, prof)
        rate = timed(setup.acc.device, lambda: setup.train(batches, steps, prof), images)
        prof.stop()
        return rate
    return ours


def overhead_ratio(args: argparse.Namespace, setup: BenchSetup) -> dict[str, Any]:
    """cnnscale's train_step with the profiler on, against the bare loop, on the same 8 device-resident batches."""
    dev = setup.acc.device
    batches = [b for b, _ in zip(build_device_loaders(setup.cfg, setup.acc)[0], range(8))]
    setup.bare_train(batches, args.warmup or 1)
    n, imgs = args.steps, args.steps * args.micro_batch
    res = measure_ratio(_profiled(setup, batches, n, imgs),
                        lambda: timed(dev, lambda: setup.bare_train(batches, n), imgs), args.rounds, args.budget_s)
    goal = GOALS["overhead"] if setup.cfg.model.name in OVERHEAD_GOAL_MODELS else None
    return {**res, "goal": goal, "command_side": "cnnscale train_step + profiler", "other_side": "bare loop"}


def _real_cfgs(args: argparse.Namespace) -> tuple[Config, Config]:
    common = {"name": "imagefolder", "data_dir": args.data_dir, "val_size": 5000, "num_workers": args.workers,
              "persistent_workers": False}
    return (bench_config(args, "lenet5", loader="torch", **common),
            bench_config(args, "lenet5", loader="device", **common))


def _take_batches(loader: Any, n: int, warm: int, step: Callable[[Any], Any] | None = None) -> float:
    """img/s of ``n`` batches from a fresh iterator after ``warm`` untimed ones (worker start-up excluded)."""
    it, dev = iter(loader), torch.device("cpu")
    for _ in range(warm):
        batch = next(it)
        dev = batch[0].device
    t, images = clock(dev), 0
    for _ in range(n):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        images += batch[0].shape[0]
        if step is not None:
            step(batch)
    return images / max(clock(dev) - t, 1e-9)


def seed_step(model: Any, opt: Any, crit: Any, running: list[float]) -> Callable[[Any], None]:
    """The seed tutorial's loop body: zero_grad, forward, loss, backward, step, ``.item()`` every step."""
    def step(batch: Any) -> None:
        x, y = batch
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        running[0] += loss.item()
    return step


def _e2e_ratio(args: argparse.Namespace, acc: Any, dcfg: Config, device_train: Any, torch_train: Any,
               warm: int) -> dict[str, Any]:
    """LeNet-5 end to end: cnnscale (device loader, profiler on) against the seed tutorial's loop."""
    setup = BenchSetup(dcfg, acc)
    torch.manual_seed(0)
    seed_model = create_model("lenet5")
    seed_opt = torch.optim.SGD(seed_model.parameters(), lr=0.01, momentum=0.9)
    seed = seed_step(seed_model, seed_opt, torch.nn.CrossEntropyLoss(), [0.0])
    setup.train(device_train, max(args.warmup, 1), setup.profiler())
    ours = _profiled(setup, device_train, args.e2e_steps, args.e2e_steps * args.micro_batch)
    res = measure_ratio(ours, lambda: _take_batches(torch_train, args.e2e_steps, warm, seed), args.rounds,
                        args.budget_s)
    return {**res, "goal": GOALS["e2e"], "command_side": "cnnscale, device loader, profiler on",
            "other_side": f"seed loop: DataLoader {args.workers} workers, .item() every step"}


def real_image_ratios(args: argparse.Namespace, acc: Any) -> dict[str, Any]:
    """The data-path and end-to-end ratios on the real images (LeNet-5 for e2e), as ``args.ratios`` asks."""
    tcfg, dcfg = _real_cfgs(args)
    torch_train = build_loaders(tcfg.data, tcfg.train, build_datasets(tcfg.data, 0), 1, pin=False)[0]
    device_train = build_device_loaders(dcfg, acc)[0]  # decodes once, then the uint8 cache beside the data
    out: dict[str, Any] = {}
    warm = 2 + 2 * args.workers
    if args.ratios in ("data", "all"):
        out["data"] = {**measure_ratio(lambda: _take_batches(device_train, args.data_batches, 2),
                                       lambda: _take_batches(torch_train, args.data_batches, warm), args.rounds,
                                       args.budget_s),
                       "goal": GOALS["data"], "command_side": "device loader",
                       "other_side": f"DataLoader + PIL transforms, {args.workers} workers"}
    if args.ratios in ("e2e", "all"):
        out["e2e"] = _e2e_ratio(args, acc, dcfg, device_train, torch_train, warm)
    return out
