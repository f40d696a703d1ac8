#!/usr/bin/env bash
# Issue 19's multi-GPU measurements in one command, for a machine with W >= 2 GPUs (NCCL):
#
#   bash experiments/multigpu_ring.sh [OUT_DIR]          # on the GPU host, from the repo root
#   DRY=1 bash experiments/multigpu_ring.sh /tmp/dry     # the same steps on this CPU (gloo, tiny sizes)
#
# For each W in 2, 4, 8 that the machine has: (1) exactness of ring attention against float64 next
# to one device's error (bench.ring_check), (2) bytes per local token against one GPU
# (bench.ring_memory, capacity projected), (3) time at N = 128k, causal and full, ring as shipped,
# zig-zag input and Ulysses against one GPU (bench.ring, efficiency = speedup / W; targets causal >=
# 0.85, full >= 0.90). Each step has its own time limit so a slow one does not take the others with
# it; logs and JSON rows go to OUT_DIR (default experiments/results/multigpu-<time>); the last lines
# printed are the summaries. The single-GPU figures these are compared with: BENCHMARKS.md, ring section.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/results/multigpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
PY=${PY:-python}
if [ "${DRY:-0}" = 1 ]; then
    DEV=cpu; GPUS=${DRY_RANKS:-2}; N=1024; CHECK_N=256; SHAPE=(--heads 8 --heads-kv 4 --head-dim 32)
    MEM=(--lengths 512 1024 "${SHAPE[@]}")
    DTYPE=float32; REPEATS=1; LIMIT=300
else
    DEV=cuda; GPUS=$($PY -c "import torch; print(torch.cuda.device_count())"); N=131072; CHECK_N=8192; MEM=()
    SHAPE=(--heads 32 --heads-kv 8 --head-dim 128); DTYPE=bfloat16; REPEATS=3; LIMIT=${LIMIT:-500}
fi
echo "device $DEV, $GPUS ranks available, out $OUT" | tee "$OUT/summary.txt"
for W in 2 4 8; do
    [ "$W" -le "$GPUS" ] || continue
    timeout "$LIMIT" $PY -m fa2lab.bench.ring_check --device $DEV --world $W --n $CHECK_N > "$OUT/check-w$W.log" 2>&1
    echo "W=$W ring_check rc=$?: $(tail -3 "$OUT/check-w$W.log" | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
    timeout "$LIMIT" $PY -m fa2lab.bench.ring_memory --device $DEV --world $W "${MEM[@]}" --out "$OUT" > "$OUT/memory-w$W.log" 2>&1
    echo "W=$W ring_memory rc=$?:" | tee -a "$OUT/summary.txt"; tail -6 "$OUT/memory-w$W.log" | tee -a "$OUT/summary.txt"
done
WORLDS=$(for W in 2 4 8; do [ "$W" -le "$GPUS" ] && echo -n "$W "; done)
if [ -n "$WORLDS" ]; then
    # shellcheck disable=SC2086  # WORLDS is a list of numbers
    timeout "$LIMIT" $PY -m fa2lab.bench.ring --device $DEV --dtype $DTYPE --world $WORLDS --lengths $N \
        "${SHAPE[@]}" --kinds overlap zigzag-in ulysses --repeats $REPEATS --out "$OUT/ring-time.json" > "$OUT/ring-time.log" 2>&1
    echo "ring time rc=$?:" | tee -a "$OUT/summary.txt"; tail -12 "$OUT/ring-time.log" | tee -a "$OUT/summary.txt"
fi
