#!/usr/bin/env bash
# The one-pass Gluon backward for 128 < D <= 256 (kernels/gluon_bwd_wide.py, config key "gluon_wide") on an
# sm_90 machine, in one call of under ten minutes:
#
#   bash experiments/wide_bwd_gpu.sh OUT_DIR        # from the repo root
#
# (1) tests/test_gluon_gpu.py's wide-backward tests (the 2x / 3x rule through the public call, three tile
# variants) beside the Hopper path's full-size tests and the D <= 128 Gluon backward tests (the one pass
# is the default there since 2026-12-04), in three processes; (2) `python -m fa2lab.bench.hopper_bwd_gpu
# --plan wide`: the wide kernel's variants against the two passes (the Triton dv + dk + dq split) and cuDNN,
# through the public call. A variant goes into hopper_config.BWD[256] if it passes (1) and wins (2).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/results/wide-bwd-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
timeout 270 python -m pytest -q -m gpu tests/test_gluon_gpu.py -k "wide" -p no:cacheprovider -x \
    > "$OUT/tests-wide.log" 2>&1 &
timeout 270 python -m pytest -q -m gpu tests/test_hopper_gpu.py -p no:cacheprovider > "$OUT/tests-hopper.log" 2>&1 &
timeout 270 python -m pytest -q -m gpu tests/test_gluon_gpu.py -k "dkdv or public_call" -p no:cacheprovider \
    > "$OUT/tests-gluon-bwd.log" 2>&1 &
wait
for f in "$OUT"/tests-*.log; do echo "$f: $(tail -1 "$f")"; grep -E "^FAILED|^E  " "$f" | head -6; done
timeout "${BENCH_S:-270}" python -m fa2lab.bench.hopper_bwd_gpu --plan wide --out "$OUT" > "$OUT/bench-wide.log" 2>&1
echo "bench rc=$?"
grep -vE "^warm" "$OUT/bench-wide.log" | tail -30
