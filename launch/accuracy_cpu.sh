#!/usr/bin/env bash
# The CPU accuracy and compression runs behind the README's results table, in the order they were made.
#
#   bash launch/accuracy_cpu.sh [RUNS_DIR] [DATA_ARCHIVE]      (defaults: runs/cpu, ../shared/data/cifar10-jpeg.tar.gz)
#
# Data: the CIFAR-10 images as JPEG (quality 75, 4:2:0), about 1-2 points below the original pixels; see
# ../shared/data/README.md. One process, OMP_NUM_THREADS=1: on a shared 2-core machine, 2 intra-op threads spin
# against other jobs and ran LeNet-5 about 10x slower than 1 thread did.
# Time: LeNet-5's 20 epochs take ~4 min on an idle 2-core CPU (~5,000 img/s) and took ~50 min on the shared one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUNS="${1:-runs/cpu}"
ARCHIVE="${2:-../shared/data/cifar10-jpeg.tar.gz}"
PY="${PYTHON:-.venv/bin/python}"
DATA_ROOT="${DATA_ROOT:-/tmp/cifar}"
export OMP_NUM_THREADS=1 PYTHONPATH="$ROOT"
mkdir -p "$RUNS" "$DATA_ROOT"
[ -d "$DATA_ROOT/cifar10-jpeg" ] || tar xzf "$ARCHIVE" -C "$DATA_ROOT"
DATA=(--data imagefolder --data-dir "$DATA_ROOT/cifar10-jpeg" --data.num_workers 1)

# 1. LeNet-5, the seed's recipe (SGD 0.01 m0.9, StepLR(10 epochs, x0.5), 20 epochs, batch 64), 45k train / 5k val.
"$PY" launch/train.py --config configs/recipes/lenet5.yaml "${DATA[@]}" --out "$RUNS/lenet5_recipe" \
  --train.progress plain

# 2. Pruning the trained LeNet-5: global L1 over conv + linear weights, 50% and 80%, without and with 1 epoch of
#    fine-tuning (lr 0.001).
for pair in 0.5:50 0.8:80; do
  amount="${pair%%:*}" pct="${pair##*:}"
  "$PY" -m cnnscale prune "$RUNS/lenet5_recipe" --amount "$amount" --include-linear \
    --out "$RUNS/lenet5_prune$pct"
  "$PY" -m cnnscale prune "$RUNS/lenet5_recipe" --amount "$amount" --include-linear --finetune-epochs 1 \
    --lr 0.001 --out "$RUNS/lenet5_prune${pct}_ft1" --train.progress plain
done

# 3. Quantisation: the trained LeNet-5 (accuracy on the 10k test images) and an untrained ResNet-18 (size, latency).
"$PY" -m cnnscale quantize "$RUNS/lenet5_recipe" --batch 64 --repeats 20 --threads 1 --out "$RUNS/lenet5_int8"
"$PY" -m cnnscale quantize --model resnet18 --batch 64 --repeats 5 --calib-batches 4 --threads 1 \
  --out "$RUNS/resnet18_int8"

# 4. Distillation: LeNet-5 student, 2 epochs of the LeNet-5 recipe, taught by the 20-epoch LeNet-5 (T=4, alpha=0.9),
#    and the same 2 epochs without a teacher (same seed, init and data order) as the baseline.
"$PY" launch/train.py --config configs/recipes/lenet5.yaml --epochs 2 "${DATA[@]}" --out "$RUNS/lenet5_2ep_baseline" \
  --train.progress plain
"$PY" -m cnnscale distill --teacher "$RUNS/lenet5_recipe" --temperature 4 --alpha 0.9 \
  --config configs/recipes/lenet5.yaml --epochs 2 "${DATA[@]}" --out "$RUNS/lenet5_distill_T4" --train.progress plain
