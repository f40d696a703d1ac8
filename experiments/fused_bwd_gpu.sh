#!/usr/bin/env bash
# The one-pass Gluon backward (kernels/gluon_bwd.py with DQ: dK, dV and dQ's fp32 sums in one kernel,
# config key "gluon_dkdvq") on an sm_90 machine, in one call of under ten minutes:
#
#   bash experiments/fused_bwd_gpu.sh OUT_DIR        # from the repo root
#
# (1) tests/test_gluon_gpu.py's backward tests (the 2x / 3x rule through the public call) for the one
# pass and the Gluon dK/dV kernel it extends, in two processes; (2) `python -m fa2lab.bench.hopper_bwd_gpu
# --plan fused`: the one pass (TMA reduce-adds at 2 and 3 stages, atomics) against the committed D=128 backward (Gluon dK/dV + the
# two-pass dQ) and cuDNN, through the public call at issue 15's D=128 shapes. The one pass goes into
# hopper_config.BWD[128] if it passes (1) and wins (2).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/results/fused-bwd-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
timeout 240 python -m pytest -q -m gpu tests/test_gluon_gpu.py -k "dkdv and one-pass" -p no:cacheprovider \
    > "$OUT/tests-one-pass.log" 2>&1 &
timeout 240 python -m pytest -q -m gpu tests/test_gluon_gpu.py -k "dkdv and not one-pass" -p no:cacheprovider \
    > "$OUT/tests-dkdv.log" 2>&1 &
wait
for f in "$OUT"/tests-*.log; do echo "$f: $(tail -1 "$f")"; grep -E "^FAILED|Error" "$f" | head -8; done
timeout "${BENCH_S:-300}" python -m fa2lab.bench.hopper_bwd_gpu --plan fused --out "$OUT" > "$OUT/bench-fused.log" 2>&1
echo "bench rc=$?"
grep -vE "^warm" "$OUT/bench-fused.log" | tail -32
