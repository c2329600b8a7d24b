"""``accelerate launch -m cnnscale.train`` / ``torchrun -m cnnscale.train`` / ``python -m cnnscale.train``."""

import sys

from cnnscale.errors import run_cli
from cnnscale.train.preempt import install_early

__all__: list[str] = []

install_early()  # keep a SIGUSR1 (preemption notice) that arrives during the slow torch import below
from cnnscale.train.loop import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main, prog="cnnscale.train"))
