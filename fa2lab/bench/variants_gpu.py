"""GPU benchmark of the attention variants against the plain kernel, through `fa2lab.attention`.

Targets of issue 17 (H200, N = 4096, D = 128, bf16): soft-capping, ALiBi and sinks within 10% of the
plain kernel's forward and backward time, an additive bias and dropout within 25%. One process,
`triton.testing.do_bench` medians, the plain kernel timed first and last (its drift is printed).

    flops = 4 * B * H * N * N * D            # 2 matmuls forward; backward counted as 2.5x
    bias bytes = B * H * N * N * 2           # the extra bf16 tensor the biased kernel reads

    python -m fa2lab.bench.variants_gpu [--out DIR] [--n 4096] [--d 128] [--causal] [--fwd-only] [--paths auto,portable]
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


def check(name, b=1, h=4, n=1024, d=128, causal=False, dtype=torch.bfloat16) -> dict:
    """fa2lab's rule on one variant through the public call (the kernels the timing runs, smaller
    problem): error against float64 at most 2x that of PyTorch computing naively in `dtype`. Dropout:
    the kernels' mask (`fa2lab.dropout_mask(..., backend="triton")`) replayed through the reference."""
    from fa2lab.measure.exactness import exact_floor, max_err, within_torch_error
    from fa2lab.reference import attention_ref

    g = torch.Generator(device="cuda").manual_seed(2)
    q64, k64, v64 = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float64, generator=g) for _ in range(3))
    kw = {key: (val.to(dtype) if key == "attn_bias" else val) for key, val in cases(b, h, n)[name].items()}
    kw.pop("generator", None)
    ref_kw = dict(kw)
    gen = (lambda: torch.Generator(device="cuda").manual_seed(5)) if name == "dropout" else (lambda: None)  # noqa: E731
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    if name == "dropout":
        ref_kw["dropout_mask"] = fa2lab.dropout_mask(q, k, dropout_p=kw["dropout_p"], generator=gen(), backend="triton")
        kw["generator"] = gen()
    ours = fa2lab.attention(q, k, v, causal=causal, backend="triton", **kw)
    truth = attention_ref(q64, k64, v64, causal=causal, **ref_kw)
    naive = attention_ref(q, k, v, causal=causal, upcast=False, **ref_kw)
    e, e_t = max_err(ours, truth), max_err(naive, truth)
    return dict(err=e, torch_err=e_t, exact=bool(within_torch_error(e, e_t, 2.0, exact_floor(dtype))))


def run(b=4, h=16, n=4096, d=128, causal=False, fwd_only=False, paths=("auto",), checks=True) -> list[dict]:
    """paths: "auto" (the dispatcher's choice: the Hopper kernels on sm_90) and/or "portable"
    (FA2LAB_TRITON_PATH=portable, the kernels every other GPU runs), timed in the same process."""
    import os

    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    do = torch.randn_like(q)
    flops = 4 * b * h * n * n * d / (2 if causal else 1)
    rows = []
    order = ["plain", *TARGETS, "plain"]
    opts = cases(b, h, n)
    for path in paths:
        os.environ["FA2LAB_TRITON_PATH"] = path
        for name in order:
            kw = opts[name]
            fwd = lambda kw=kw: fa2lab.attention(q, k, v, causal=causal, backend="triton", **kw)  # noqa: E731
            out = fwd()
            row = dict(case=name, path=path, causal=causal)
            again = name == "plain" and any(r["case"] == "plain" and r["path"] == path for r in rows)
            if checks and not again:
                row.update(check(name, d=d, causal=causal))
            t_f = _bench(fwd)
            row.update(fwd_ms=t_f * 1e3, fwd_tflops=flops / t_f / 1e12, finite=bool(torch.isfinite(out).all()))
            if not fwd_only:
                leaves = [q, k, v] + ([kw["sinks"]] if "sinks" in kw else [])
                t_fb = _bench(lambda: torch.autograd.grad(fwd(), leaves, do))
                row.update(bwd_ms=(t_fb - t_f) * 1e3, bwd_tflops=2.5 * flops / (t_fb - t_f) / 1e12)
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.environ.pop("FA2LAB_TRITON_PATH", None)
    for path in paths:
        mine = [r for r in rows if r["path"] == path]
        base_f = min(r["fwd_ms"] for r in mine if r["case"] == "plain")
        base_b = min((r["bwd_ms"] for r in mine if r["case"] == "plain" and "bwd_ms" in r), default=None)
        for r in mine:
            r["fwd_ratio"] = r["fwd_ms"] / base_f
            if base_b:
                r["bwd_ratio"] = r["bwd_ms"] / base_b
            if r["case"] in TARGETS:
                lim = TARGETS[r["case"]]
                r["target"] = f"<= {lim:.2f}x"
                r["met_fwd"] = bool(r["fwd_ratio"] <= lim)
                if base_b:
                    r["met"] = bool(r["fwd_ratio"] <= lim and r["bwd_ratio"] <= lim)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--fwd-only", action="store_true", help="time the forward only (no backward compiles)")
    ap.add_argument("--paths", default="auto", help="auto,portable: the dispatcher's kernels and/or the portable ones")
    ap.add_argument("--no-checks", action="store_true")
    args = ap.parse_args(argv)
    rows = run(n=args.n, d=args.d, causal=args.causal, fwd_only=args.fwd_only, paths=tuple(args.paths.split(",")),
               checks=not args.no_checks)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"),
                shape=f"B=4 H=16 N={args.n} D={args.d} bf16 {'causal' if args.causal else 'full'}",
                command="python -m fa2lab.bench.variants_gpu " + " ".join(argv or []))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "variants_gpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"{meta['device']} {meta['shape']} {meta['date']}")
    print(f"{'case':8} {'path':8} {'fwd ms':>7} {'x plain':>7} {'TF/s':>5} {'bwd ms':>7} {'x plain':>7}  err/torch target")
    for r in rows:
        bwd = f"{r['bwd_ms']:7.3f} {r['bwd_ratio']:7.3f}" if "bwd_ratio" in r else f"{'-':>7} {'-':>7}"
        chk = f"{r['err'] / max(r['torch_err'], 1e-30):.2f}{'' if r['exact'] else ' INEXACT'}" if "err" in r else "-"
        print(f"{r['case']:8} {r['path']:8} {r['fwd_ms']:7.3f} {r['fwd_ratio']:7.3f} {r['fwd_tflops']:5.0f} {bwd}  "
              f"{chk} {r.get('target', '')}")


if __name__ == "__main__":
    main()
