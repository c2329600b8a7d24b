"""``cnnscale COMMAND [ARGS...]``: the console script. ``COMMANDS`` names each command's ``main`` directly.

Each target is ``module:main`` with ``main(argv: list[str]) -> int`` and its own :class:`~cnnscale.config.CommandParser`
(``cnnscale COMMAND --help``). The module is imported only when its command runs, so ``cnnscale --help`` and the
commands that do not train (report, study, submit) never import torch (8-9 s and 0.8 GB).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import NamedTuple

from cnnscale import __version__
from cnnscale.errors import UserError, run_cli

__all__ = ["main", "COMMANDS", "Command", "command_main"]


class Command(NamedTuple):
    """One subcommand: where its ``main`` is, and one line of help."""

    target: str
    """``module:function``, as in a console-script entry point."""
    help: str
    """One line for ``cnnscale --help``."""


COMMANDS: dict[str, Command] = {
    "models": Command("cnnscale.models.table:main", "the model zoo: params, MACs, FLOPs, the seed's claims beside"),
    "train": Command("cnnscale.train.cli:main", "train one run (same flags as launch/train.py)"),
    "bench": Command("cnnscale.bench.run:main", "benchmark models on synthetic data: img/s, step split, memory, MFU"),
    "study": Command("cnnscale.study.main:main", "run a scaling study (models x world sizes x precision) into runs/"),
    "report": Command("cnnscale.report.main:main", "render a scaling report from run directories (rich, PNG, HTML)"),
    "submit": Command("cnnscale.study.submit:main", "render and submit an sbatch script for a training run"),
    "distill": Command("cnnscale.compress.distill:main", "train a student from a teacher checkpoint (distillation)"),
    "prune": Command("cnnscale.compress.prune:main", "global L1 unstructured pruning, optional fine-tuning"),
    "quantize": Command("cnnscale.compress.quantize:main", "post-training int8 quantisation, size/latency/accuracy"),
}


def command_main(name: str) -> Callable[[list[str]], int]:
    """The ``main`` of command ``name``, importing its module (torch, for the commands that train or measure)."""
    if name not in COMMANDS:
        raise UserError(f"unknown command {name!r} (choose from: {', '.join(COMMANDS)})")
    module, _, func = COMMANDS[name].target.partition(":")
    return getattr(importlib.import_module(module), func)  # lazy: keeps `cnnscale --help` free of torch


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        f"usage: cnnscale [--version] [--debug] COMMAND [ARGS...]   (cnnscale {__version__})",
        "",
        "Scaling-study harness for classic CNNs on CIFAR-10 (Accelerate: DDP, multi-node, AMP, DeepSpeed).",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "Run 'cnnscale COMMAND --help' for a command's options. --debug shows tracebacks."]
    return "\n".join(lines)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"cnnscale {__version__}")
        return 0
    return int(command_main(argv[0])(argv[1:]) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run ``cnnscale ARGS``; a UserError is one line on stderr and exit code 2."""
    return run_cli(_dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
