"""``cnnscale`` command line. Dispatches to each command's module lazily, so ``cnnscale --help`` never imports torch.

Each command module exposes ``main(argv: list[str]) -> int`` with its own argparse parser.
"""

from __future__ import annotations

import importlib
import sys

from cnnscale import __version__
from cnnscale.errors import run_cli

__all__ = ["main", "COMMANDS"]

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "models": ("cnnscale.models.table", "main", "the model zoo: params, MACs, FLOPs, the seed's claims beside them"),
    "train": ("cnnscale.train.loop", "main", "train one run (same flags as launch/train.py)"),
    "bench": ("cnnscale.bench.run", "main", "benchmark models on synthetic data: img/s, step split, memory, MFU"),
    "study": ("cnnscale.study.local", "main", "run a scaling study (models x world sizes x precision) into runs/"),
    "report": ("cnnscale.report.main", "main", "render a scaling report from run directories (rich, PNG, HTML, CSV)"),
    "submit": ("cnnscale.study.submit", "main", "render and submit an sbatch script for a training run"),
    "distill": ("cnnscale.compress.distill", "main", "train a student from a teacher checkpoint (distillation)"),
    "prune": ("cnnscale.compress.prune", "main", "global L1 unstructured pruning, optional fine-tuning"),
    "quantize": ("cnnscale.compress.quantize", "main", "post-training int8 quantisation, with size/latency/accuracy"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        f"usage: cnnscale [--version] [--debug] COMMAND [ARGS...]   (cnnscale {__version__})",
        "",
        "Scaling-study harness for classic CNNs on CIFAR-10 (Accelerate: DDP, multi-node, AMP, DeepSpeed).",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'cnnscale COMMAND --help' for a command's options. --debug shows tracebacks."]
    return "\n".join(lines)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"cnnscale {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"cnnscale: error: unknown command {name!r} (choose from: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
