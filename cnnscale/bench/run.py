"""``cnnscale bench``: per-model throughput, step split, memory, utilisation, FLOPs and MFU, and three ratios.

Each model runs ``--warmup`` untimed then ``--steps`` timed optimiser steps of the real cnnscale training step
(``train.train_step`` on Accelerate, the device-resident loader on synthetic data, the profiler on). Then, measured in
the same run with the two sides alternated ``--rounds`` times (median of the per-round ratios; this machine is
noisy):

1. overhead: the full cnnscale step against a bare PyTorch loop, same model, batch, threads and batches;
2. data: the device-resident loader against torchvision's DataLoader with PIL transforms, loader alone, real images;
3. e2e: LeNet-5 on the real images, cnnscale with the device loader against the seed tutorial's plain loop
   (DataLoader with 2 workers, ``.item()`` every step).

Timing: warm-up excluded, the device synchronised before each clock read. Results also go to ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Iterable
from statistics import median
from typing import Any

import torch

from cnnscale.errors import UserError

__all__ = ["main", "SEED_MODELS", "GOALS", "bench_model", "measure_ratio"]

SEED_MODELS = ("lenet5", "alexnet", "vgg16", "resnet18", "mobilenet_v2")
GOALS = {"overhead": 0.98, "data": 5.0, "e2e": 3.0}
OVERHEAD_GOAL_MODELS = ("lenet5", "resnet18")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cnnscale bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(SEED_MODELS), help="comma-separated model names (default: seed's)")
    p.add_argument("--steps", type=int, default=20, help="timed optimiser steps per model (and per ratio chunk)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (both sides of the overhead ratio)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--ratios", default="all", choices=("overhead", "data", "e2e", "all", "none"))
    p.add_argument("--overhead-models", default=",".join(OVERHEAD_GOAL_MODELS),
                   help="models for the overhead ratio, among --models (default: those with a goal)")
    p.add_argument("--rounds", type=int, default=5, help="alternations of the two sides of each ratio")
    p.add_argument("--data-batches", type=int, default=100, help="batches per side per round, data-path ratio")
    p.add_argument("--e2e-steps", type=int, default=100, help="steps per side per round, end-to-end ratio")
    p.add_argument("--data-dir", default="", help="ImageFolder root with train/ and test/ (the real images)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the torchvision side")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    from cnnscale.models import list_models

    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.model_list if m not in list_models()]
    if unknown:
        raise UserError(f"unknown model {unknown[0]!r} (choose from: {', '.join(sorted(list_models()))})")
    for name in ("steps", "micro_batch", "rounds", "data_batches", "e2e_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.threads < 0 or args.workers < 0:
        raise UserError("--warmup, --threads and --workers must be >= 0")
    if args.ratios in ("data", "e2e") and not args.data_dir:
        raise UserError(f"--ratios {args.ratios} needs the real images: --data-dir DIR (ImageFolder train/, test/)")
    return args


def _cfg(args: argparse.Namespace, model: str, **data: Any) -> Any:
    from cnnscale.config import load_config

    d = {"name": "synthetic", "loader": "device", "val_size": 0, "synthetic_size": args.micro_batch * 8, **data}
    return load_config(overrides={
        "model": {"name": model}, "data": d,
        "train": {"micro_batch": args.micro_batch, "mixed_precision": args.mixed_precision, "max_steps": 1,
                  "progress": "none", "seed": 0},
        "fast": {"channels_last": args.channels_last, "compile": args.compile}})


class _Setup:
    """A prepared model, optimiser and scheduler, plus an untouched copy of the model for the bare loop."""

    def __init__(self, cfg: Any, acc: Any) -> None:
        from cnnscale.models import create_model
        from cnnscale.train.loop import ClassificationTask, apply_fast_path
        from cnnscale.train.schedule import build_optimizer, build_scheduler

        apply_fast_path(cfg, acc.device)  # cudnn.benchmark and TF32 as in training (no-ops on CPU)
        torch.manual_seed(0)
        model = create_model(cfg.model.name, num_classes=cfg.model.num_classes)
        if cfg.fast.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.bare = copy.deepcopy(model).to(acc.device)
        self.bare_opt = build_optimizer(cfg.optim, self.bare)
        self.cfg, self.acc, self.task = cfg, acc, ClassificationTask()
        self.model, self.opt = acc.prepare(model, build_optimizer(cfg.optim, model))
        if cfg.fast.compile:
            self.model, self.bare = torch.compile(self.model), torch.compile(self.bare)
        self.sched = build_scheduler(cfg.sched, self.opt.optimizer, 1000, 1000)

    def profiler(self) -> Any:
        from cnnscale.profile.timer import build_profiler

        prof = build_profiler(True, self.acc.device, self.acc.num_processes, accelerator=self.acc, model=self.model,
                              cfg=self.cfg)
        prof.env()  # FLOP count and peak measurement happen here, before any clock starts
        return prof

    def train(self, batches: Iterable[Any], n: int, prof: Any) -> None:
        """``n`` optimiser steps of the cnnscale loop body (train_step, scheduler, profiler), cycling ``batches``."""
        from cnnscale.train.loop import train_step

        acc, cl = self.acc, self.cfg.fast.channels_last
        loss_sum, done = torch.zeros((), device=acc.device), 0
        while done < n:
            for images, labels in prof.iter_data(batches):
                if cl:
                    images = images.contiguous(memory_format=torch.channels_last)
                loss_sum += train_step(acc, self.model, self.task, self.opt, images, labels, 0.0, prof)
                if not acc.sync_gradients:
                    continue
                self.sched.step()
                prof.step(images.shape[0] * acc.num_processes)
                done += 1
                if done >= n:
                    break
        loss_sum.item()  # note: sync point, once per chunk

    def bare_train(self, batches: list[Any], n: int) -> None:
        """The bare loop: forward, ``loss.backward(); opt.step()``, nothing else."""
        crit = torch.nn.CrossEntropyLoss()
        dev = self.acc.device.type
        for i in range(n):
            x, y = batches[i % len(batches)]
            if self.cfg.fast.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev, dtype=torch.bfloat16 if self.cfg.train.mixed_precision == "bf16" else
                                torch.float16, enabled=self.cfg.train.mixed_precision != "no"):
                loss = crit(self.bare(x), y)
            loss.backward()
            self.bare_opt.step()
            self.bare_opt.zero_grad()


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _timed(device: torch.device, fn: Callable[[], Any], images: int) -> float:
    t = _sync(device)
    fn()
    return images / max(_sync(device) - t, 1e-9)


def measure_ratio(ours: Callable[[], float], theirs: Callable[[], float], rounds: int) -> dict[str, Any]:
    """Alternate the two sides (order flipped every round); the ratio is the median of per-round ratios."""
    a, b = [], []
    for r in range(rounds):
        if r % 2:
            b.append(theirs())
            a.append(ours())
        else:
            a.append(ours())
            b.append(theirs())
    ratios = [x / y for x, y in zip(a, b)]
    return {"ours_img_per_s": median(a), "theirs_img_per_s": median(b), "ratio": median(ratios),
            "ratios": ratios, "rounds": rounds}


def bench_model(args: argparse.Namespace, acc: Any, name: str) -> tuple[dict[str, Any], _Setup]:
    """Warm-up, then ``args.steps`` profiled steps on synthetic data with the device loader: the table row."""
    from cnnscale.data.device import build_device_loaders

    cfg = _cfg(args, name)
    setup = _Setup(cfg, acc)
    train = build_device_loaders(cfg, acc)[0]
    from cnnscale.profile.timer import NullProfiler

    setup.train(train, args.warmup, NullProfiler()) if args.warmup else None
    prof = setup.profiler()
    prof.start()
    setup.train(train, args.steps, prof)
    prof.stop()
    return {"model": name, **prof.summary()}, setup


def overhead_ratio(args: argparse.Namespace, setup: _Setup) -> dict[str, Any]:
    from cnnscale.data.device import build_device_loaders

    dev = setup.acc.device
    batches = [b for b, _ in zip(build_device_loaders(setup.cfg, setup.acc)[0], range(8))]
    setup.bare_train(batches, args.warmup or 1)
    n, imgs = args.steps, args.steps * args.micro_batch

    def ours() -> float:
        prof = setup.profiler()
        prof.start()
        rate = _timed(dev, lambda: setup.train(batches, n, prof), imgs)
        prof.stop()
        return rate

    res = measure_ratio(ours, lambda: _timed(dev, lambda: setup.bare_train(batches, n), imgs), args.rounds)
    goal = GOALS["overhead"] if setup.cfg.model.name in OVERHEAD_GOAL_MODELS else None
    return {**res, "goal": goal, "command_side": "cnnscale train_step + profiler", "other_side": "bare loop"}


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(argv or []))
    if args.threads:
        torch.set_num_threads(args.threads)
    from cnnscale.train.loop import build_accelerator

    acc = build_accelerator(_cfg(args, args.model_list[0]))
    rows, ratios, setups = [], {}, {}
    for name in args.model_list:
        row, setups[name] = bench_model(args, acc, name)
        rows.append(row)
    print_table(rows, acc.device)
    if args.ratios in ("overhead", "all"):
        chosen = [m for m in args.overhead_models.split(",") if m in setups] or args.model_list[:1]
        ratios["overhead"] = {m: overhead_ratio(args, setups[m]) for m in chosen}
    setups.clear()
    if args.ratios in ("data", "e2e", "all") and args.data_dir:
        ratios.update(real_image_ratios(args, acc))
    elif args.ratios == "all":
        print("data and e2e ratios skipped: they need the real images (--data-dir DIR)")
    print_ratios(ratios)
    if args.json:
        from cnnscale.records.io import write_json

        write_json(args.json, results_doc(args, acc, rows, ratios))
    return 0


# ---------------------------------------------------------------------------------------------- real images
def _real_cfgs(args: argparse.Namespace) -> tuple[Any, Any]:
    common = {"name": "imagefolder", "data_dir": args.data_dir, "val_size": 5000, "num_workers": args.workers,
              "persistent_workers": False}
    return _cfg(args, "lenet5", loader="torch", **common), _cfg(args, "lenet5", loader="device", **common)


def _take_batches(loader: Any, n: int, warm: int, step: Callable[[Any], Any] | None = None) -> float:
    """img/s of ``n`` batches from a fresh iterator after ``warm`` untimed ones (worker start-up excluded)."""
    it, dev = iter(loader), torch.device("cpu")
    for _ in range(warm):
        batch = next(it)
        dev = batch[0].device
    t, images = _sync(dev), 0
    for _ in range(n):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        images += batch[0].shape[0]
        if step is not None:
            step(batch)
    return images / max(_sync(dev) - t, 1e-9)


def _seed_step(model: Any, opt: Any, crit: Any, running: list[float]) -> Callable[[Any], None]:
    """The seed tutorial's loop body: zero_grad, forward, loss, backward, step, ``.item()`` every step."""
    def step(batch: Any) -> None:
        x, y = batch
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        running[0] += loss.item()
    return step


def real_image_ratios(args: argparse.Namespace, acc: Any) -> dict[str, Any]:
    """The data-path and end-to-end ratios on the real images (LeNet-5 for e2e)."""
    from cnnscale.data.datasets import build_datasets, build_loaders
    from cnnscale.data.device import build_device_loaders

    tcfg, dcfg = _real_cfgs(args)
    torch_train = build_loaders(tcfg.data, tcfg.train, build_datasets(tcfg.data, 0), 1, pin=False)[0]
    device_train = build_device_loaders(dcfg, acc)[0]  # decodes once, then the uint8 cache beside the data
    out: dict[str, Any] = {}
    warm = 2 + 2 * args.workers
    if args.ratios in ("data", "all"):
        out["data"] = {**measure_ratio(lambda: _take_batches(device_train, args.data_batches, 2),
                                       lambda: _take_batches(torch_train, args.data_batches, warm), args.rounds),
                       "goal": GOALS["data"], "command_side": "device loader",
                       "other_side": f"DataLoader + PIL transforms, {args.workers} workers"}
    if args.ratios in ("e2e", "all"):
        from cnnscale.models import create_model

        setup = _Setup(dcfg, acc)
        torch.manual_seed(0)
        seed_model = create_model("lenet5")
        seed_opt = torch.optim.SGD(seed_model.parameters(), lr=0.01, momentum=0.9)
        seed = _seed_step(seed_model, seed_opt, torch.nn.CrossEntropyLoss(), [0.0])

        def ours() -> float:
            prof = setup.profiler()
            prof.start()
            rate = _timed(acc.device, lambda: setup.train(device_train, args.e2e_steps, prof),
                          args.e2e_steps * args.micro_batch)
            prof.stop()
            return rate

        setup.train(device_train, max(args.warmup, 1), setup.profiler())
        out["e2e"] = {**measure_ratio(ours, lambda: _take_batches(torch_train, args.e2e_steps, warm, seed),
                                      args.rounds),
                      "goal": GOALS["e2e"], "command_side": "cnnscale, device loader, profiler on",
                      "other_side": f"seed loop: DataLoader {args.workers} workers, .item() every step"}
    return out


# ---------------------------------------------------------------------------------------------- output
def _fmt(x: Any, spec: str = ",.0f", scale: float = 1.0) -> str:
    return "n/a" if x is None else format(x * scale, spec)


def print_table(rows: list[dict[str, Any]], device: torch.device) -> None:
    from rich.table import Table

    gpu = device.type == "cuda"
    t = Table(title=f"cnnscale bench on {_device_name(device)} (synthetic data, device loader, profiler on)")
    for col in ("model", "img/s", "step ms p50", "p90", "fwd+bwd %", "optim %", "data %",
                "peak mem GiB" + (" (alloc)" if gpu else " (RSS)"), "GPU util %" if gpu else "CPU %",
                "GFLOPs/img", "TFLOP/s", "MFU %"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        wall = r["train_time_s"]
        mem = r["max_memory_allocated_bytes"] if gpu else r["peak_rss_bytes"]
        t.add_row(r["model"], _fmt(r["img_per_s"]), _fmt(r["step_ms_p50"], ",.1f"), _fmt(r["step_ms_p90"], ",.1f"),
                  _fmt(r["fwd_bwd_s"] / wall, ".0f", 100), _fmt(r["optim_s"] / wall, ".0f", 100),
                  _fmt(r["data_wait_s"] / wall, ".0f", 100), _fmt(mem, ".2f", 2**-30),
                  _fmt(r["gpu_util_pct_mean"] if gpu else r["cpu_percent"], ".0f"), _fmt(r["gflops_per_img"], ".3f"),
                  _fmt(r["achieved_tflops"], ".4f"), _fmt(r["mfu"], ".1f", 100))
    _console().print(t)
    if rows:
        print(f"peak for MFU: {_fmt(rows[0]['peak_tflops'], '.4g')} TFLOP/s ({rows[0]['peak_source'] or 'n/a'})")


def print_ratios(ratios: dict[str, Any]) -> None:
    from rich.table import Table

    if not ratios:
        return
    t = Table(title="ratios (median of per-round ratios, sides alternated)")
    for col in ("ratio", "ours img/s", "theirs img/s", "ratio", "goal", "result"):
        t.add_column(col, justify="left" if col == "ratio" else "right")
    items = [(f"overhead {m}", r) for m, r in ratios.get("overhead", {}).items()]
    items += [(k, ratios[k]) for k in ("data", "e2e") if k in ratios]
    for label, r in items:
        goal = r["goal"]
        verdict = "-" if goal is None else ("PASS" if r["ratio"] >= goal else "MISS")
        t.add_row(label, _fmt(r["ours_img_per_s"]), _fmt(r["theirs_img_per_s"]), f"{r['ratio']:.3f}",
                  "-" if goal is None else f">= {goal:g}", verdict)
    _console().print(t)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)  # piped to a file: don't squeeze the table


def _device_name(device: torch.device) -> str:
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, threads={torch.get_num_threads()}"


def results_doc(args: argparse.Namespace, acc: Any, rows: list[dict[str, Any]],
                ratios: dict[str, Any]) -> dict[str, Any]:
    from cnnscale import __version__
    from cnnscale.records.env import git_sha

    opts = {k: v for k, v in vars(args).items() if k != "model_list"}
    return {"version": __version__, "git_sha": git_sha(), "device": _device_name(acc.device),
            "torch": torch.__version__, "options": opts, "models": rows, "ratios": ratios,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
