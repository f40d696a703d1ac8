"""The attention call of a Qwen3-0.6B-shaped prefill (B=1, Hq=16, Hkv=8, D=128, causal, bf16) at the
layout transformers hands over (q, k, v as (B, N, H, D) projections seen as (B, H, N, D)), on a GPU:
`fa2lab.attention` with its default forward (the persistent Gluon kernel) against the non-persistent
warp-specialised Gluon kernel, the Triton forward and SDPA's cuDNN / flash backends, kernel time by
triton.testing.do_bench (median), TFLOP/s = 4 * B * Hq * N^2 * D / 2. Tells whether a model-level
prefill gap at a length is the attention kernel.
--profile: then cProfile of 500 default calls at N=1024 (BNHD), the 18 largest own times.
Run: PYTHONPATH=. python experiments/model_shape_attention_gpu.py [N ...] [--profile]"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import fa2lab
from fa2lab.kernels import hopper_config

lengths = [int(a) for a in sys.argv[1:] if a.isdigit()] or [1024, 4096, 16384]
hq, hkv, d = 16, 8, 128
ws = {k: v for k, v in hopper_config.GLUON_FWD[128].items() if k != "PERSISTENT"}


def fa2lab_call(q, k, v):
    return fa2lab.attention(q, k, v, causal=True, backend="triton")


def with_tile(tile):
    def call(q, k, v):
        old = hopper_config.GLUON_FWD[128]
        hopper_config.GLUON_FWD[128] = tile
        try:
            return fa2lab_call(q, k, v)
        finally:
            hopper_config.GLUON_FWD[128] = old
    return call


def triton_fwd(q, k, v):
    import os
    os.environ["FA2LAB_HOPPER_FWD"] = "triton"
    try:
        return fa2lab_call(q, k, v)
    finally:
        del os.environ["FA2LAB_HOPPER_FWD"]


def sdpa(backend):
    def call(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return call


impls = {"fa2lab (persistent)": fa2lab_call, "fa2lab ws": with_tile(ws), "fa2lab triton fwd": triton_fwd,
         "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION)}


def host_us(fn, q, k, v, calls=200):
    """Wall time per call of `calls` back-to-back calls, one sync at the end: the host's cost per call
    where it exceeds the kernel's."""
    import time
    for _ in range(10):
        fn(q, k, v)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(q, k, v)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


print("TFLOP/s by do_bench (max error against cuDNN); 'us/call': back-to-back calls, one sync")
print("| N | layout | " + " | ".join(impls) + " |")
print("|---" * (len(impls) + 2) + "|")
with torch.no_grad():
    for n, layout in [(n, lay) for n in lengths for lay in ("BNHD", "BHND")]:
        g = torch.Generator(device="cuda").manual_seed(0)
        if layout == "BNHD":  # transformers' projections
            make = lambda h: torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)  # noqa: E731
        else:
            make = lambda h: torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
        q, k, v = make(hq), make(hkv), make(hkv)
        ref = sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v)
        cells = []
        for name, fn in impls.items():
            try:
                out = fn(q, k, v)
                err = (out.float() - ref.float()).abs().max().item()
                ms = do_bench(lambda: fn(q, k, v), warmup=25, rep=200)
                cells.append(f"{4 * hq * n * n * d / 2 / ms / 1e9:.0f} ({err:.1e}; {host_us(fn, q, k, v):.0f} us/call)")
            except Exception as exc:  # a backend that refuses the shape
                cells.append(f"{type(exc).__name__}")
        print(f"| {n} | {layout} | " + " | ".join(cells) + " |", flush=True)

if "--profile" in sys.argv:
    import cProfile
    import pstats
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 1024, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
               for h in (hq, hkv, hkv))
    with torch.no_grad():
        for _ in range(20):
            fa2lab_call(q, k, v)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            fa2lab_call(q, k, v)
        torch.cuda.synchronize()
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
