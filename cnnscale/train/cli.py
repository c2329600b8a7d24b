"""``cnnscale train``, ``python -m cnnscale.train`` and ``launch/train.py``: parse the flags, then train.

The flags are parsed before the trainer is imported, so ``--help`` and a bad flag answer at once: no torch import
(about 8 s), no DeepSpeed banner. A SIGUSR1 (a SLURM preemption notice) that arrives during the slow import is kept
by :func:`cnnscale.train.preempt.install_early`.
"""

from __future__ import annotations

from cnnscale.config import load_config
from cnnscale.train.preempt import install_early

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``--model NAME [--config FILE] [--section.field value ...]``; ``--help`` lists every flag with its default."""
    install_early()
    cfg = load_config(list(argv or []))  # prints --help and exits 0; bad input is a one-line UserError
    from cnnscale.train.loop import exit_code, run  # lazy: --help and bad flags must not pay for torch (see above)

    return exit_code(run(cfg).summary)
