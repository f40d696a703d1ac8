"""Decode through the public call on a GPU: `fa2lab.decode_attention` with a plan (dense, paged at
page sizes 1, 16, 256), without one, next to torch SDPA's flash and cuDNN kernels, same run.

    bytes = 2 * B * Hkv * L * D * 2          # K and V read once, bf16
    python -m fa2lab.bench.decode_gpu [--tune] [--out DIR]

--tune adds a kernel-only sweep of the decode kernel's tiles (labelled as kernel-only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fa2lab
from fa2lab.bench.gpu import _bench, environment, peaks, save_results

CASES = [(1, 32, 8, 32768), (1, 32, 8, 131072), (8, 32, 8, 8192), (64, 32, 8, 4096), (1, 32, 32, 131072)]
D = 128


def _paged(x, page_size, perm):
    b, hkv, n, d = x.shape
    per_seq = n // page_size
    pages = torch.empty(b * per_seq, hkv, page_size, d, dtype=x.dtype, device=x.device)
    pages[perm.flatten()] = x.view(b, hkv, per_seq, page_size, d).transpose(1, 2).reshape(-1, hkv, page_size, d)
    return pages


def _sdpa(backend, q, k, v):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])


def public_calls(b, hq, hkv, n, dtype=torch.bfloat16):
    q = torch.randn(b, hq, 1, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, hkv, n, D, device="cuda", dtype=dtype) for _ in range(2))
    seqlens = torch.full((b,), n, dtype=torch.int32, device="cuda")
    calls = {}
    plan = fa2lab.decode_plan(q, k, v, cache_seqlens=seqlens)
    calls["fa2lab plan dense"] = lambda: fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, plan=plan)
    calls["fa2lab no plan dense"] = lambda: fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens)
    for page in (16, 1, 256):
        perm = torch.randperm(b * (n // page), device="cuda").view(b, n // page)
        kp, vp, table = _paged(k, page, perm), _paged(v, page, perm), perm.to(torch.int32)
        p = fa2lab.decode_plan(q, kp, vp, cache_seqlens=seqlens, block_table=table)
        calls[f"fa2lab plan paged {page}"] = (lambda kp=kp, vp=vp, t=table, p=p:
                                              fa2lab.decode_attention(q, kp, vp, cache_seqlens=seqlens, block_table=t,
                                                                      plan=p))
    calls["sdpa flash"] = lambda: _sdpa(SDPBackend.FLASH_ATTENTION, q, k, v)
    calls["sdpa cudnn"] = lambda: _sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v)
    truth = _sdpa(SDPBackend.MATH, q.float(), k.float(), v.float())
    return calls, truth, plan


def run_public(log=print):
    rows = []
    for b, hq, hkv, n in CASES:
        calls, truth, plan = public_calls(b, hq, hkv, n)
        nbytes = 2 * b * hkv * n * D * 2  # K and V read once
        for name, fn in calls.items():
            try:
                out = fn()
                err = (out.float() - truth).abs().max().item()
                t = _bench(fn)
                rows.append(dict(kind="decode_public", impl=name, B=b, Hq=hq, Hkv=hkv, L=n, D=D, us=t * 1e6,
                                 tbps=nbytes / t / 1e12, err=err, num_splits=plan.num_splits))
                log(f"decode {name:<22} B={b:>3} Hkv={hkv:>2} L={n:>6} {t * 1e6:8.1f} us {nbytes / t / 1e12:5.2f} TB/s "
                    f"err {err:.1e}")
            except Exception as exc:  # noqa: BLE001 - a failing implementation is a result
                rows.append(dict(kind="decode_public", impl=name, B=b, L=n, error=str(exc)[:300]))
                log(f"decode {name:<22} B={b} L={n}: {type(exc).__name__}: {str(exc)[:200]}")
        del calls, truth
        torch.cuda.empty_cache()
    return rows


def run_tune(log=print):
    """Kernel-only (decode_triton directly, no plan checks): tiles x split density."""
    from fa2lab.decode.splits import kernel_num_splits
    from fa2lab.kernels.decode import decode_triton, row_tiles

    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for b, hq, hkv, n in [CASES[0], CASES[1], CASES[3]]:
        q = torch.randn(b, hq, 1, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        seqlens = torch.full((b,), n, dtype=torch.int32, device="cuda")
        perm = torch.randperm(b * (n // 16), device="cuda").view(b, n // 16)
        kp, vp, table = _paged(k, 16, perm), _paged(v, 16, perm), perm.to(torch.int32)
        nbytes = 2 * b * hkv * n * D * 2
        for bn in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    cfg = dict(BLOCK_M=16, BLOCK_N=bn, num_warps=warps, num_stages=stages)
                    for per_sm in (2, 4, 8):
                        splits = kernel_num_splits(b * hkv * row_tiles(hq, hkv, 1, cfg), n, sms, block_n=bn,
                                                   programs_per_sm=per_sm)
                        for paged in (False, True):
                            kk, vv, bt = (kp, vp, table) if paged else (k, v, None)
                            try:
                                t = _bench(lambda: decode_triton(q, kk, vv, seqlens, scale=D ** -0.5, left=-1, right=0,
                                                                 num_splits=splits, block_table=bt, config=cfg))
                            except Exception as exc:  # noqa: BLE001
                                log(f"tune {cfg} {type(exc).__name__}")
                                continue
                            rows.append(dict(kind="decode_tune", B=b, Hkv=hkv, L=n, paged=paged, splits=splits,
                                             per_sm=per_sm, **cfg, us=t * 1e6, tbps=nbytes / t / 1e12))
        best = {}
        for r in rows:
            if r["B"] == b and r["L"] == n:
                key = r["paged"]
                if key not in best or r["tbps"] > best[key]["tbps"]:
                    best[key] = r
        for r in best.values():
            log(f"tune (kernel-only) best B={b} L={n} paged={r['paged']}: {r['tbps']:.2f} TB/s "
                f"BLOCK_N={r['BLOCK_N']} warps={r['num_warps']} stages={r['num_stages']} per_sm={r['per_sm']} "
                f"splits={r['splits']}")
        del q, k, v, kp, vp
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fa2lab.bench.decode_gpu", description=__doc__)
    p.add_argument("--tune", action="store_true")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = p.parse_args(argv)
    env = environment()
    pk = peaks()
    print(env)
    print(f"peaks: copy {pk['copy_tbps']:.2f} TB/s")
    rows = run_tune() if args.tune else []
    if args.tune:  # the public calls below run the tiles that served the dense cases best (geometric mean)
        from fa2lab.decode import splits as split_rule
        from fa2lab.kernels import decode as dk

        score = {}
        for r in rows:
            if r["kind"] == "decode_tune" and not r["paged"]:
                key = (r["BLOCK_N"], r["num_warps"], r["num_stages"], r["per_sm"])
                score.setdefault(key, []).append(r["tbps"])
        best = max((k for k, v in score.items() if len(v) == max(map(len, score.values()))),
                   key=lambda k: torch.tensor(score[k]).log().mean().item())
        dk.DECODE_TILES.update(BLOCK_N=best[0], num_warps=best[1], num_stages=best[2])
        split_rule.KERNEL_PROGRAMS_PER_SM = best[3]
        print(f"tiles for the public calls (from the sweep): {dk.DECODE_TILES}, programs per SM {best[3]}")
        rows.append(dict(kind="decode_tiles", programs_per_sm=best[3], **dk.DECODE_TILES))
    rows += run_public()
    save_results(args.out, "decode", dict(environment=env, peaks=pk, rows=rows))
    table = {}
    for r in rows:
        if r.get("kind") == "decode_public" and "tbps" in r:
            table.setdefault((r["B"], r["Hkv"], r["L"]), {})[r["impl"]] = r["tbps"]
    names = ["fa2lab plan dense", "fa2lab plan paged 16", "fa2lab plan paged 1", "fa2lab plan paged 256",
             "fa2lab no plan dense", "sdpa flash", "sdpa cudnn"]
    print("\n| case | " + " | ".join(names) + " | plan/cuDNN | paged16/dense |")
    for (b, hkv, n), vals in table.items():
        cells = [f"{vals[x]:.2f}" if x in vals else "-" for x in names]
        ratio = vals.get("fa2lab plan dense", 0) / vals["sdpa cudnn"] if "sdpa cudnn" in vals else float("nan")
        paged = vals.get("fa2lab plan paged 16", 0) / vals.get("fa2lab plan dense", float("nan"))
        print(f"| B={b} Hkv={hkv} L={n} | " + " | ".join(cells) + f" | {ratio:.2f} | {paged:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
