#!/usr/bin/env bash
# Set everything up and run the main job: the quickstart scaling study (CPU, synthetic data, world sizes 1 and 2),
# then its report. Runs on a laptop or a CPU box in a few minutes; see README.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launch/setup.sh
exec .venv/bin/cnnscale study configs/studies/quickstart.yaml "$@"
