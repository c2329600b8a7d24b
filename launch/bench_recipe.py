#!/usr/bin/env python3
"""The LeNet-5 recipe as a user types it, against the seed's own loop, on the same images, in one invocation.

    python launch/bench_recipe.py --data-dir DIR [--epochs 20] [--recipe lenet5] [--json FILE]
    python launch/bench_recipe.py --data-dir DIR --startup      # the decode cache: first and second start-up

1. The default path: ``launch/train.py --config configs/recipes/RECIPE.yaml --data imagefolder --data-dir DIR
   --epochs N`` in a child process, with no other flag (so ``data.loader auto`` decides, and the decode cache
   serves a second run). Wall: from starting the process to its exit, imports, decoding and evaluation included.
2. The seed's plain loop (the baseline of ``cnnscale bench``'s e2e ratio, :func:`cnnscale.bench.ratios.seed_step`:
   zero_grad, forward, loss, backward, step, ``.item()`` every step) on the torch DataLoader with the seed's
   torchvision transforms and ``--workers`` worker processes, the recipe's optimiser and StepLR, the same train split
   (the recipe's data.val_size held out) and epochs, then the test set. Wall: from building its DataLoader to its test
   accuracy (its imports are not counted: a bias in the seed's favour).

The seed loop runs first, then the default path, so that drift of a shared machine later in the run (and the
default path's own decoding, when its cache is cold) counts against cnnscale. It prints both walls, both test
accuracies and the ratio (seed wall / default-path wall), and writes them with ``--json``. Run it on an idle
machine: on a shared one the walls measure the other jobs too.

``--startup`` measures the decode cache instead: the default path with ``--max-steps 1`` and no evaluation, twice,
with a fresh, empty ``CNNSCALE_CACHE_DIR`` (a temporary directory, removed afterwards): the first run decodes the
JPEGs and writes the cache, the second reads it. Each wall is the child's, from start to exit (imports included),
with the cache state each run recorded in env.json (``built``, then ``hit``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from cnnscale.bench.ratios import seed_step  # noqa: E402
from cnnscale.config import Config, load_config  # noqa: E402
from cnnscale.data.datasets import build_datasets, build_loaders  # noqa: E402
from cnnscale.errors import UserError, run_cli  # noqa: E402
from cnnscale.models import create_model  # noqa: E402
from cnnscale.records.io import write_json  # noqa: E402
from cnnscale.resources import find_builtin  # noqa: E402

__all__ = ["main", "seed_loop", "default_path"]


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_recipe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="ImageFolder root with train/ and test/ (the JPEG copy)")
    p.add_argument("--epochs", type=int, default=20, help="epochs of both sides (the recipe's: 20)")
    p.add_argument("--recipe", default="lenet5", help="built-in recipe name or YAML file")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the seed loop (the seed's: 2)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of both sides (OMP_NUM_THREADS of the child; 0: leave as is). On a shared "
                        "machine 1 avoids intra-op threads spinning against other jobs")
    p.add_argument("--out", default="", help="directory for the default path's run (default: a temporary one)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--startup", action="store_true",
                   help="measure the decode cache instead: two 1-step runs on a fresh cache (first, second start-up)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.workers < 0 or args.threads < 0:
        raise UserError(f"--epochs must be >= 1, --workers and --threads >= 0, got {args.epochs}, {args.workers} "
                        f"and {args.threads}")
    if not (Path(args.data_dir) / "train").is_dir() or not (Path(args.data_dir) / "test").is_dir():
        raise UserError(f"--data-dir {args.data_dir!r} needs train/ and test/ (ImageFolder layout)")
    return args


def _flags(args: argparse.Namespace, recipe: Path) -> list[str]:
    return ["--config", str(recipe), "--data", "imagefolder", "--data-dir", args.data_dir, "--epochs",
            str(args.epochs)]


def default_path(args: argparse.Namespace, recipe: Path, out: Path, extra: tuple[str, ...] = (),
                 cache_dir: str = "") -> dict[str, Any]:
    """The recipe as typed, in a child process: wall, test accuracy, the loader chosen and why. ``extra``: flags
    after the recipe's (the start-up mode's); ``cache_dir``: the child's CNNSCALE_CACHE_DIR."""
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *_flags(args, recipe), "--out", str(out),
           "--train.progress", "none", *extra]
    t0 = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}),
           **({"CNNSCALE_CACHE_DIR": cache_dir} if cache_dir else {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=6 * 3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise UserError(f"the default path failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    summary = json.loads((out / "summary.json").read_text())
    env = json.loads((out / "env.json").read_text())
    return {"wall_s": wall, "test_acc": summary["test_acc"], "loader": env.get("loader"),
            "loader_reason": env.get("loader_reason"), "decode_cache": env.get("decode_cache"),
            "command": " ".join(cmd)}


def _accuracy(model: torch.nn.Module, loader: Any) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return right / total


def seed_loop(cfg: Config, workers: int) -> dict[str, Any]:
    """The seed's loop on the recipe's split, optimiser, StepLR and epochs: wall and test accuracy."""
    t0 = time.perf_counter()
    data = dataclasses.replace(cfg.data, loader="torch", num_workers=workers, persistent_workers=False)
    torch.manual_seed(cfg.train.seed)
    splits = build_datasets(data, cfg.train.seed)
    train, _, test = build_loaders(data, cfg.train, splits, 1, pin=False)
    model = create_model(cfg.model.name, num_classes=splits.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(cfg.sched.step_size), gamma=cfg.sched.gamma)
    step = seed_step(model, opt, torch.nn.CrossEntropyLoss(), [0.0])
    for _ in range(cfg.train.epochs):
        model.train()
        for batch in train:
            step(batch)
        sched.step()
    acc = _accuracy(model, test)
    return {"wall_s": time.perf_counter() - t0, "test_acc": acc, "train_images": len(splits.train),
            "loader": f"torch DataLoader, {workers} workers, .item() every step"}


def _print(res: dict[str, Any]) -> None:
    d, s = res["default"], res["seed"]
    print(f"bench_recipe: {res['recipe']}, {res['epochs']} epoch(s), {s['train_images']:,} training images of "
          f"{res['data_dir']}")
    print(f"  default path  wall {d['wall_s']:8.1f} s   test acc {100 * d['test_acc']:6.2f}%   loader {d['loader']} "
          f"({d['loader_reason']}; decode cache {d['decode_cache']})")
    print(f"  seed loop     wall {s['wall_s']:8.1f} s   test acc {100 * s['test_acc']:6.2f}%   {s['loader']}")
    print(f"  ratio (seed wall / default-path wall): {res['ratio']:.2f}x; test accuracy, default minus seed: "
          f"{100 * (d['test_acc'] - s['test_acc']):+.2f} points")


_STARTUP_FLAGS = ("--max-steps", "1", "--train.eval_every_epoch", "false", "--train.final_eval", "false")


def startup(args: argparse.Namespace, recipe: Path) -> dict[str, Any]:
    """The decode cache's first and second start-up: two 1-step runs of the default path on a fresh cache."""
    with tempfile.TemporaryDirectory(prefix="bench-recipe-cache-") as tmp:
        runs = [default_path(args, recipe, Path(tmp) / f"run{k}", _STARTUP_FLAGS, str(Path(tmp) / "cache"))
                for k in (1, 2)]
    for k, r in enumerate(runs, 1):
        print(f"  start-up {k}: wall {r['wall_s']:6.1f} s (1 step, no evaluation), loader {r['loader']}, "
              f"decode cache {r['decode_cache']}")
    res = {"recipe": str(recipe), "data_dir": args.data_dir, "first_s": runs[0]["wall_s"],
           "second_s": runs[1]["wall_s"], "runs": runs}
    print(f"bench_recipe --startup: first {res['first_s']:.1f} s, second {res['second_s']:.1f} s "
          f"({res['first_s'] - res['second_s']:.1f} s saved by the decode cache)")
    return res


def main(argv: list[str]) -> int:
    args = _args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = find_builtin("recipes", args.recipe)
    if args.startup:
        res = startup(args, recipe)
        if args.json:
            write_json(args.json, res)
        return 0
    cfg = load_config(_flags(args, recipe))
    seed = seed_loop(cfg, args.workers)  # first: a machine that gets busier later slows the default path, not it
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "run"
        default = default_path(args, recipe, out)
    res = {"recipe": str(recipe), "epochs": args.epochs, "data_dir": args.data_dir, "default": default,
           "seed": seed, "ratio": seed["wall_s"] / default["wall_s"], "threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    _print(res)
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench_recipe.py"))
