#!/usr/bin/env bash
# Set everything up and run the whole test suite (what CI runs).
#  - installs cnnscale[dev,deepspeed,tensorboard,mlflow,torchao] into .venv;
#  - as root, starts the local two-node SLURM cluster (slurm/local-cluster.sh) for the SLURM tests; without root
#    those tests skip with a reason, except under CI (CI=true), where a missing cluster fails the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# As root, the Debian packages (the SLURM cluster's, and chromium for the HTML report's browser test,
# tests/test_html.py) install in the background while pip installs the Python ones: about a minute saved on a fresh
# machine. Without chromium the browser test skips with the reason, except under CI, where it fails.
sys_pid=""
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  mkdir -p "$ROOT/.cache"
  (
    [ -f slurm/local-cluster.sh ] && bash slurm/local-cluster.sh install netns
    if ! command -v chromium >/dev/null; then
      { apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; } \
        || echo "[test] could not install chromium: tests/test_html.py's browser test will skip (fail under CI)"
    fi
  ) >"$ROOT/.cache/system-packages.log" 2>&1 &
  sys_pid=$!
fi
export CNNSCALE_CACHE_DIR="${CNNSCALE_CACHE_DIR:-$ROOT/.cache}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$CNNSCALE_CACHE_DIR/torch_extensions}"
mkdir -p "$TORCH_EXTENSIONS_DIR"
# DeepSpeed first, then its CPU shared-memory comm op (which the first DeepSpeed run would otherwise compile: about a
# minute of one core, tests/test_deepspeed.py) built in the background while pip installs the other extras, mostly
# on one core. Cached in TORCH_EXTENSIONS_DIR: a no-op once built. A failed build only means the first DeepSpeed
# test builds it.
bash launch/setup.sh deepspeed
ds_pid=""
if [ ! -e "$TORCH_EXTENSIONS_DIR/.shm-comm-built" ]; then
  ( .venv/bin/python -c 'from deepspeed.accelerator import get_accelerator
b = get_accelerator().create_op_builder("ShareMemCommBuilder")
if b is not None:
    b.load()' && touch "$TORCH_EXTENSIONS_DIR/.shm-comm-built" ) >"$CNNSCALE_CACHE_DIR/deepspeed-op.log" 2>&1 &
  ds_pid=$!
fi
bash launch/setup.sh dev,deepspeed,tensorboard,mlflow,torchao  # the extras tests/test_trackers.py, test_compress.py use
if [ -n "$sys_pid" ]; then wait "$sys_pid" || true; cat "$ROOT/.cache/system-packages.log" >&2; fi
if [ -n "$ds_pid" ]; then wait "$ds_pid" || echo "[test] DeepSpeed's comm op did not build ahead (the first DeepSpeed test builds it): $(tail -1 "$CNNSCALE_CACHE_DIR/deepspeed-op.log")" >&2; fi
if [ "${CI:-}" = "true" ]; then export CNNSCALE_REQUIRE_SLURM=1; fi
if [ "$(id -u)" = 0 ] && [ -f slurm/local-cluster.sh ]; then
  bash slurm/local-cluster.sh start netns || { [ "${CNNSCALE_REQUIRE_SLURM:-0}" = 1 ] && exit 1; }
fi
.venv/bin/ruff check cnnscale tests launch
# Two pytest workers, a whole test file to each (module fixtures stay one per file): much of the suite waits on
# other processes (launches, SLURM, signals, timeouts) with a core idle; CNNSCALE_TEST_WORKERS=0 runs in one process.
# Every distributed test has a port of its own, so two files may launch at once.
workers="${CNNSCALE_TEST_WORKERS:-2}"
par=()
if [ "$workers" != 0 ]; then par=(-n "$workers" --dist loadfile); fi
exec .venv/bin/python -m pytest -q -ra --durations=15 "${par[@]}" "$@"
