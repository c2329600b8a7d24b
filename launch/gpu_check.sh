#!/usr/bin/env bash
# One GPU check for one H100/H200, in under 7 minutes, for a machine that gives one command 10 minutes and keeps at
# most 8 files of its output folder.
#
#   bash launch/gpu_check.sh ARCHIVE [OUT]              ARCHIVE: cifar10-jpeg.tar.gz (ImageFolder layout, 19 MB);
#                                                       OUT: default $OUT, else runs/gpu_check
#   bash launch/gpu_check.sh --dry-run ARCHIVE OUT      the same steps, tiny, on CPU (CI runs this; also
#                                                       GPU_CHECK_DRY_RUN=1)
#
# The call on the lent GPU machine (its own python3 with torch, no pip, nothing downloaded; the archive travels as a
# carried path inside the checkout, e.g. the git-ignored data/):
#   mkdir -p data && cp ../shared/data/cifar10-jpeg.tar.gz data/      # here, once
#   run(command='bash launch/gpu_check.sh data/cifar10-jpeg.tar.gz "$OUT"', carry=["data/cifar10-jpeg.tar.gz"],
#       timeout_s=480)
#
# OUT receives 4 files: summary.txt (the table printed on stdout), gpu_check.json, steps.tsv and results.tar.gz (every
# log, bench JSON, run directory and the report, checkpoints left out). All four are rewritten after every step, so a
# run cut short still says what it measured. The work itself happens outside OUT (GPU_CHECK_WORK, else a temp dir).
#
# Time: an overall deadline (GPU_CHECK_DEADLINE, default 390 s of steps; packing and the summary take ~5 s more), and
# every step runs under `timeout -k 10` with the smaller of its own cap and the time left. A step that no longer
# fits is recorded as skipped; a step that fails is recorded and the rest still run. Steps, most valuable first:
#   env       versions, nvidia-smi                      nvml      the NVML sampler under a matmul load
#   data      unpack ARCHIVE and decode the JPEGs once into the device loader's uint8 cache (every run reuses it)
#   train_*   resnet18 (its recipe) on the real images, device-resident loader, no final evaluation:
#             baseline bf16 (100 steps), fast bf16 = channels_last + torch.compile (400 steps), fp16 channels_last
#             (200 steps: the GradScaler path, 1 host sync per step) -> img/s and MFU in steady state
#   bench_*   `cnnscale bench` of the seed models in bf16: plain, channels_last; channels_last + compile for lenet5
#             and resnet18 only (compiling the others would not fit)
#   report    `cnnscale report` over the runs
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
T_START=$SECONDS

DRY="${GPU_CHECK_DRY_RUN:-0}"
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
ARCHIVE="${1:-}"
DEST="${2:-${OUT:-runs/gpu_check}}"
if [ -z "$ARCHIVE" ] || [ ! -f "$ARCHIVE" ]; then
  echo "gpu_check.sh: error: give the CIFAR-10 archive: bash launch/gpu_check.sh [--dry-run] ARCHIVE [OUT] (got '${ARCHIVE}')" >&2
  exit 2
fi
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/cnnscale-gpu-check.XXXXXX)}"
RES="$WORK/results"  # packed into OUT/results.tar.gz
mkdir -p "$RES"/{logs,bench,runs} "$WORK/data"
DEADLINE="${GPU_CHECK_DEADLINE:-390}"
if [ "$DRY" = 1 ]; then
  # Tiny, on CPU: the same commands on a few images with LeNet-5 (and ResNet-18 in bench); torch.compile only in
  # the LeNet bench (inductor's C++ build is slow on a CPU box; tests/test_fastpath.py compiles train.py's path).
  export CUDA_VISIBLE_DEVICES=""
  MODEL=lenet5; MODELS="lenet5,resnet18"; COMPILE_MODELS="lenet5"; BENCH=(--steps 1 --warmup 1 --micro-batch 4)
  TRAIN=(--micro-batch 8 --data.val_size 20 --train.log_every 1); BASE_STEPS=2; FAST_STEPS=3; FP16_STEPS=0
  FAST_COMPILE=false; NVML=(--dry-run); SUMMARY=(--dry-run); CAP=240
  DEADLINE="${GPU_CHECK_DEADLINE:-850}"  # a shared 2-core box is slow; the deadline logic is the same
else
  MODEL=resnet18; MODELS="lenet5,alexnet,vgg16,resnet18,mobilenet_v2"; COMPILE_MODELS="lenet5,resnet18"
  BENCH=(--steps 20 --warmup 3 --micro-batch 512); TRAIN=(--micro-batch 512 --train.log_every 50)
  BASE_STEPS=100; FAST_STEPS=400; FP16_STEPS=200; FAST_COMPILE=true; NVML=(); SUMMARY=(); CAP=150
fi

publish() {  # the summary, the table on stdout once at the end, and the archive: rewritten after every step
  "$PY" launch/gpu_check.py summary "$RES" --write "$DEST" --goal-model "$MODEL" "${SUMMARY[@]}" "$@"
  local rc=$?
  tar czf "$DEST/results.tar.gz.tmp" -C "$WORK" --exclude='checkpoints' --exclude='*.pt' results \
    && mv "$DEST/results.tar.gz.tmp" "$DEST/results.tar.gz"
  return "$rc"
}

FAILED=()
step() {  # step NAME CAP CMD...: under the deadline, with `timeout -k`; logs/NAME.log; a steps.tsv row
  local name="$1" cap="$2"; shift 2
  local left=$(( DEADLINE - (SECONDS - T_START) )) t0=$SECONDS rc
  [ "$cap" -lt "$left" ] || cap=$left
  if [ "$cap" -lt 5 ]; then
    printf '%s\tskipped\t0\n' "$name" >> "$DEST/steps.tsv"
    echo "[gpu_check] $name: skipped (deadline: ${left}s left)"
    return 124
  fi
  echo "[gpu_check] $name (at most ${cap}s): $*"
  timeout -k 10 "$cap" "$@" > "$RES/logs/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" >> "$DEST/steps.tsv"
  echo "[gpu_check] $name: exit $rc in $(( SECONDS - t0 )) s"
  if [ "$rc" -ne 0 ]; then FAILED+=("$name"); tail -n 5 "$RES/logs/$name.log"; fi
  publish --quiet > /dev/null 2>&1
  return "$rc"
}

printf 'step\texit\tseconds\n' > "$DEST/steps.tsv"
step env 60 bash -c "$PY -c 'import torch, torchvision, accelerate, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(\"torchvision\", torchvision.__version__, \"accelerate\", accelerate.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\")'; nvidia-smi || true"
step nvml 60 "$PY" launch/gpu_check.py nvml --out "$RES/nvml_check.json" "${NVML[@]}"

DATA=""
if step data 120 bash -c "tar xzf '$ARCHIVE' -C '$WORK/data' && d=\$('$PY' launch/gpu_check.py find-data '$WORK/data') \
    && echo \"\$d\" > '$WORK/data_root' && '$PY' launch/gpu_check.py decode \"\$d\""; then
  DATA="$(cat "$WORK/data_root")"
fi
common=(--config "configs/recipes/$MODEL.yaml" --data imagefolder --data-dir "$DATA" --loader device
        --train.progress plain --train.eval_every_epoch false --train.final_eval false "${TRAIN[@]}")
if [ -n "$DATA" ]; then
  step train_baseline "$CAP" "$PY" launch/train.py "${common[@]}" --mixed-precision bf16 --max-steps "$BASE_STEPS" \
    --out "$RES/runs/$MODEL-baseline"
  step train_fast "$CAP" "$PY" launch/train.py "${common[@]}" --mixed-precision bf16 --max-steps "$FAST_STEPS" \
    --fast.channels_last true --fast.compile "$FAST_COMPILE" --out "$RES/runs/$MODEL-fast"
  if [ "$FP16_STEPS" -gt 0 ]; then  # Accelerate refuses fp16 on CPU: GPU only
    step train_fp16 "$CAP" "$PY" launch/train.py "${common[@]}" --mixed-precision fp16 --max-steps "$FP16_STEPS" \
      --fast.channels_last true --out "$RES/runs/$MODEL-fp16"
  fi
fi

bench() { local name="$1" models="$2"; shift 2
  step "bench_$name" "$CAP" "$PY" -m cnnscale bench --models "$models" --mixed-precision bf16 --ratios none \
    "${BENCH[@]}" --json "$RES/bench/$name.json" "$@"
}
bench bf16 "$MODELS"
bench bf16_channels_last "$MODELS" --channels-last
bench bf16_channels_last_compile "$COMPILE_MODELS" --channels-last --compile

step report 60 "$PY" -m cnnscale report "$RES/runs" --width 160 --csv "$RES/report.csv" --html "$RES/report.html"
cp "$RES/logs/report.log" "$RES/report.txt" 2>/dev/null
publish
rc=$?
echo "[gpu_check] $(( SECONDS - T_START )) s in all; $DEST: $(ls "$DEST" | tr '\n' ' ')"
[ -z "${GPU_CHECK_WORK:-}" ] && rm -rf "$WORK"
if [ "${#FAILED[@]}" -gt 0 ]; then echo "[gpu_check] failed steps: ${FAILED[*]}"; exit 1; fi
exit "$rc"
