#!/usr/bin/env bash
# One GPU check for one H100/H200, in under 8 minutes; every result goes into one folder.
#
#   bash launch/gpu_check.sh ARCHIVE [OUT]              ARCHIVE: cifar10-jpeg.tar.gz (ImageFolder layout, 19 MB);
#                                                       OUT: default $OUT, else runs/gpu_check
#   bash launch/gpu_check.sh --dry-run ARCHIVE OUT      the same steps, tiny, on CPU (CI runs this; also
#                                                       GPU_CHECK_DRY_RUN=1)
#
# Steps, most valuable first (a step that fails is recorded and the rest still run):
#   1. env        versions, nvidia-smi
#   2. nvml       the NVML sampler reads real utilisation and memory under a matmul load
#   3. data       unpack ARCHIVE (outside OUT) and find its train/ and test/
#   4. train      resnet18 (its recipe) on the real images, device-resident loader, bf16: a short baseline (no
#                 channels_last, no compile), then the fast path (channels_last + torch.compile) for 400 steps
#                 -> img/s and MFU, steady state (log windows after the first, which holds compilation)
#   5. bench      `cnnscale bench` for all seed models in bf16: plain, channels_last, channels_last + compile
#   6. report     `cnnscale report` over the runs; gpu_check.py summary prints the goal beside what was measured
# Needs only what the GPU machine has (torch, torchvision, accelerate, nvidia-ml-py, rich, matplotlib, psutil, pyyaml):
# the project runs from the checkout with PYTHONPATH, nothing is installed, nothing is downloaded.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY="${GPU_CHECK_DRY_RUN:-0}"
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
ARCHIVE="${1:-}"
DEST="${2:-${OUT:-runs/gpu_check}}"
if [ -z "$ARCHIVE" ] || [ ! -f "$ARCHIVE" ]; then
  echo "gpu_check.sh: error: give the CIFAR-10 archive: bash launch/gpu_check.sh [--dry-run] ARCHIVE [OUT] (got '${ARCHIVE}')" >&2
  exit 2
fi
mkdir -p "$DEST"/{logs,bench,runs}
DEST="$(cd "$DEST" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/cnnscale-gpu-check.XXXXXX)}"
STEP_TIMEOUT="${GPU_CHECK_STEP_TIMEOUT:-300}"
if [ "$DRY" = 1 ]; then
  # Tiny, on CPU: the same commands on a few images with LeNet-5 (and ResNet-18 in bench); torch.compile only in
  # the LeNet bench (inductor's C++ build is slow on a CPU box; tests/test_fastpath.py compiles train.py's path).
  export CUDA_VISIBLE_DEVICES=""
  MODEL=lenet5; MODELS="lenet5,resnet18"; COMPILE_MODELS="lenet5"; BENCH=(--steps 1 --warmup 1 --micro-batch 4)
  TRAIN=(--micro-batch 8 --data.val_size 20 --train.log_every 1); BASE_STEPS=2; FAST_STEPS=3; FAST_COMPILE=false
  NVML=(--dry-run); SUMMARY=(--dry-run)
else
  MODEL=resnet18; MODELS="lenet5,alexnet,vgg16,resnet18,mobilenet_v2"
  COMPILE_MODELS="${GPU_CHECK_COMPILE_MODELS:-$MODELS}"; BENCH=(--steps 30 --warmup 5 --micro-batch 512)
  TRAIN=(--micro-batch 512 --train.log_every 50); BASE_STEPS=100; FAST_STEPS=400; FAST_COMPILE=true
  NVML=(); SUMMARY=()
fi

FAILED=()
step() {  # step NAME CMD...: run with a timeout, log to logs/NAME.log, record rc and seconds in steps.tsv
  local name="$1"; shift
  local t0=$SECONDS rc
  echo "[gpu_check] $name: $*"
  timeout "$STEP_TIMEOUT" "$@" > "$DEST/logs/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" >> "$DEST/steps.tsv"
  echo "[gpu_check] $name: exit $rc in $(( SECONDS - t0 )) s"
  if [ "$rc" -ne 0 ]; then FAILED+=("$name"); tail -n 5 "$DEST/logs/$name.log"; fi
  return "$rc"
}

printf 'step\texit\tseconds\n' > "$DEST/steps.tsv"
step env bash -c "$PY -c 'import torch, torchvision, accelerate, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(\"torchvision\", torchvision.__version__, \"accelerate\", accelerate.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\")'; nvidia-smi || true"
step nvml "$PY" launch/gpu_check.py nvml --out "$DEST/nvml_check.json" "${NVML[@]}"

DATA=""
if step data tar xzf "$ARCHIVE" -C "$WORK"; then
  DATA="$("$PY" launch/gpu_check.py find-data "$WORK")" || { FAILED+=("find-data"); DATA=""; }
fi
common=(--config "configs/recipes/$MODEL.yaml" --data imagefolder --data-dir "$DATA" --loader device
        --mixed-precision bf16 --train.progress plain --train.eval_every_epoch false "${TRAIN[@]}")
if [ -n "$DATA" ]; then
  step train_baseline "$PY" launch/train.py "${common[@]}" --max-steps "$BASE_STEPS" --out "$DEST/runs/$MODEL-baseline"
  step train_fast "$PY" launch/train.py "${common[@]}" --max-steps "$FAST_STEPS" --fast.channels_last true \
    --fast.compile "$FAST_COMPILE" --out "$DEST/runs/$MODEL-fast"
fi

bench() { local name="$1" models="$2"; shift 2
  step "bench_$name" "$PY" -m cnnscale bench --models "$models" --mixed-precision bf16 --ratios none "${BENCH[@]}" \
    --json "$DEST/bench/$name.json" "$@"
}
bench bf16 "$MODELS"
bench bf16_channels_last "$MODELS" --channels-last
bench bf16_channels_last_compile "$COMPILE_MODELS" --channels-last --compile

step report "$PY" -m cnnscale report "$DEST/runs" --width 160 --csv "$DEST/report.csv" --html "$DEST/report.html"
cp "$DEST/logs/report.log" "$DEST/report.txt" 2>/dev/null
"$PY" launch/gpu_check.py summary "$DEST" --goal-model "$MODEL" "${SUMMARY[@]}" | tee "$DEST/summary.txt"
rc=${PIPESTATUS[0]}
[ -z "${GPU_CHECK_WORK:-}" ] && rm -rf "$WORK"
if [ "${#FAILED[@]}" -gt 0 ]; then echo "[gpu_check] failed steps: ${FAILED[*]}"; exit 1; fi
exit "$rc"
