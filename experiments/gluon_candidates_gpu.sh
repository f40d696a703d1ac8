#!/usr/bin/env bash
# The Gluon forward's candidates that were compiled but not yet run on a GPU, in one command for an
# sm_90 machine (one H200 is enough; about 6-8 minutes):
#
#   bash experiments/gluon_candidates_gpu.sh [OUT_DIR]        # from the repo root
#
# (1) correctness: tests/test_gluon_gpu.py, every kernel variant (one partition, warp-specialised
# with 2 consumers, with 3 consumers at D <= 64) at every case, D=200/256 included; (2) kernel-level
# TFLOP/s of each candidate tile next to the Triton forward and cuDNN (`bench.gluon_gpu --configs`):
# D=256 (WS 128x64 2 stages, 128x32 3-4 stages), D=64 (3 consumers, 192x128, 2-3 stages). What to do
# with the result: a D=256 tile that passes (1) and beats the Triton forward in (2) goes into
# hopper_config.GLUON_TESTED and FWD_GLUON (with the figures in the comment); a 3-consumer D=64 tile
# that beats 2 consumers and Triton replaces GLUON_FWD[64] and 64 joins FWD_GLUON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/results/gluon-candidates-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
timeout 300 python -m pytest -q -m gpu tests/test_gluon_gpu.py -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests rc=$? ($(tail -1 "$OUT/tests.log"))"
grep -E "^FAILED" "$OUT/tests.log" | head -12
timeout 240 python -m fa2lab.bench.gluon_gpu --configs --out "$OUT" \
    --cases 4096:256:0,4096:256:1,16384:256:1,4096:64:0,4096:64:1,16384:64:1,1024:64:1 > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -E "^\||wrote" "$OUT/bench.log"
