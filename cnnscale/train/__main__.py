"""``accelerate launch -m cnnscale.train`` / ``torchrun -m cnnscale.train`` / ``python -m cnnscale.train``."""

import sys

from cnnscale.errors import run_cli
from cnnscale.train.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(run_cli(main, prog="cnnscale.train"))
