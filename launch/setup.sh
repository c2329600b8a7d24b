#!/usr/bin/env bash
# Create .venv (if missing) and install cnnscale with the given extras. Sourced by quickstart.sh and test.sh.
#   bash launch/setup.sh [EXTRAS]      e.g. EXTRAS=dev,deepspeed
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "cnnscale needs Python >= 3.10" >&2; exit 1; }
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "[setup] creating $ROOT/.venv"
  "$PYTHON" -m venv "$ROOT/.venv"
fi
stamp="$ROOT/.venv/.cnnscale-installed-${EXTRAS:-base}"
if [ ! -e "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "[setup] installing cnnscale${EXTRAS:+[$EXTRAS]} (torch is large: a few minutes the first time)"
  # torch first: packages that build against it (deepspeed) then find it installed.
  "$ROOT/.venv/bin/python" -m pip install -q "torch>=2.4" "torchvision>=0.19"
  "$ROOT/.venv/bin/python" -m pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  touch "$stamp"
fi
