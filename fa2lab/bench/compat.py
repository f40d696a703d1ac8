"""What the flash-attn compat layer costs: `flash_attn_func` against `fa2lab.attention` (CUDA).

    python -m fa2lab.bench.compat [--n 4096] [--d 128] [--rounds 5]

Same run, same device, bf16, B*N = 32k tokens and H*D = 2048 (the FA2 paper's protocol),
`triton.testing.do_bench` medians. Three calls per case, interleaved in every round:

    direct    fa2lab.attention(q, k, v) on (B, H, N, D) tensors, as fa2lab's own users call it
    views     fa2lab.attention on (B, N, H, D) memory seen through .transpose(1, 2)
    compat    flash_attn_func(q, k, v) on (B, N, H, D) tensors (what flash-attn code calls)

compat / direct is the overhead a flash-attn user pays (target <= 1.03); compat / views is the
wrapper alone (argument checks, transposes). The ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import fa2lab
from fa2lab.compat.flash_attn import flash_attn_func
from fa2lab.measure.timing import print_process_warning, recent, time_call


def _bench(fn) -> float:
    """The do_bench median in seconds, through fa2lab.measure.time_call (conditions, marks)."""
    return time_call(fn, device="cuda", budget_s=0.1, label="compat").median_s


def measure(n: int = 4096, d: int = 128, causal: bool = False, rounds: int = 5, backward: bool = False,
            dtype=torch.bfloat16, tokens: int = 32768, device: str = "cuda") -> dict:
    b, h = max(1, tokens // n), 2048 // d
    g = torch.Generator(device=device).manual_seed(0)
    flash = [torch.randn(b, n, h, d, device=device, dtype=dtype, generator=g).requires_grad_(backward)
             for _ in range(3)]  # (B, N, H, D)
    native = [t.detach().transpose(1, 2).contiguous().requires_grad_(backward) for t in flash]  # (B, H, N, D)
    do_native = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g)
    do_flash = do_native.transpose(1, 2).contiguous()

    def step(out, do, leaves):
        if backward:
            torch.autograd.grad(out, leaves, do)

    calls = {
        "direct": lambda: step(fa2lab.attention(*native, causal=causal), do_native, native),
        "views": lambda: step(fa2lab.attention(*(t.transpose(1, 2) for t in flash), causal=causal).transpose(1, 2),
                              do_flash, flash),
        "compat": lambda: step(flash_attn_func(*flash, causal=causal), do_flash, flash),
    }
    with torch.no_grad() if not backward else torch.enable_grad():
        check = (flash_attn_func(*flash, causal=causal).float() - fa2lab.attention(*native, causal=causal)
                 .transpose(1, 2).float()).abs().max().item()
        times = {name: [] for name in calls}
        before = len(recent())
        for _ in range(rounds):
            for name, fn in calls.items():
                times[name].append(_bench(fn))
    flops = 4 * b * h * n * n * d / (2 if causal else 1) * (3.5 if backward else 1)  # 2 matmuls; bwd 2.5x more
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = lambda a, z: statistics.median(x / y for x, y in zip(times[a], times[z]))  # noqa: E731
    return dict(b=b, h=h, n=n, d=d, causal=causal, backward=backward, dtype=str(dtype).replace("torch.", ""),
                flops=flops, seconds=med, tflops={k: flops / t / 1e12 for k, t in med.items()},
                compat_over_direct=ratio("compat", "direct"), compat_over_views=ratio("compat", "views"),
                max_abs_diff_compat_vs_direct=check, rounds=rounds,
                contended=sum(t.contended or t.throttled for t in recent()[before:]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fa2lab.bench.compat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="folder for a compat-*.json results file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    from fa2lab.bench.gpu import environment, save_results

    rows = [measure(args.n, args.d, causal, args.rounds, backward)
            for causal, backward in ((False, False), (True, False), (False, True))]
    print(f"{'case':<34}{'direct':>9}{'views':>9}{'compat':>9}  compat/direct  compat/views  (TFLOP/s)")
    for r in rows:
        name = f"B={r['b']} H={r['h']} N={r['n']} D={r['d']} {'causal' if r['causal'] else 'full'}" + \
               (" fwd+bwd" if r["backward"] else " fwd")
        t = r["tflops"]
        print(f"{name:<34}{t['direct']:>9.0f}{t['views']:>9.0f}{t['compat']:>9.0f}  "
              f"{r['compat_over_direct']:>13.3f}  {r['compat_over_views']:>12.3f}")
    if args.out is not None:
        save_results(args.out, "compat", dict(environment=environment(), rows=rows))
    print_process_warning()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
