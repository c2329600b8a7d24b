#!/usr/bin/env python3
"""All-reduce micro-benchmark (the scaling model's "measured" interconnect): a thin script for
:mod:`cnnscale.study.allreduce_bench`, which the study runs as ``-m cnnscale.study.allreduce_bench``.

    accelerate launch --multi_gpu --num_processes 2 launch/bench_allreduce.py --out runs/study/allreduce.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from cnnscale.errors import run_cli  # noqa: E402
from cnnscale.study.allreduce_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench_allreduce.py"))
