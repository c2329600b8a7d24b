#!/usr/bin/env python3
"""Training entry point: `accelerate launch launch/train.py --model vgg16 [--config FILE] [--section.field value]`.

Also runs under torchrun and plainly under python. The same code path as `cnnscale train`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from cnnscale.errors import run_cli  # noqa: E402
from cnnscale.train.__main__ import finish  # noqa: E402  (the exit of python -m cnnscale.train)
from cnnscale.train.cli import main  # noqa: E402

__all__: list[str] = []

if __name__ == "__main__":
    finish(run_cli(main, prog="train.py"))
