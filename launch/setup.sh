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
  # Which torch build this is and for which CUDA, beside what the driver offers (once, after installing: ~8 s): a
  # wheel built for a newer CUDA than the driver supports sees no GPU, and training then refuses to start on a node
  # whose nvidia-smi lists GPUs.
  "$ROOT/.venv/bin/python" -c 'import torch; cuda = torch.version.cuda
print(f"[setup] installed torch {torch.__version__}: " + (f"built for CUDA {cuda}" if cuda else "a CPU-only build")
      + f"; GPUs it can use: {torch.cuda.device_count() if torch.cuda.is_available() else 0}")' || true
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] driver: $(nvidia-smi 2>/dev/null | grep -o 'Driver Version: [0-9.]*\|CUDA Version: [0-9.]*' | tr '\n' ' ')"
  fi
  touch "$stamp"
fi
