"""``cnnscale train``, ``python -m cnnscale.train`` and ``launch/train.py``: parse the flags, then train.

The flags are parsed (and ``--resume DIR`` resolved against DIR's config) before the trainer is imported, so
``--help`` and a bad flag answer at once: no torch import (about 8 s), no DeepSpeed banner. A SIGUSR1 (a SLURM
preemption notice) that arrives during the slow import is kept by :func:`cnnscale.train.preempt.install_early`.
"""

from __future__ import annotations

import os

from cnnscale.errors import UserError
from cnnscale.train.preempt import install_early
from cnnscale.train.resume import finished_message, fresh_run_refusal, resume_config

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``--model NAME [--config FILE] [--section.field value ...]``; ``--help`` lists every flag with its default.
    ``--resume DIR`` continues the run in DIR from its own config (:mod:`cnnscale.train.resume`); a finished run
    resumed without extending it is a no-op, answered before torch is imported."""
    install_early()
    cfg = resume_config(list(argv or []))  # prints --help and exits 0; bad input is a one-line UserError
    refused = fresh_run_refusal(cfg)
    if refused is not None:
        raise UserError(refused)
    done = finished_message(cfg) if cfg.train.resume else None
    if done is not None:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every rank gets here: one line
            print(done, flush=True)
        return 0
    from cnnscale.train.loop import exit_code, run  # lazy: --help and bad flags must not pay for torch (see above)

    return exit_code(run(cfg).summary)
