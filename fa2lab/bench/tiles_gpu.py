"""The hardware profile's tile choice and the cost model's time, checked on the GPU at hand.

    python -m fa2lab.bench.tiles_gpu [--profile h200] [--out experiments/results]

For each shape (the FA2 paper's protocol: B*N = 16k tokens, H*D = 2048, bf16) the Triton forward
kernel runs with every launch configuration in CONFIGS that compiles, timed by
`triton.testing.do_bench` medians. Each row carries the roofline prediction of
`fa2lab.cost.fa2_forward` for its tiles, and each shape reports the configuration that
`fa2lab.cost.tile_config` derives against the best one measured: the GPU half of the hardware issue's
"the profile's tile within 10% of the best found by a sweep".
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from fa2lab.bench.gpu import _bench, _conditions, environment, peaks, save_results
from fa2lab.cost import fa2_forward, tile_config
from fa2lab.cost.flops import formula_flops
from fa2lab.hardware import detect, get_profile
from fa2lab.kernels.fwd import flash_fwd_triton
from fa2lab.measure.timing import print_process_warning

# (BLOCK_M, BLOCK_N, num_warps, num_stages): the space the profile's derivation searches.
CONFIGS = [c for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)) if not (c[0] == 64 and c[2] == 8)]
SHAPES = [(n, d, causal) for d in (64, 128) for causal in (False, True) for n in (1024, 4096, 16384)]


def sweep_shape(profile, n: int, d: int, causal: bool, matmul_tflops: float, tokens: int = 16384) -> list[dict]:
    b, h = max(1, tokens // n), 2048 // d
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    right = 0 if causal else -1
    flops = formula_flops(b, h, n, n, d, causal=causal)  # 4*B*H*N*N*D, /2 causal
    rows = []
    for bm, bn, warps, stages in CONFIGS:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        pred = fa2_forward(profile, b, h, n, n, d, "bfloat16", causal=causal, block_q=bm, block_k=bn)
        # The same roofline with the matmul peak measured in this run instead of the datasheet's.
        at_peak = max(pred.t_compute * profile.flops("bfloat16") / (matmul_tflops * 1e12),
                      pred.t_memory, pred.t_exp) + pred.overhead
        row = dict(N=n, D=d, causal=causal, B=b, H=h, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                   predicted_ms=pred.time * 1e3, predicted_bound=pred.bound, predicted_measured_peak_ms=at_peak * 1e3)
        try:
            tm = _bench(lambda: flash_fwd_triton(q, k, v, scale=d ** -0.5, left=-1, right=right, config=cfg),
                        f"N={n} D={d} {bm}x{bn}")
        except Exception as exc:  # shared memory or register overflow for this configuration
            row.update(measured_ms=None, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        else:
            t = tm.median_s
            row.update(measured_ms=t * 1e3, tflops=flops / t / 1e12, measured_over_predicted=t / pred.time,
                       measured_over_predicted_measured_peak=t / at_peak, **_conditions(tm))
        rows.append(row)
    return rows


def choice(profile, rows: list[dict]) -> dict:
    n, d, causal = rows[0]["N"], rows[0]["D"], rows[0]["causal"]
    tc = tile_config(profile, d, "bfloat16", causal)
    ok = [r for r in rows if r["measured_ms"] is not None]
    best = min(ok, key=lambda r: r["measured_ms"])
    model_best = min(rows, key=lambda r: r["predicted_ms"])
    key = (tc.block_q, tc.block_k, tc.num_warps, tc.num_stages)
    chosen = next((r for r in ok if (r["block_m"], r["block_n"], r["num_warps"], r["num_stages"]) == key), None)
    ratio = chosen["measured_ms"] / best["measured_ms"] if chosen else None
    return dict(N=n, D=d, causal=causal, profile_config="x".join(map(str, key)),
                profile_tflops=chosen["tflops"] if chosen else None,
                best_config="x".join(str(best[c]) for c in ("block_m", "block_n", "num_warps", "num_stages")),
                best_tflops=best["tflops"], profile_over_best=ratio,
                within_10pct=None if ratio is None else ratio <= 1.10,
                median_measured_over_predicted=sorted(r["measured_over_predicted"] for r in ok)[len(ok) // 2],
                chosen_measured_over_predicted_measured_peak=(chosen or best)["measured_over_predicted_measured_peak"],
                model_best_config="x".join(str(model_best[c]) for c in ("block_m", "block_n", "num_warps",
                                                                         "num_stages")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=None, help="built-in profile to predict with (default: detect())")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--ns", type=int, nargs="+", default=None, help="sequence lengths (default 1024 4096 16384)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fa2lab.bench.tiles_gpu needs a CUDA device; on a CPU run `fa2lab bench-tiles`.")
    profile = get_profile(args.profile) if args.profile else detect()
    env = dict(environment(), profile=profile.name, peaks=peaks())
    print(env)
    shapes = [(n, d, c) for n in args.ns for d in (64, 128) for c in (False, True)] if args.ns else SHAPES
    rows, choices = [], []
    for n, d, causal in shapes:
        shape_rows = sweep_shape(profile, n, d, causal, env["peaks"]["matmul_tflops"])
        rows += shape_rows
        choices.append(choice(profile, shape_rows))
        c = choices[-1]
        print(f"N={n:6d} D={d:3d} causal={causal!s:5}  profile {c['profile_config']:>12} "
              f"{c['profile_tflops'] or float('nan'):6.1f} TFLOP/s  best {c['best_config']:>12} "
              f"{c['best_tflops']:6.1f}  profile/best {c['profile_over_best'] or float('nan'):.3f}  "
              f"measured/predicted {c['median_measured_over_predicted']:.2f} "
              f"(at the measured matmul peak: {c['chosen_measured_over_predicted_measured_peak']:.2f})", flush=True)
    save_results(args.out, "tiles-gpu", dict(environment=env, choices=choices, rows=rows))
    print_process_warning()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
