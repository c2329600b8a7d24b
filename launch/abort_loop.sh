#!/usr/bin/env bash
# The abort-at-exit loop (issue 15.7): N short 2-process CPU runs (torchrun, gloo, lenet5, synthetic data, 2 steps),
# counting runs that exit non-zero and runs whose stderr holds "terminate called" (a joinable C++ thread torn down
# at interpreter exit). Prints the counts; keeps the stderr of every failed run under the log directory.
#
#   bash launch/abort_loop.sh [N=300] [PORT=31090] [LOGDIR=/tmp/cnnscale-abort-loop]
#   nice -n 19 bash launch/abort_loop.sh 300 31090 /tmp/abort > /tmp/abort.txt 2>&1 &
#
# The python is $PYTHON, else .venv/bin/python beside this script's repository, else python3. One run takes about
# 10 s on an idle 2-core box (most of it the torch import), so 300 runs take about an hour.
set -u
N=${1:-300}
PORT=${2:-31090}
LOGDIR=${3:-/tmp/cnnscale-abort-loop}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$LOGDIR"
export OMP_NUM_THREADS=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset ACCELERATE_USE_CPU

runs=0 nonzero=0 aborts=0
t0=$(date +%s)
for i in $(seq 1 "$N"); do
    out=$(mktemp -d "$LOGDIR/run-XXXXXX")
    "$PY" -m torch.distributed.run --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint "127.0.0.1:$PORT" -m cnnscale.train --model lenet5 --data synthetic --max-steps 2 \
        --micro-batch 8 --data.num_workers 0 --train.log_every 1 --train.progress none --out "$out/run" \
        >"$out/stdout" 2>"$out/stderr" </dev/null
    rc=$?
    runs=$((runs + 1))
    ws=$(grep -o '"world_size": [0-9]*' "$out/run/summary.json" 2>/dev/null | head -1 | grep -o '[0-9]*$')
    bad=0
    if [ "$rc" -ne 0 ] || [ "${ws:-0}" != 2 ]; then nonzero=$((nonzero + 1)); bad=1; fi
    if grep -q "terminate called" "$out/stderr" "$out/stdout"; then aborts=$((aborts + 1)); bad=1; fi
    if [ "$bad" -eq 1 ]; then
        echo "run $i: exit $rc, world_size ${ws:-none}, log kept in $out" >&2
        rm -rf "$out/run"
    else
        rm -rf "$out"
    fi
    if [ $((i % 10)) -eq 0 ] || [ "$i" -eq "$N" ]; then
        echo "after $runs runs ($(( $(date +%s) - t0 )) s): exit != 0 (or world size != 2): $nonzero;" \
             "'terminate called': $aborts"
    fi
done
echo "RESULT runs=$runs nonzero=$nonzero terminate_called=$aborts seconds=$(( $(date +%s) - t0 ))"
[ "$nonzero" -eq 0 ] && [ "$aborts" -eq 0 ]
