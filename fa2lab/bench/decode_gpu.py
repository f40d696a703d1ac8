"""Decode through the public call on a GPU: `fa2lab.decode_attention` with a plan (dense, paged at
page sizes 1, 16, 256), without one, next to torch SDPA's flash and cuDNN kernels, same run.

    bytes = 2 * B * Hkv * L * D * 2          # K and V read once, bf16
    python -m fa2lab.bench.decode_gpu [--host] [--splits] [--variants] [--options] [--tune] [--no-public] [--out DIR]

Every timed call is first checked against an fp32 SDPA math reference; its error is reported next
to bf16 SDPA math's (the 2x rule). "paged 16 seq" is page size 16 with pages in order (the same
kernel as "paged 16", whose pages are in a random order): the difference is the cost of scattered
pages, not of the page table. "plan dense (again)" repeats the first row at the end of its case.
--host: host time of one call (launches are asynchronous: the time until the call returns) and the
step time of back-to-back calls without an L2 flush (what a decode loop sees). --splits: the planned
call at 1-8 programs per SM. --variants: soft-capping, ALiBi and sinks through the planned call against
the plain planned call. --options: kernel options (split rule, page-table prefetch, 128-key tiles)
through the planned call. --tune: a kernel-only sweep of the decode kernel's tiles (labelled as kernel-only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
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


def _inputs(b, hq, hkv, n, dtype=torch.bfloat16):
    q = torch.randn(b, hq, 1, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, hkv, n, D, device="cuda", dtype=dtype) for _ in range(2))
    return q, k, v, torch.full((b,), n, dtype=torch.int32, device="cuda")


def public_calls(q, k, v, seqlens, pages=((16, True), (1, True), (256, True), (16, False))):
    """name -> zero-argument call, for one case. pages: (page size, random order)."""
    b, n = q.shape[0], k.shape[2]
    calls = {}
    plan = fa2lab.decode_plan(q, k, v, cache_seqlens=seqlens)
    calls["plan dense"] = lambda: fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, plan=plan)
    for page, shuffled in pages:
        order = torch.randperm(b * (n // page), device="cuda") if shuffled else torch.arange(b * (n // page),
                                                                                                device="cuda")
        perm = order.view(b, n // page)
        kp, vp, table = _paged(k, page, perm), _paged(v, page, perm), perm.to(torch.int32)
        p = fa2lab.decode_plan(q, kp, vp, cache_seqlens=seqlens, block_table=table)
        calls[f"paged {page}{'' if shuffled else ' seq'}"] = (
            lambda kp=kp, vp=vp, t=table, p=p: fa2lab.decode_attention(q, kp, vp, cache_seqlens=seqlens,
                                                                        block_table=t, plan=p))
    calls["no plan"] = lambda: fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens)
    calls["sdpa flash"] = lambda: _sdpa(SDPBackend.FLASH_ATTENTION, q, k, v)
    calls["sdpa cudnn"] = lambda: _sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v)
    calls["plan dense (again)"] = calls["plan dense"]
    return calls, plan


def _errors(q, k, v):
    """(fp32 SDPA math truth, bf16 SDPA math's error against it): the yardstick of the 2x rule."""
    truth = _sdpa(SDPBackend.MATH, q.float(), k.float(), v.float())
    naive = (_sdpa(SDPBackend.MATH, q, k, v).float() - truth).abs().max().item()
    return truth, naive


def run_public(log=print, cases=CASES):
    rows = []
    for b, hq, hkv, n in cases:
        q, k, v, seqlens = _inputs(b, hq, hkv, n)
        calls, plan = public_calls(q, k, v, seqlens)
        truth, naive = _errors(q, k, v)
        nbytes = 2 * b * hkv * n * D * 2  # K and V read once
        for name, fn in calls.items():
            try:
                err = (fn().float() - truth).abs().max().item()
                t = _bench(fn, f"decode {name}").median_s
                rows.append(dict(kind="decode_public", impl=name, B=b, Hq=hq, Hkv=hkv, L=n, D=D, us=t * 1e6,
                                 tbps=nbytes / t / 1e12, err=err, sdpa_math_bf16_err=naive,
                                 num_splits=plan.num_splits))
                log(f"decode {name:<18} B={b:>3} Hkv={hkv:>2} L={n:>6} {t * 1e6:8.1f} us {nbytes / t / 1e12:5.2f} TB/s "
                    f"err {err:.1e} (bf16 math {naive:.1e})")
            except Exception as exc:  # noqa: BLE001 - a failing implementation is a result
                rows.append(dict(kind="decode_public", impl=name, B=b, Hkv=hkv, L=n, error=str(exc)[:300]))
                log(f"decode {name:<18} B={b} L={n}: {type(exc).__name__}: {str(exc)[:200]}")
        del calls, truth, q, k, v
        torch.cuda.empty_cache()
    return rows


def _host_us(fn, calls=300, sync_every=50):
    """Median host time of one call (it returns before the GPU is done): the Python and launch cost."""
    times = []
    for i in range(calls):
        if i % sync_every == 0:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def _loop_us(fn, steps=200):
    """Wall time per call of `steps` back-to-back calls (no L2 flush): a decode loop's step time."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e6


def run_host(log=print):
    """Host time per call, and whether the directly bound kernel gives the bits of Triton's launch."""
    from fa2lab.kernels import decode as dk

    rows = []
    for b, hq, hkv, n in [(1, 32, 8, 4096), (1, 32, 8, 32768)]:
        q, k, v, seqlens = _inputs(b, hq, hkv, n)
        plan = fa2lab.decode_plan(q, k, v, cache_seqlens=seqlens)
        planned = lambda: fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, plan=plan)  # noqa: E731
        bound_out = planned()
        planned()
        bound = bool(plan.launch._bound) and all(plan.launch._bound.values())
        dk.DecodeLaunch.BIND = False
        same = torch.equal(planned(), bound_out)
        unbound_host = _host_us(planned)
        dk.DecodeLaunch.BIND = True
        cudnn = lambda: _sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v)  # noqa: E731
        row = dict(kind="decode_host", B=b, Hkv=hkv, L=n, bound=bound, bound_equals_triton_launch=same,
                   host_us_planned=_host_us(planned), host_us_planned_triton_launch=unbound_host,
                   host_us_cudnn=_host_us(cudnn), host_us_empty=_host_us(lambda: torch.empty(1, device="cuda")),
                   loop_us_planned=_loop_us(planned), loop_us_cudnn=_loop_us(cudnn))
        rows.append(row)
        log(" ".join(f"{k_}={v_:.1f}" if isinstance(v_, float) else f"{k_}={v_}" for k_, v_ in row.items()))
        del q, k, v
    return rows


def run_splits(log=print, per_sm=(1, 2, 4, 8)):
    """The planned dense call at several programs per SM (num_splits given to the plan)."""
    from fa2lab.decode.splits import kernel_num_splits

    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for b, hq, hkv, n in [CASES[0], CASES[1], CASES[2]]:
        q, k, v, seqlens = _inputs(b, hq, hkv, n)
        nbytes = 2 * b * hkv * n * D * 2
        for p_sm in per_sm:
            splits = kernel_num_splits(b * hkv, n, sms, programs_per_sm=p_sm)
            plan = fa2lab.decode_plan(q, k, v, cache_seqlens=seqlens, num_splits=splits)
            t = _bench(lambda: fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, plan=plan)).median_s
            rows.append(dict(kind="decode_splits", B=b, Hkv=hkv, L=n, per_sm=p_sm, splits=splits, us=t * 1e6,
                             tbps=nbytes / t / 1e12))
            log(f"splits B={b} Hkv={hkv} L={n} per_sm={p_sm} splits={splits}: {t * 1e6:.1f} us "
                f"{nbytes / t / 1e12:.2f} TB/s")
        del q, k, v
        torch.cuda.empty_cache()
    return rows


VARIANTS = {
    "plain": {},
    "softcap": dict(softcap=30.0),  # Gemma 2's attention cap
    "alibi": dict(alibi="slopes"),
    "sinks": dict(sinks="logits"),
    "all three": dict(softcap=30.0, alibi="slopes", sinks="logits"),
}


def _variant_options(spec, hq):
    opts = dict(spec)
    if "alibi" in opts:  # ALiBi's geometric slopes, 2^(-8 h / Hq)
        opts.pop("alibi")
        opts["alibi_slopes"] = 2.0 ** (-8.0 * torch.arange(1, hq + 1, device="cuda") / hq)
    if "sinks" in opts:
        opts["sinks"] = torch.randn(hq, device="cuda")
    return opts


VARIANT_CASES = [(CASES[0], (None, 16)), (CASES[3], (None,))]


def run_variants(log=print, cases=VARIANT_CASES):
    """Soft-capping, ALiBi and sinks through the planned call, against the plain planned call (same
    run), each checked against an fp32 oracle per sequence (with bf16 math's error beside it)."""
    from fa2lab.reference import attention_ref

    rows = []
    for (b, hq, hkv, n), pages in cases:
        q, k, v, seqlens = _inputs(b, hq, hkv, n)
        nbytes = 2 * b * hkv * n * D * 2
        for page in pages:
            if page:
                perm = torch.randperm(b * (n // page), device="cuda").view(b, n // page)
                kc, vc, table = _paged(k, page, perm), _paged(v, page, perm), perm.to(torch.int32)
            else:
                kc, vc, table = k, v, None
            base = None
            for name, spec in VARIANTS.items():
                opts = _variant_options(spec, hq)
                plan = fa2lab.decode_plan(q, kc, vc, cache_seqlens=seqlens, block_table=table, **opts)
                fn = lambda: fa2lab.decode_attention(q, kc, vc, cache_seqlens=seqlens, block_table=table,  # noqa: E731
                                                     plan=plan)
                rows_b = range(min(b, 4))  # the error on the first sequences: all of them have length n
                truth = torch.cat([attention_ref(q[i:i + 1].float(), k[i:i + 1].float(), v[i:i + 1].float(),
                                                 causal=True, **_seq_opts(opts, i)) for i in rows_b])
                naive = torch.cat([attention_ref(q[i:i + 1], k[i:i + 1], v[i:i + 1], causal=True, upcast=False,
                                                 **_seq_opts(opts, i)) for i in rows_b])
                err = (fn()[: len(rows_b)].float() - truth).abs().max().item()
                naive_err = (naive.float() - truth).abs().max().item()
                t = _bench(fn, f"decode variant {name}").median_s
                base = t if name == "plain" else base
                rows.append(dict(kind="decode_variant", variant=name, page=page, B=b, Hkv=hkv, L=n, us=t * 1e6,
                                 tbps=nbytes / t / 1e12, vs_plain=base / t, err=err, sdpa_math_bf16_err=naive_err))
                log(f"variant {name:<9} page={page} B={b} Hkv={hkv} L={n}: {t * 1e6:7.1f} us "
                    f"{nbytes / t / 1e12:5.2f} TB/s {base / t:.3f}x plain, err {err:.1e} (bf16 math {naive_err:.1e})")
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def _seq_opts(opts, i):
    seq = dict(opts)
    if "alibi_slopes" in seq and seq["alibi_slopes"].dim() == 2:
        seq["alibi_slopes"] = seq["alibi_slopes"][i:i + 1]
    return seq


OPTION_CASES = [(CASES[0], None, ("default", "33 splits")),
                (CASES[2], None, ("default", "rounded up")), (CASES[4], None, ("default", "rounded up")), (CASES[3], 16, ("default", "no prefetch", "BLOCK_N 128")),
                (CASES[4], 16, ("default", "no prefetch"))]


def run_options(log=print, cases=OPTION_CASES):
    """The planned call under kernel options, one case at a time, same run: the split rule (the
    default fills one wave; "rounded up" launches at least 2 programs per SM, past one wave; "33
    splits" the rule before 2026-12-03, which kept a split without keys), page-table reads one tile
    ahead (the default) or not, 128-key tiles."""
    from fa2lab.decode.splits import KERNEL_PROGRAMS_PER_SM
    from fa2lab.kernels import decode as dk

    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    slots = KERNEL_PROGRAMS_PER_SM * sms
    options = {"default": {}, "rounded up": dict(rounded_up=True), "no prefetch": dict(prefetch_pages=False),
               "BLOCK_N 128": dict(BLOCK_N=128), "33 splits": dict(splits=33)}
    for (b, hq, hkv, n), page, names in cases:
        q, k, v, seqlens = _inputs(b, hq, hkv, n)
        nbytes = 2 * b * hkv * n * D * 2
        kc, vc, table = k, v, None
        if page:
            perm = torch.randperm(b * (n // page), device="cuda").view(b, n // page)
            kc, vc, table = _paged(k, page, perm), _paged(v, page, perm), perm.to(torch.int32)
        truth = _sdpa(SDPBackend.MATH, q.float(), k.float(), v.float())
        base = None
        for name in names:
            opt = options[name]
            saved = dict(dk.DECODE_TILES), dict(dk.DECODE_OPTIONS)
            dk.DECODE_TILES["BLOCK_N"] = opt.get("BLOCK_N", saved[0]["BLOCK_N"])
            dk.DECODE_OPTIONS["prefetch_pages"] = opt.get("prefetch_pages", saved[1]["prefetch_pages"])
            try:
                splits = -(-slots // (b * hkv)) if opt.get("rounded_up") else opt.get("splits")  # rules of the past
                plan = fa2lab.decode_plan(q, kc, vc, cache_seqlens=seqlens, block_table=table, num_splits=splits)
                fn = lambda: fa2lab.decode_attention(q, kc, vc, cache_seqlens=seqlens, block_table=table,  # noqa: E731
                                                     plan=plan)
                err = (fn().float() - truth).abs().max().item()
                t = _bench(fn, f"decode option {name}").median_s
            finally:
                dk.DECODE_TILES.update(saved[0])
                dk.DECODE_OPTIONS.update(saved[1])
            base = t if base is None else base
            rows.append(dict(kind="decode_option", option=name, page=page, B=b, Hkv=hkv, L=n, splits=plan.num_splits,
                             us=t * 1e6, tbps=nbytes / t / 1e12, vs_default=base / t, err=err))
            log(f"option {name:<20} page={page} B={b} Hkv={hkv} L={n} splits={plan.num_splits}: {t * 1e6:7.1f} us "
                f"{nbytes / t / 1e12:5.2f} TB/s {base / t:.3f}x default, err {err:.1e}")
        del q, k, v, kc, vc
        torch.cuda.empty_cache()
    return rows


def run_tune(log=print):
    """Kernel-only (decode_triton directly, no plan checks): tiles x split density."""
    from fa2lab.decode.splits import kernel_num_splits
    from fa2lab.kernels.decode import decode_triton, row_tiles

    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for b, hq, hkv, n in [CASES[0], CASES[1], CASES[3]]:
        q, k, v, seqlens = _inputs(b, hq, hkv, n)
        nbytes = 2 * b * hkv * n * D * 2
        for bn in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    cfg = dict(BLOCK_M=16, BLOCK_N=bn, num_warps=warps, num_stages=stages)
                    for per_sm in (2, 4, 8):
                        splits = kernel_num_splits(b * hkv * row_tiles(hq, hkv, 1, cfg), n, sms, block_n=bn,
                                                   programs_per_sm=per_sm)
                        t = _bench(lambda: decode_triton(q, k, v, seqlens, scale=D ** -0.5, left=-1, right=0,
                                                         num_splits=splits, config=cfg)).median_s
                        rows.append(dict(kind="decode_tune", B=b, Hkv=hkv, L=n, splits=splits, per_sm=per_sm, **cfg,
                                         us=t * 1e6, tbps=nbytes / t / 1e12))
        best = max((r for r in rows if r["B"] == b and r["L"] == n), key=lambda r: r["tbps"])
        log(f"tune (kernel-only) best B={b} L={n}: {best['tbps']:.2f} TB/s {best}")
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def summary(rows) -> list[str]:
    """The short table: TB/s per case and implementation, plan / cuDNN and paged 16 / dense."""
    table = {}
    for r in rows:
        if r.get("kind") == "decode_public" and "tbps" in r:
            table.setdefault((r["B"], r["Hkv"], r["L"]), {})[r["impl"]] = r["tbps"]
    names = ["plan dense", "paged 16", "paged 1", "paged 256", "paged 16 seq", "no plan", "sdpa flash", "sdpa cudnn",
             "plan dense (again)"]
    lines = ["| case | " + " | ".join(names) + " | plan/cuDNN | paged16/dense |"]
    for (b, hkv, n), vals in table.items():
        cells = [f"{vals[x]:.2f}" if x in vals else "-" for x in names]
        dense = max(vals.get("plan dense", 0), vals.get("plan dense (again)", 0))
        ratio = dense / vals["sdpa cudnn"] if vals.get("sdpa cudnn") else float("nan")
        paged = vals.get("paged 16", 0) / dense if dense else float("nan")
        lines.append(f"| B={b} Hkv={hkv} L={n} | " + " | ".join(cells) + f" | {ratio:.2f} | {paged:.2f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fa2lab.bench.decode_gpu", description=__doc__)
    for flag in ("--host", "--splits", "--variants", "--options", "--tune", "--no-public"):
        p.add_argument(flag, action="store_true")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = p.parse_args(argv)
    env = environment()
    pk = peaks()
    print(env)
    print(f"peaks: copy {pk['copy_tbps']:.2f} TB/s, bf16 matmul {pk['matmul_tflops']:.0f} TFLOP/s")
    rows = []
    payload = dict(environment=env, peaks=pk, rows=rows)
    steps = [(args.host, run_host), (not args.no_public, run_public), (args.variants, run_variants),
             (args.options, run_options), (args.splits, run_splits), (args.tune, run_tune)]
    path = None
    for wanted, step in steps:
        if wanted:
            rows += step()
            if path is None:
                path = save_results(args.out, "decode", payload)
            else:  # the same file, rewritten: partial results survive a time limit
                path.write_text(json.dumps(payload, indent=1))
    print(f"\ncopy {pk['copy_tbps']:.2f} TB/s")
    for line in summary(rows):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
