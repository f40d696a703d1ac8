"""Notebook 11's measurements: the error of every backend against float64 in fp32, fp16 and bf16 as
N and the logit scale grow, judged by the 2x rule against PyTorch's own same-dtype error, and the
error each rounding step adds.

    error_rows(ns, logit_scales, dtypes, backends)   max |out - float64 truth| per case, and torch's own
    error_sources(n, dtype, logit_scale)              the error added by each rounding step, one at a time

The logit scale multiplies Q: with unit-variance Q and K, the logits Q K^T / sqrt(D) then have
standard deviation `logit_scale`, so a larger scale means a peakier softmax. fa2lab.viz.numerics
draws these rows.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RULE = 2.0  # fa2lab's error may be at most RULE x PyTorch's own same-dtype error (CONVENTIONS.md, 9)


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {list(DTYPES)}")
    return DTYPES[name]


def _inputs(n, heads, head_dim, logit_scale, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g, dtype=torch.float64) for _ in range(3))  # (B, H, N, D)
    return q * logit_scale, k, v


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def error_rows(ns, logit_scales, dtypes=("float32", "float16", "bfloat16"), backends=("reference", "tiled", "sdpa"),
               *, heads: int = 2, head_dim: int = 32, causal: bool = True, seed: int = 0) -> list[dict]:
    """One row per (N, logit scale, dtype, backend): err (max abs against float64 attention),
    torch_err (attention_ref computing in that dtype: what plain PyTorch gets), ratio = err /
    torch_err and `within_rule` (err <= 2 torch_err + eps/4). A backend that cannot run a case
    gets err None and the reason."""
    from fa2lab.api import attention
    from fa2lab.backends import BACKENDS, Case
    from fa2lab.reference import attention_ref

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {list(BACKENDS)}")
    rows = []
    for n in ns:
        for scale in logit_scales:
            q64, k64, v64 = _inputs(n, heads, head_dim, scale, seed)
            truth = attention_ref(q64, k64, v64, causal=causal)
            for name in dtypes:
                dt = _dtype(name)
                q, k, v = (t.to(dt) for t in (q64, k64, v64))
                torch_err = _err(attention_ref(q, k, v, causal=causal, upcast=False), truth)
                floor = torch.finfo(dt).eps / 4
                for backend in backends:
                    why = BACKENDS[backend].unsupported(Case.of(q, k, v, causal, (-1, -1), False))
                    err = None if why else _err(attention(q, k, v, causal=causal, backend=backend), truth)
                    rows.append(dict(N=n, logit_scale=float(scale), dtype=name, backend=backend, err=err,
                                     torch_err=torch_err, ratio=err / torch_err if err is not None and torch_err else None,
                                     within_rule=None if err is None else err <= RULE * torch_err + floor, skipped=why))
    return rows


def error_sources(n: int = 256, dtype: str = "bfloat16", logit_scale: float = 1.0, *, heads: int = 2,
                  head_dim: int = 32, causal: bool = True, block: int = 64, seed: int = 0) -> list[dict]:
    """The error against float64 after each rounding step, one added at a time:

    1. inputs rounded to `dtype`, everything else exact (float64)
    2. + P rounded to `dtype` before the second matmul (P V), as FA2 kernels feed tensor cores
    3. plain PyTorch in `dtype`: also S, the softmax and both matmuls' accumulations in `dtype`
    4. fa2lab tiled: inputs in `dtype`, fp32 accumulation, the online softmax over key tiles of `block`
    5. fa2lab tiled in fp32 on the rounded inputs, tiles of `block` against one of N: the order of
       accumulation alone (fp32 rounding differences, far below 1-3)
    """
    from fa2lab.reference import attention_ref
    from fa2lab.tiled import tiled_attention

    dt = _dtype(dtype)
    q64, k64, v64 = _inputs(n, heads, head_dim, logit_scale, seed)
    truth = attention_ref(q64, k64, v64, causal=causal)
    qr, kr, vr = (t.to(dt).double() for t in (q64, k64, v64))  # rounded, held exactly in float64
    s = qr @ kr.transpose(-1, -2) * head_dim ** -0.5  # (B, H, N, N)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1)
    rows = [dict(source="inputs rounded", err=_err(p @ vr, truth)),
            dict(source="+ P rounded before P V", err=_err(p.to(dt).double() @ vr, truth))]
    q, k, v = (t.to(dt) for t in (q64, k64, v64))
    rows.append(dict(source=f"PyTorch naive in {dtype}", err=_err(attention_ref(q, k, v, causal=causal, upcast=False),
                                                                  truth)))
    rows.append(dict(source=f"fa2lab tiled, {dtype} in, fp32 acc", err=_err(
        tiled_attention(q, k, v, causal=causal, block_q=block, block_k=block), truth)))
    q32, k32, v32 = (t.float() for t in (qr, kr, vr))
    small = tiled_attention(q32, k32, v32, causal=causal, block_q=block, block_k=block)
    one = tiled_attention(q32, k32, v32, causal=causal, block_q=n, block_k=n)
    rows.append(dict(source=f"fp32 order: tiles of {block} vs one of {n}", err=_err(small, one)))
    return rows
