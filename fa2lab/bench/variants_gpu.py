"""GPU benchmark of the attention variants against the plain kernel, through `fa2lab.attention`.

Targets of issue 17 (H200, N = 4096, D = 128, bf16): soft-capping, ALiBi and sinks within 10% of the
plain kernel's forward and backward time, an additive bias and dropout within 25%. One process,
`triton.testing.do_bench` medians, the plain kernel timed first and last (its drift is printed).

    flops = 4 * B * H * N * N * D            # 2 matmuls forward; backward counted as 2.5x
    bias bytes = B * H * N * N * 2           # the extra bf16 tensor the biased kernel reads

    python -m fa2lab.bench.variants_gpu [--out DIR] [--n 4096] [--d 128]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fa2lab


def _bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3  # seconds


def cases(b, h, n, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    return {
        "plain": {},
        "softcap": dict(softcap=30.0),
        "alibi": dict(alibi_slopes=torch.rand(h, device=device, generator=g)),
        "sinks": dict(sinks=torch.randn(h, device=device, generator=g).requires_grad_()),
        "bias": dict(attn_bias=torch.randn(b, h, n, n, device=device, generator=g, dtype=torch.bfloat16)),
        "dropout": dict(dropout_p=0.1, generator=g),
    }


TARGETS = {"softcap": 1.10, "alibi": 1.10, "sinks": 1.10, "bias": 1.25, "dropout": 1.25}


def run(b=4, h=16, n=4096, d=128, causal=False) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    do = torch.randn_like(q)
    flops = 4 * b * h * n * n * d / (2 if causal else 1)
    rows = []
    order = ["plain", *TARGETS, "plain"]
    opts = cases(b, h, n)
    for name in order:
        kw = opts[name]
        fwd = lambda kw=kw: fa2lab.attention(q, k, v, causal=causal, backend="triton", **kw)  # noqa: E731
        out = fwd()
        leaves = [q, k, v] + ([kw["sinks"]] if "sinks" in kw else [])
        t_f = _bench(fwd)
        t_fb = _bench(lambda: torch.autograd.grad(fwd(), leaves, do))
        rows.append(dict(case=name, fwd_ms=t_f * 1e3, bwd_ms=(t_fb - t_f) * 1e3,
                         fwd_tflops=flops / t_f / 1e12, bwd_tflops=2.5 * flops / (t_fb - t_f) / 1e12,
                         finite=bool(torch.isfinite(out).all())))
    base_f = min(r["fwd_ms"] for r in rows if r["case"] == "plain")
    base_b = min(r["bwd_ms"] for r in rows if r["case"] == "plain")
    for r in rows:
        r["fwd_ratio"], r["bwd_ratio"] = r["fwd_ms"] / base_f, r["bwd_ms"] / base_b
        if r["case"] in TARGETS:
            lim = TARGETS[r["case"]]
            r["target"] = f"<= {lim:.2f}x"
            r["met"] = bool(r["fwd_ratio"] <= lim and r["bwd_ratio"] <= lim)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=128)
    args = ap.parse_args(argv)
    rows = run(n=args.n, d=args.d)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"),
                shape=f"B=4 H=16 N={args.n} D={args.d} bf16 full", command="python -m fa2lab.bench.variants_gpu")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "variants_gpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"{meta['device']} {meta['shape']} {meta['date']}")
    print(f"{'case':8} {'fwd ms':>7} {'x plain':>7} {'TF/s':>5} {'bwd ms':>7} {'x plain':>7} {'TF/s':>5}  target")
    for r in rows:
        print(f"{r['case']:8} {r['fwd_ms']:7.3f} {r['fwd_ratio']:7.3f} {r['fwd_tflops']:5.0f} {r['bwd_ms']:7.3f} "
              f"{r['bwd_ratio']:7.3f} {r['bwd_tflops']:5.0f}  {r.get('target', '')} "
              f"{'' if 'met' not in r else 'met' if r['met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
