#!/usr/bin/env bash
# The one-pass Gluon backwards at the head dims that still ran two passes, on an sm_90 machine, in one call
# of under ten minutes:
#
#   bash experiments/wide_bwd_gpu.sh OUT_DIR        # from the repo root
#
# (1) tests/test_gluon_gpu.py's wide-backward tests (kernels/gluon_bwd_wide.py, 128 < D <= 256, config key
# "gluon_wide": the 2x / 3x rule through the public call, three tile variants), the D <= 128 one-pass
# tests (kernels/gluon_bwd.py's "gluon_dkdvq", which now also takes 32 < D <= 64 with 32-column dQ halves)
# and the ring tests of tests/test_hopper_gpu.py, in three processes; (2) `python -m
# fa2lab.bench.hopper_bwd_gpu --plan wide` and `--plan fused64`: the candidates against the two passes and
# cuDNN through the public call. A candidate goes into hopper_config.BWD if it passes (1) and wins (2).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/results/wide-bwd-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
timeout 240 python -m pytest -q -m gpu tests/test_gluon_gpu.py -k "wide" -p no:cacheprovider \
    > "$OUT/tests-wide.log" 2>&1 &
timeout 240 python -m pytest -q -m gpu tests/test_gluon_gpu.py -k "one-pass" -p no:cacheprovider \
    > "$OUT/tests-one-pass.log" 2>&1 &
timeout 240 python -m pytest -q -m gpu tests/test_hopper_gpu.py -k "ring" -p no:cacheprovider \
    > "$OUT/tests-ring.log" 2>&1 &
wait
for f in "$OUT"/tests-*.log; do echo "$f: $(tail -1 "$f")"; grep -E "^FAILED|^E  " "$f" | head -6; done
for plan in wide fused64; do
    timeout "${BENCH_S:-150}" python -m fa2lab.bench.hopper_bwd_gpu --plan $plan --out "$OUT/$plan" \
        > "$OUT/bench-$plan.log" 2>&1
    echo "bench $plan rc=$?"
    grep -E " bwd |Error|^N=" "$OUT/bench-$plan.log" | grep -v "sdpa flash" | cut -c1-110 | tail -40
done
