"""GPU benchmark: fa2lab's Triton kernels next to torch SDPA's backends and FlexAttention.

One process, one device, `triton.testing.do_bench` medians through fa2lab.measure.time_call, so that
every row carries its spread (min_s, max_s) and the GPU's SM and memory clocks, power and
temperature at the start and end of its timing, and says when it was contended or throttled
(the last line of the run warns). Every figure comes with its formula
and its ratio to the baselines and to the machine's own matmul and copy peaks, measured in the
same run. Each benchmarked shape is also checked for exactness on a slice of query rows against
float64 (fa2lab's error must be at most 2x that of SDPA's same-dtype result, plus bf16 rounding).

    python -m fa2lab.bench.gpu [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fa2lab.cost.flops import formula_flops
import fa2lab
from fa2lab.measure.exactness import max_err, within_torch_error
from fa2lab.measure.timing import Timing, print_process_warning, time_call
from fa2lab.reference import attention_ref


def _bench(fn, label: str = "") -> Timing:
    """do_bench(fn, warmup=25, rep=100) on the current CUDA device, with its conditions."""
    return time_call(fn, device="cuda", budget_s=0.1, label=label)


def _conditions(t: Timing) -> dict:
    """A result row's timing columns: the spread in ms, the GPU's clocks, the verdict."""
    fields = t.fields()
    fields.pop("median_s")
    return dict(min_ms=fields.pop("min_s") * 1e3, max_ms=fields.pop("max_s") * 1e3, **fields)


def peaks() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = _bench(lambda: a @ a, "bf16 matmul 8192^3").median_s
    x = torch.empty(2**30 // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    tc = _bench(lambda: y.copy_(x), "copy 1 GiB").median_s
    return {"matmul_tflops": 2 * 8192**3 / t / 1e12, "copy_tbps": 2 * x.numel() * 2 / tc / 1e12}


def _sdpa(backend):
    def run(q, k, v, causal):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return run


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)  # one static kernel per shape, not a dynamic one
    masks = {}

    def run(q, k, v, causal):
        if not causal:
            return compiled(q, k, v)
        key = (q.shape[2], k.shape[2])
        if key not in masks:
            masks[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, q.shape[2], k.shape[2])
        return compiled(q, k, v, block_mask=masks[key])
    return run


def _fa2lab(q, k, v, causal):
    return fa2lab.attention(q, k, v, causal=causal, backend="triton")  # the public call


def _fa2lab_portable(q, k, v, causal):
    """The portable kernels on a GPU where the dispatcher would pick the Hopper ones (same run, same call)."""
    old = os.environ.get("FA2LAB_TRITON_PATH")
    os.environ["FA2LAB_TRITON_PATH"] = "portable"
    try:
        return _fa2lab(q, k, v, causal)
    finally:
        os.environ.pop("FA2LAB_TRITON_PATH") if old is None else os.environ.__setitem__("FA2LAB_TRITON_PATH", old)


FWD_IMPLS = {"fa2lab triton": lambda: _fa2lab, "sdpa flash": lambda: _sdpa(SDPBackend.FLASH_ATTENTION),
             "sdpa cudnn": lambda: _sdpa(SDPBackend.CUDNN_ATTENTION),
             "sdpa efficient": lambda: _sdpa(SDPBackend.EFFICIENT_ATTENTION), "flex (compiled)": _flex}


def _check_rows(out, ref_out, q, k, v, causal, rows=128):
    """Error of `out` and `ref_out` against the float64 oracle on the first and last `rows` query
    rows of batch 0 (self-attention, Nq = Nk = N): the first rows see at most the first `rows` keys
    when causal, the last rows line up bottom-right, so each block is one oracle call."""
    n, r = q.shape[2], min(rows, q.shape[2])
    errs_ours, errs_ref = [], []
    for sl, nk in ((slice(0, r), r if causal else n), (slice(n - r, n), n)):
        truth = attention_ref(q[:1, :, sl].double(), k[:1, :, :nk].double(), v[:1, :, :nk].double(), causal=causal)
        errs_ours.append(max_err(out[:1, :, sl], truth))
        errs_ref.append(max_err(ref_out[:1, :, sl], truth))
    return max(errs_ours), max(errs_ref)


def forward_backward(cases, dtype=torch.bfloat16, with_bwd=True, pk=None, log=print, impls=None, portable_cases=(),
                     flex_cases=None):
    """One row per (case, implementation of `impls`, default FWD_IMPLS): forward, and backward with
    `with_bwd`. cases: (N, D, causal) with B*N = 32k tokens and H*D = 2048, or (N, D, causal, Hq, Hkv)
    for GQA. portable_cases: the cases that also time the portable kernels (impl "fa2lab portable").
    flex_cases: when given, FlexAttention runs on these cases only (each shape compiles for a while)."""
    base = FWD_IMPLS if impls is None else impls
    rows = []
    for case in cases:
        n, d, causal = case[:3]
        h = 2048 // d  # hidden 2048 as in the FA2 paper
        hkv = h
        if len(case) == 5:
            h, hkv = case[3:]
        b = max(1, 32768 // n)  # B * N = 32k tokens
        q = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=dtype) for _ in range(2))
        impls = dict(base)
        if flex_cases is not None and case not in flex_cases:
            impls.pop("flex (compiled)", None)
        if case in portable_cases:
            impls["fa2lab portable"] = lambda: _fa2lab_portable
        flops = formula_flops(b, h, n, n, d, causal=causal)  # 4*B*H*N*N*D: 2 matmuls of 2*N*N*D, /2 causal
        ref = _sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v, causal)
        for name, make in impls.items():
            try:
                fn = make()
                out = fn(q, k, v, causal)
                tm = _bench(lambda: fn(q, k, v, causal), f"fwd {name} N={n} D={d}")
                t = tm.median_s
                row = dict(kind="fwd", impl=name, N=n, D=d, B=b, H=h, Hkv=hkv, causal=causal, ms=t * 1e3,
                           tflops=flops / t / 1e12, **_conditions(tm))
                if name.startswith("fa2lab"):
                    e_ours, e_sdpa = _check_rows(out, ref, q, k, v, causal)
                    row.update(err=e_ours, err_sdpa=e_sdpa, exact=within_torch_error(e_ours, e_sdpa, floor=1e-3))
                rows.append(row)
                log(f"fwd {name:<16} N={n:>6} D={d:>3} causal={causal!s:<5} {t * 1e3:8.3f} ms {flops / t / 1e12:7.1f} TFLOP/s")
            except Exception as exc:  # a backend that cannot run this shape is reported, not fatal
                rows.append(dict(kind="fwd", impl=name, N=n, D=d, causal=causal, error=str(exc)[:200]))
                log(f"fwd {name:<16} N={n:>6} D={d:>3}: {type(exc).__name__}: {str(exc)[:120]}")
        if with_bwd:
            do = torch.randn_like(q)
            bwd_impls = [("fa2lab triton", _fa2lab), ("sdpa flash", _sdpa(SDPBackend.FLASH_ATTENTION)),
                         ("sdpa cudnn", _sdpa(SDPBackend.CUDNN_ATTENTION))]
            if case in portable_cases:
                bwd_impls.append(("fa2lab portable", _fa2lab_portable))
            for name, fn in bwd_impls:
                try:
                    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                    out = fn(*leaves, causal)
                    tm = _bench(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True), f"bwd {name} N={n}")
                    t = tm.median_s
                    rows.append(dict(kind="bwd", impl=name, N=n, D=d, B=b, H=h, Hkv=hkv, causal=causal, ms=t * 1e3,
                                     tflops=2.5 * flops / t / 1e12, **_conditions(tm)))
                    log(f"bwd {name:<16} N={n:>6} D={d:>3} causal={causal!s:<5} {t * 1e3:8.3f} ms {2.5 * flops / t / 1e12:7.1f} TFLOP/s")
                except Exception as exc:
                    rows.append(dict(kind="bwd", impl=name, N=n, D=d, causal=causal, error=str(exc)[:200]))
                    log(f"bwd {name:<16} N={n:>6}: {type(exc).__name__}: {str(exc)[:120]}")
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def decode(cases, dtype=torch.bfloat16, log=print):
    rows = []
    for b, hq, hkv, n, d in cases:
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=dtype) for _ in range(2))
        seqlens = torch.full((b,), n, dtype=torch.int32, device="cuda")
        nbytes = 2 * b * hkv * n * d * k.element_size()  # K and V read once
        plan = fa2lab.decode_plan(q, k, v, cache_seqlens=seqlens)  # the public call, checked once
        impls = {f"fa2lab decode_attention plan (splits={plan.num_splits})":
                 lambda: fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, plan=plan),
                 "sdpa flash": lambda: _sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v, False),
                 "sdpa cudnn": lambda: _sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v, False),
                 "sdpa math": lambda: _sdpa(SDPBackend.MATH)(q, k, v, False)}
        ref = impls["sdpa math"]()
        for name, fn in impls.items():
            try:
                out = fn()
                tm = _bench(fn, f"decode {name} B={b} L={n}")
                t = tm.median_s
                row = dict(kind="decode", impl=name, B=b, Hq=hq, Hkv=hkv, L=n, D=d, us=t * 1e6, tbps=nbytes / t / 1e12,
                           **_conditions(tm))
                if name.startswith("fa2lab"):
                    truth = _sdpa(SDPBackend.MATH)(q.double(), k.double(), v.double(), False)
                    row.update(err=(out.double() - truth).abs().max().item(),
                               err_sdpa=(ref.double() - truth).abs().max().item())
                rows.append(row)
                log(f"decode {name:<26} B={b:>3} L={n:>6} {t * 1e6:9.1f} us {nbytes / t / 1e12:6.2f} TB/s")
            except Exception as exc:
                rows.append(dict(kind="decode", impl=name, B=b, L=n, error=str(exc)[:200]))
                log(f"decode {name:<26} B={b} L={n}: {type(exc).__name__}: {str(exc)[:120]}")
        del q, k, v
        torch.cuda.empty_cache()
    return rows


FWD_CASES = [(1024, 128, False), (4096, 128, False), (16384, 128, False), (4096, 64, False),
             (1024, 128, True), (4096, 128, True), (16384, 128, True)]
# The table of issue 15 (Hopper kernels against cuDNN): D = 64 / 128 / 256, full and causal, GQA.
HOPPER_CASES = [(1024, 128, False), (4096, 128, False), (16384, 128, False), (4096, 64, False),
                (4096, 256, False), (1024, 128, True), (4096, 128, True), (16384, 128, True), (4096, 64, True),
                (4096, 256, True), (4096, 128, True, 32, 8), (8192, 128, False, 32, 4)]
PORTABLE_CASES = [(4096, 128, False), (4096, 128, True), (4096, 256, False)]
DECODE_CASES = [(1, 32, 8, 32768, 128), (8, 32, 8, 8192, 128), (1, 32, 32, 131072, 128), (64, 32, 8, 4096, 128)]


def hopper_table(rows) -> str:
    """Issue 15's table from a run's rows: TFLOP/s per implementation, fa2lab / cuDNN, forward and (when
    timed) backward, every figure from the same process."""
    def label(r):
        gqa = f" GQA {r['H']}:{r['Hkv']}" if r.get("Hkv", r.get("H")) != r.get("H") else ""
        return f"N={r['N']} D={r['D']} {'causal' if r['causal'] else 'full'}{gqa}"

    cols = [("fa2lab triton", "fa2lab"), ("fa2lab portable", "portable"), ("sdpa flash", "SDPA flash"),
            ("sdpa cudnn", "cuDNN"), ("sdpa efficient", "efficient"), ("flex (compiled)", "Flex")]
    got = {}
    for r in rows:
        if "tflops" in r:
            got[(r["kind"], label(r), r["impl"])] = r
    cases = list(dict.fromkeys(label(r) for r in rows if r.get("kind") == "fwd" and "tflops" in r))
    kinds = [k for k in ("fwd", "bwd") if any(key[0] == k for key in got)]
    head = ["case"]
    for k in kinds:
        head += [f"{name} {k}" for _, name in cols] + [f"fa2lab / cuDNN {k}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        cells = [c]
        for k in kinds:
            vals = {impl: got.get((k, c, impl)) for impl, _ in cols}
            cells += [f"{vals[impl]['tflops']:.0f}{'' if vals[impl].get('exact', True) else ' (inexact)'}"
                      if vals[impl] else "-" for impl, _ in cols]
            ours, ref = vals["fa2lab triton"], vals["sdpa cudnn"]
            cells.append(f"{ours['tflops'] / ref['tflops']:.2f}" if ours and ref else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    from fa2lab.measure.versions import versions

    return dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name(0), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, driver=versions()["driver"],
                python=platform.python_version(), fa2lab_commit=commit or "unknown")


def save_results(folder: Path, prefix: str, payload: dict) -> Path:
    """Write `folder/prefix-YYYYMMDD-HHMMSS.json` (names sort by time: fa2lab.viz.gpu reads the newest)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {path}")
    return path


def parse_fwd_case(text: str) -> tuple[int, int, bool]:
    """'4096,128,causal' -> (N, D, causal): a forward/backward shape of this benchmark (B*N = 32k
    tokens, H*D = 2048, as in the FA2 paper)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()) or parts[2] not in ("full", "causal"):
        raise ValueError(f"forward case {text!r}: expected 'N,D,full' or 'N,D,causal', e.g. '4096,128,causal'")
    n, d = int(parts[0]), int(parts[1])
    if n < 1 or d < 1 or 2048 % d:
        raise ValueError(f"forward case {text!r}: N >= 1 and D dividing 2048 (H = 2048 / D), got N={n}, D={d}")
    return n, d, parts[2] == "causal"


def parse_decode_case(text: str) -> tuple[int, int, int, int, int]:
    """'1,32,8,32768,128' -> (B, Hq, Hkv, L, D): one query token against a cache of L tokens."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"decode case {text!r}: expected five positive integers 'B,Hq,Hkv,L,D', e.g. '1,32,8,32768,128'")
    b, hq, hkv, n, d = map(int, parts)
    if hq % hkv:
        raise ValueError(f"decode case {text!r}: Hq={hq} must be a multiple of Hkv={hkv}")
    return b, hq, hkv, n, d


def run(quick: bool = False, with_bwd: bool = True, only: str | None = None, log=print, hopper: bool = False,
        flex: bool = True, *, fwd_cases=None, decode_cases=None, impls=None, flex_cases=None,
        portable: bool = True) -> dict:
    """The benchmark on the CUDA device here, in the results files' format: environment, peaks and
    rows. quick: two forward shapes and one decode shape, no FlexAttention (its torch.compile takes
    minutes). hopper: issue 15's table (HOPPER_CASES), the portable kernels beside on PORTABLE_CASES.
    flex: include FlexAttention. fwd_cases ('N,D,full|causal') and decode_cases ('B,Hq,Hkv,L,D'),
    when given, replace those lists (empty: none of that kind); impls: the forward implementations
    (names of FWD_IMPLS); flex_cases ('N,D,full|causal'): FlexAttention on these only; portable: time the
    portable kernels beside on PORTABLE_CASES (with hopper). Cases are checked before the device is
    touched. Changes no module state."""
    fwd = [parse_fwd_case(c) for c in fwd_cases] if fwd_cases is not None else None
    dec = [parse_decode_case(c) for c in decode_cases] if decode_cases is not None else None
    flex_only = [parse_fwd_case(c) for c in flex_cases] if flex_cases is not None else None
    unknown = [i for i in impls or () if i not in FWD_IMPLS]
    if unknown:
        raise ValueError(f"unknown implementations {unknown}; known: {list(FWD_IMPLS)}")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: fa2lab.bench.gpu.run needs a GPU (torch.cuda.is_available() is False)")
    if impls is not None:
        chosen = {k: v for k, v in FWD_IMPLS.items() if k in impls}
    else:
        chosen = {k: v for k, v in FWD_IMPLS.items() if not ((quick or not flex) and k == "flex (compiled)")}
    env = environment()
    pk = peaks()
    log(f"peaks: bf16 matmul {pk['matmul_tflops']:.0f} TFLOP/s, copy {pk['copy_tbps']:.2f} TB/s")
    rows = []
    if only in (None, "fwd"):
        if fwd is None:
            fwd = FWD_CASES[1:2] + FWD_CASES[5:6] if quick else HOPPER_CASES if hopper else FWD_CASES
        rows += forward_backward(fwd, with_bwd=with_bwd, pk=pk, log=log, impls=chosen, flex_cases=flex_only,
                                 portable_cases=PORTABLE_CASES if hopper and portable else ()) if fwd else []
    if only in (None, "decode"):
        if dec is None:
            dec = DECODE_CASES[:1] if quick else DECODE_CASES
        rows += decode(dec, log=log) if dec else []
    return dict(environment=env, peaks=pk, rows=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fa2lab bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a few shapes, no FlexAttention")
    p.add_argument("--no-bwd", action="store_true")
    p.add_argument("--only", choices=["fwd", "decode"], default=None)
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--hopper", action="store_true",
                   help="issue 15's table (D = 64/128/256, GQA), the portable kernels timed beside on three shapes")
    p.add_argument("--no-flex", action="store_true", help="leave out FlexAttention (its compiles take minutes)")
    p.add_argument("--flex-cases", default=None,
                   help="FlexAttention on these cases only, 'N,D,full|causal;...' (e.g. '4096,128,full;4096,128,causal')")
    p.add_argument("--no-portable", action="store_true", help="--hopper without the portable kernels beside")
    args = p.parse_args(argv)
    results = run(quick=args.quick, with_bwd=not args.no_bwd, only=args.only, hopper=args.hopper,
                  flex=not args.no_flex, portable=not args.no_portable,
                  flex_cases=args.flex_cases.split(";") if args.flex_cases else None)
    print(results["environment"])
    save_results(args.out, "gpu", results)
    print(hopper_table(results["rows"]))
    print_process_warning()
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
