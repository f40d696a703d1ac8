"""Tile-size sweep of the Triton kernels on the GPU at hand: one call times every variant.

    python -m fa2lab.bench.tune_gpu        (prints a table per kernel; the best row is marked)

Prediction written before the sweep (BENCHMARKS.md keeps the outcome): larger key tiles and
deeper pipelines help the backward (BLOCK_N 128 for dK/dV, 3 stages), and decode needs 4+
programs per SM (more splits) to approach the copy peak.
"""

from __future__ import annotations

import torch

from fa2lab.bench.gpu import _bench
from fa2lab.cost.flops import formula_flops
from fa2lab.decode.splits import kernel_num_splits
from fa2lab.kernels.bwd import flash_bwd_triton
from fa2lab.kernels.decode import decode_triton
from fa2lab.kernels.fwd import flash_fwd_triton
from fa2lab.measure.timing import print_process_warning

FWD = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4)]
BWD = [dict(dkdv=(64, 64, 8, 2), dq=(64, 64, 8, 2)), dict(dkdv=(64, 128, 8, 3), dq=(128, 64, 8, 3)),
       dict(dkdv=(32, 128, 4, 3), dq=(128, 32, 4, 3)), dict(dkdv=(64, 128, 8, 2), dq=(128, 64, 8, 2)),
       dict(dkdv=(32, 128, 8, 4), dq=(128, 32, 8, 4))]
DECODE = [(64, 4, 3, 1), (64, 4, 3, 2), (128, 4, 3, 1), (128, 8, 3, 1), (64, 4, 4, 2), (128, 4, 2, 2)]


def main() -> None:
    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for n, d, causal in [(4096, 128, False), (4096, 128, True), (4096, 64, False)]:
        h, b = 2048 // d, 32768 // n
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        flops = formula_flops(b, h, n, n, d, causal=causal)  # 4*B*H*N*N*D, /2 causal
        right = 0 if causal else -1
        res = []
        for bm, bn, w, st in FWD:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
            try:
                t = _bench(lambda: flash_fwd_triton(q, k, v, scale=d ** -0.5, left=-1, right=right,
                                                    config=cfg)).median_s
                res.append((flops / t / 1e12, f"fwd N={n} D={d} causal={causal} {cfg}"))
            except Exception as exc:
                res.append((0.0, f"fwd {cfg}: {type(exc).__name__} {str(exc)[:80]}"))
        out, lse = flash_fwd_triton(q, k, v, scale=d ** -0.5, left=-1, right=right)
        do = torch.randn_like(out)
        for cfg in BWD:
            try:
                t = _bench(lambda: flash_bwd_triton(do, None, q, k, v, out, lse, scale=d ** -0.5, left=-1,
                                                    right=right, config=cfg)).median_s
                res.append((2.5 * flops / t / 1e12, f"bwd N={n} D={d} causal={causal} {cfg}"))
            except Exception as exc:
                res.append((0.0, f"bwd {cfg}: {type(exc).__name__} {str(exc)[:80]}"))
        for kind in ("fwd", "bwd"):
            rows = [r for r in res if r[1].startswith(kind)]
            best = max(r[0] for r in rows)
            for tf, label in rows:
                print(f"{'*' if tf == best else ' '} {tf:7.1f} TFLOP/s  {label}")
        del q, k, v
    for b, hq, hkv, n in [(1, 32, 8, 32768), (8, 32, 8, 8192), (64, 32, 8, 4096), (1, 32, 32, 131072)]:
        q = torch.randn(b, hq, 1, 128, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, n, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
        seqlens = torch.full((b,), n, dtype=torch.int32, device=dev)
        nbytes = 2 * b * hkv * n * 128 * 2
        rows = []
        for bn, w, st, per_sm in DECODE:
            splits = kernel_num_splits(b * hkv, n, sms, block_n=bn, programs_per_sm=4 * per_sm)
            try:
                t = _bench(lambda: decode_triton(q, k, v, seqlens, scale=128 ** -0.5, left=-1, right=0,
                                                 num_splits=splits,
                                                 config=dict(BLOCK_M=16, BLOCK_N=bn, num_warps=w, num_stages=st))).median_s
                rows.append((nbytes / t / 1e12, f"decode B={b} Hkv={hkv} L={n} block_n={bn} warps={w} stages={st} "
                                                f"splits={splits} ({t * 1e6:.1f} us)"))
            except Exception as exc:
                rows.append((0.0, f"decode {bn} {w} {st}: {type(exc).__name__} {str(exc)[:80]}"))
        best = max(r[0] for r in rows)
        for tb, label in rows:
            print(f"{'*' if tb == best else ' '} {tb:6.2f} TB/s  {label}")
    print_process_warning()


if __name__ == "__main__":
    main()
