#!/usr/bin/env bash
# Set everything up and run the whole test suite (what CI runs).
#  - installs cnnscale[dev,deepspeed] into .venv;
#  - as root, starts the local two-node SLURM cluster (slurm/local-cluster.sh) for the SLURM tests; without root
#    those tests skip with a reason, except under CI (CI=true), where a missing cluster fails the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launch/setup.sh dev,deepspeed
export CNNSCALE_CACHE_DIR="${CNNSCALE_CACHE_DIR:-$ROOT/.cache}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$CNNSCALE_CACHE_DIR/torch_extensions}"
mkdir -p "$TORCH_EXTENSIONS_DIR"
if [ "${CI:-}" = "true" ]; then export CNNSCALE_REQUIRE_SLURM=1; fi
if [ "$(id -u)" = 0 ] && [ -f slurm/local-cluster.sh ]; then
  bash slurm/local-cluster.sh start netns || { [ "${CNNSCALE_REQUIRE_SLURM:-0}" = 1 ] && exit 1; }
fi
.venv/bin/ruff check cnnscale tests launch
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
