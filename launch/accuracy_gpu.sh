#!/usr/bin/env bash
# Accuracy and time-to-accuracy of the seed's five models on one GPU, in under 8 minutes (a second, separate call
# beside launch/gpu_check.sh, for a machine that gives one command 10 minutes and keeps at most 8 files of its output).
#
#   bash launch/accuracy_gpu.sh [--archive PATH] [--out DIR] [--dry-run]
#
# The call on the lent GPU machine (its own python3, no pip; the archive carried inside the checkout):
#   run(command='bash launch/accuracy_gpu.sh --archive data/cifar10-jpeg.tar.gz --out "$OUT"',
#       carry=["data/cifar10-jpeg.tar.gz"], timeout_s=540)
#
# - Data: the CIFAR-10 JPEG archive (19 MB) travels with the code: --archive, else shared/data/ or ../shared/data/
#   (cifar10-jpeg.tar.gz). It is extracted into a temp dir and decoded once into the device loader's uint8 cache.
# - Schedules (short, labelled as such in the output): lenet5 runs its full recipe (configs/recipes/lenet5.yaml,
#   20 epochs, batch 64); alexnet, vgg16, resnet18 and mobilenet_v2 keep their recipe's optimiser, batch and lr but
#   train EPOCHS_BIG epochs (default 10) with 1 warm-up epoch and a cosine decay. All use --loader device and bf16
#   with channels_last on the GPU. Each model has a wall-clock cap (`timeout -k 10`), cut to what is left of the
#   overall deadline (ACCURACY_DEADLINE, default 450 s); a capped run reports how far it got, a model that no longer
#   fits is recorded as skipped.
# - Output ($OUT, else --out, else runs/accuracy), 4 files, rewritten after every model so a run cut short still
#   says what it measured: accuracy.json and accuracy.md (test accuracy, best val accuracy, wall time, and the first
#   time/step at which val accuracy reached the model's threshold; time_s counts from the start of the run, data
#   loading and model build included), steps.tsv, and results.tar.gz (runs/<model>/ with config, env, metrics and
#   summary, and each model's log; checkpoints left out). The work happens outside OUT, in a temp dir.
# - --dry-run: the same pipeline on CPU in a couple of minutes: 2 steps per model, batch 8, 64 val/test images,
#   fp32, the torch loader (synthetic data when no archive is found). It checks the script, not accuracy.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ARCHIVE="" OUTDIR="${OUT:-}" DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --archive) ARCHIVE="$2"; shift 2 ;;
    --out) OUTDIR="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "accuracy_gpu.sh: error: unknown argument $1 (valid: --archive PATH, --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
OUTDIR="${OUTDIR:-runs/accuracy}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
T_START=$SECONDS
DEADLINE="${ACCURACY_DEADLINE:-450}"
[ "$DRY" = 0 ] || DEADLINE="${ACCURACY_DEADLINE:-1500}"  # the CPU dry run checks the pipeline, on a slow box
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
EPOCHS_BIG="${EPOCHS_BIG:-10}"

if [ -z "$ARCHIVE" ]; then
  for cand in shared/data/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz; do
    if [ -f "$cand" ]; then ARCHIVE="$cand"; break; fi
  done
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
RES="$WORK/results"  # packed into OUT/results.tar.gz
mkdir -p "$RES/runs" "$RES/logs"
printf 'step\texit\tseconds\n' > "$OUTDIR/steps.tsv"
if [ -n "$ARCHIVE" ]; then
  [ -f "$ARCHIVE" ] || { echo "accuracy_gpu.sh: error: archive not found: $ARCHIVE" >&2; exit 2; }
  t0=$(date +%s)
  timeout -k 10 60 tar xzf "$ARCHIVE" -C "$WORK"
  DATA=(--data imagefolder --data-dir "$WORK/cifar10-jpeg")
  echo "data: $ARCHIVE extracted in $(( $(date +%s) - t0 )) s"
else
  [ "$DRY" = 1 ] || { echo "accuracy_gpu.sh: error: no data archive (pass --archive PATH)" >&2; exit 2; }
  DATA=(--data synthetic --data.synthetic_size 2000)
  echo "data: synthetic (dry run, no archive found)"
fi

# model | recipe overrides | threshold (val acc) | wall-clock cap (s)
MODELS=(
  "lenet5||0.55|60"
  "alexnet|--epochs $EPOCHS_BIG --sched.name cosine --sched.warmup_epochs 1|0.70|70"
  "vgg16|--epochs $EPOCHS_BIG --sched.name cosine --sched.warmup_epochs 1|0.85|80"
  "resnet18|--epochs $EPOCHS_BIG --sched.warmup_epochs 1|0.85|100"
  "mobilenet_v2|--epochs $EPOCHS_BIG --sched.warmup_epochs 1|0.85|100"
)
if [ "$DRY" = 1 ]; then
  COMMON=(--max-steps 2 --micro-batch 8 --data.val_size 64 --data.limit_test 64 --data.num_workers 0
          --loader torch --profile.enabled false)
else
  COMMON=(--loader device --mixed-precision bf16 --fast.channels_last true)
  t0=$(date +%s)  # decode the JPEGs once into the device loader's cache, outside every run's timing
  rc=0
  timeout -k 10 120 "$PYTHON" launch/gpu_check.py decode "$WORK/cifar10-jpeg" || rc=$?
  printf 'decode\t%s\t%s\n' "$rc" "$(( $(date +%s) - t0 ))" >> "$OUTDIR/steps.tsv"
  echo "data: decoded into the device cache in $(( $(date +%s) - t0 )) s (exit $rc)"
fi

cat > "$WORK/summary.py" <<'EOF'
import json, socket, sys
from pathlib import Path

res, out, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
rows = []
for model in ("lenet5", "alexnet", "vgg16", "resnet18", "mobilenet_v2"):
    d = res / "runs" / model
    summ = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
    mets = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (d / "metrics.jsonl").is_file() else []
    tfile = res / "runs" / f"{model}.threshold"
    thresh = float(tfile.read_text()) if tfile.is_file() else None
    vals = [m for m in mets if "val_acc" in m]
    hit = next((m for m in vals if thresh is not None and m["val_acc"] >= thresh), None)
    cfile = res / "runs" / f"{model}.command"
    status = summ.get("status", "missing" if cfile.is_file() else "skipped" if tfile.is_file() else "not run yet")
    rows.append({"model": model, "status": "timeout" if status == "running" else status,
                 "test_acc": summ.get("test_acc"), "best_val_acc": max((m["val_acc"] for m in vals), default=None),
                 "epochs_done": summ.get("epochs_done", max((m.get("epoch", 0) for m in mets), default=0)),
                 "steps": summ.get("steps"), "wall_s": summ.get("wall_s"), "img_per_s": summ.get("img_per_s"),
                 "threshold": thresh, "time_to_threshold_s": hit and hit["time_s"],
                 "step_to_threshold": hit and hit["step"],
                 "command": cfile.read_text().strip() if cfile.is_file() else None})
env = {}
for r in rows:
    p = res / "runs" / r["model"] / "env.json"
    if p.is_file():
        env = json.loads(p.read_text())
        break
record = {"dry_run": dry, "host": socket.gethostname(), "device_name": env.get("device_name"),
          "torch": (env.get("versions") or {}).get("torch"), "runs": rows}
(out / "accuracy.json").write_text(json.dumps(record, indent=2) + "\n")
fmt = lambda v, p=4: "n/a" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
lines = ["| model | status | epochs | test acc | best val acc | threshold | time to threshold (s) | wall (s) |",
         "|---|---|---|---|---|---|---|---|"]
lines += [f"| {r['model']} | {r['status']} | {r['epochs_done']} | {fmt(r['test_acc'])} | {fmt(r['best_val_acc'])} | "
          f"{fmt(r['threshold'], 2)} | {fmt(r['time_to_threshold_s'], 1)} | {fmt(r['wall_s'], 1)} |" for r in rows]
(out / "accuracy.md").write_text("\n".join(lines) + "\n")
EOF

publish() {  # accuracy.json, accuracy.md and the archive, after every model
  "$PYTHON" - "$RES" "$OUTDIR" "$DRY" < "$WORK/summary.py"
  tar czf "$OUTDIR/results.tar.gz.tmp" -C "$WORK" --exclude='checkpoints' results \
    && mv "$OUTDIR/results.tar.gz.tmp" "$OUTDIR/results.tar.gz"
}

for row in "${MODELS[@]}"; do
  IFS='|' read -r model extra thresh cap <<< "$row"
  [ "$DRY" = 1 ] && { extra=""; cap=300; }
  left=$(( DEADLINE - (SECONDS - T_START) ))
  [ "$cap" -lt "$left" ] || cap=$left
  run_dir="$RES/runs/$model"
  printf '%s\n' "$thresh" > "$run_dir.threshold"
  if [ "$cap" -lt 10 ]; then
    echo "== $model: skipped (deadline: ${left}s left)"
    printf '%s\tskipped\t0\n' "$model" >> "$OUTDIR/steps.tsv"
    continue
  fi
  # shellcheck disable=SC2086  # $extra is a list of flags
  cmd=("$PYTHON" launch/train.py --config "configs/recipes/$model.yaml" "${DATA[@]}" "${COMMON[@]}" $extra
       --out "$run_dir" --train.progress plain)
  echo "== $model (cap ${cap}s, threshold $thresh): ${cmd[*]}"
  printf '%s\n' "${cmd[*]}" > "$run_dir.command"
  t0=$(date +%s)
  rc=0
  timeout --kill-after=10 "$cap" "${cmd[@]}" > "$RES/logs/$model.log" 2>&1 || rc=$?
  echo "$model: exit $rc after $(( $(date +%s) - t0 )) s"
  printf '%s\t%s\t%s\n' "$model" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUTDIR/steps.tsv"
  tail -n 3 "$RES/logs/$model.log"
  rm -rf "$run_dir/checkpoints"
  publish > /dev/null
done

publish
cat "$OUTDIR/accuracy.md"
echo "accuracy_gpu.sh: $(( SECONDS - T_START )) s in all; $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
