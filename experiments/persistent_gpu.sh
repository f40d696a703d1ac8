#!/usr/bin/env bash
# The persistent warp-specialised Gluon forward (kernels/gluon_fwd.py, config PERSISTENT=True) on an
# sm_90 machine, in one call of under ten minutes:
#
#   bash experiments/persistent_gpu.sh OUT_DIR [kernel|public]     # from the repo root
#
# (1) tests/test_gluon_gpu.py's forward tests for the persistent variants (two query buffers, one,
# three consumers), the warp-specialised kernel they would replace (its loop now shared with them:
# _consume_tile), strided inputs and broadcast heads; (2) kernel-level TFLOP/s of the table's tile
# against the persistent candidates at issue 15's twelve shapes (`bench.gluon_gpu --configs`), next
# to the Triton forward and cuDNN. A persistent tile that passes (1) and wins (2) at a head dim goes
# into hopper_config.GLUON_FWD (D=64 also into FWD_GLUON if it beats the Triton forward).
# public (after the defaults changed): (3) the Hopper path's full-size tests through the public call
# (forward and gradients: the backward reads the new forward's LSE) and the Gluon public-call tests
# (OPS=1 adds the GPU tests of the custom ops, compile and CUDA graphs); (4) kernel-level rows at the
# shapes (1) left out (CASES=N:D:causal[:hq:hkv],... for others); (5) issue 15's table through the
# public call (`fa2lab.bench.gpu --hopper`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/results/persistent-$(date -u +%Y%m%d-%H%M%S)}
PART=${2:-kernel}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
if [ "$PART" = public ]; then
    timeout 200 python -m pytest -q -m gpu tests/test_hopper_gpu.py -k "full_size_within or strided or varlen" \
        -p no:cacheprovider > "$OUT/tests-hopper.log" 2>&1 &
    [ -n "${OPS:-}" ] && timeout 200 python -m pytest -q -m gpu tests/test_triton_gpu.py -k "compiled or graph" \
        -p no:cacheprovider > "$OUT/tests-ops.log" 2>&1 &
    timeout 200 python -m pytest -q -m gpu tests/test_gluon_gpu.py -k "public_call or direct_launch" \
        -p no:cacheprovider > "$OUT/tests-gluon-public.log" 2>&1 &
    wait
    for f in "$OUT"/tests-*.log; do echo "$f: $(tail -1 "$f")"; grep -E "^FAILED" "$f" | head -8; done
    timeout 130 python -m fa2lab.bench.gluon_gpu --configs --out "$OUT" \
        --cases "${CASES:-1024:64:0,1024:64:1,4096:256:0,16384:128:0,8192:128:0:32:4}" > "$OUT/bench-kernel2.log" 2>&1
    echo "kernel bench rc=$?"; grep -E "^\||Error" "$OUT/bench-kernel2.log" | head -30
    timeout 280 python -m fa2lab.bench.gpu --hopper --only fwd --no-portable --no-flex --out "$OUT" \
        > "$OUT/bench-public.log" 2>&1
    echo "public bench rc=$?"; tail -22 "$OUT/bench-public.log"
    exit 0
fi
# four pytest processes at once (compiling is the slow part; 16 cores there)
i=0
for sel in "warp-specialised or strided" "persistent and not one-q and not three" "one-q or three-consumers and persistent" \
           "broadcast or direct_launch"; do
    i=$((i + 1))
    timeout 280 python -m pytest -q -m gpu tests/test_gluon_gpu.py -k "($sel) and not dkdv" -p no:cacheprovider \
        > "$OUT/tests-persistent-$i.log" 2>&1 &
done
wait
for f in "$OUT"/tests-persistent-*.log; do echo "$f: $(tail -1 "$f")"; grep -E "^FAILED|^E  " "$f" | head -8; done
timeout 290 python -m fa2lab.bench.gluon_gpu --configs --out "$OUT" \
    --cases 1024:128:0,1024:128:1,4096:128:0,4096:128:1,16384:128:1,4096:128:1:32:8,4096:64:0,4096:64:1,4096:256:1 > "$OUT/bench-persistent.log" 2>&1
echo "forward bench rc=$?"
grep -E "^\||wrote|Error" "$OUT/bench-persistent.log" | head -60
