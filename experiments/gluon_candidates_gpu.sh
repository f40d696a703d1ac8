#!/usr/bin/env bash
# The Gluon kernels' candidates that were compiled but not yet run on a GPU, for an sm_90 machine
# (one H200 is enough), in two calls of under ten minutes each:
#
#   bash experiments/gluon_candidates_gpu.sh OUT_DIR fwd     # from the repo root
#   bash experiments/gluon_candidates_gpu.sh OUT_DIR bwd
#
# fwd: (1) tests/test_gluon_gpu.py's forward tests, every kernel variant (one partition, warp-
# specialised with 2 consumers, with 3 consumers at D <= 64) at every case, D=200/256 included;
# (2) kernel-level TFLOP/s of each candidate tile next to the Triton forward and cuDNN
# (`bench.gluon_gpu --configs`): D=256 (WS 128x64 2 stages, 128x32 3-4 stages), D=64 (3 consumers,
# 192x128, 2-3 stages). A D=256 tile that passes (1) and beats the Triton forward in (2) goes into
# hopper_config.GLUON_TESTED and FWD_GLUON (figures in the comment); a 3-consumer D=64 tile that
# beats 2 consumers and Triton replaces GLUON_FWD[64], and 64 joins FWD_GLUON.
# bwd: (3) the Gluon dK/dV kernel's gradient tests (public call, 3x rule); (4) `bench.hopper_bwd_gpu
# --plan gluon`: the backward through the public call with "gluon_dkdv" tiles against the two
# passes, SDPA flash and cuDNN. A tile that passes (3) and wins (4) goes into hopper_config.BWD.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/results/gluon-candidates-$(date -u +%Y%m%d-%H%M%S)}
PART=${2:-fwd}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
if [ "$PART" = fwd ]; then
    timeout 280 python -m pytest -q -m gpu tests/test_gluon_gpu.py -k "not dkdv" -p no:cacheprovider > "$OUT/tests-fwd.log" 2>&1
    echo "forward tests rc=$? ($(tail -1 "$OUT/tests-fwd.log"))"
    grep -E "^FAILED" "$OUT/tests-fwd.log" | head -12
    timeout 260 python -m fa2lab.bench.gluon_gpu --configs --out "$OUT" \
        --cases 4096:256:0,4096:256:1,16384:256:1,4096:64:0,4096:64:1,16384:64:1,1024:64:1 > "$OUT/bench-fwd.log" 2>&1
    echo "forward bench rc=$?"
    grep -E "^\||wrote" "$OUT/bench-fwd.log"
else
    timeout 240 python -m pytest -q -m gpu tests/test_gluon_gpu.py -k dkdv -p no:cacheprovider > "$OUT/tests-bwd.log" 2>&1
    echo "dK/dV tests rc=$? ($(tail -1 "$OUT/tests-bwd.log"))"
    grep -E "^FAILED|^E  .*error" "$OUT/tests-bwd.log" | head -12
    timeout 300 python -m fa2lab.bench.hopper_bwd_gpu --plan gluon --out "$OUT" --workers 8 > "$OUT/bench-bwd.log" 2>&1
    echo "backward bench rc=$?"
    tail -24 "$OUT/bench-bwd.log"
fi
