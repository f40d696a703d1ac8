"""Peak memory and time against N for naive, tiled and torch SDPA attention (notebook 03),
measured on this machine and set next to the cost model's prediction.

Measurement reuses the CPU benchmark's calls (fa2lab.bench.cpu) and accounting
(fa2lab.measure.memory.peak_extra_bytes: the most resident memory a call added); the model is
fa2lab.cost (memory.peak_extra_bytes, roofline.cpu_tiled_forward) where that package exists.
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from fa2lab.bench import cpu
from fa2lab.measure import memory
from fa2lab.measure.timing import median_seconds
from fa2lab.tiled import tiled_attention
from fa2lab.viz.style import styled

IMPL_COLORS = {"tiled": "#4c78a8", "sdpa": "#54a24b", "naive": "#e45756"}
# The cost model's name for each implementation's memory: torch's CPU SDPA kernel is itself a
# flash-style tiled kernel (output + log-sum-exp per row).
MODEL_ALGO = {"naive": "naive", "tiled": "tiled_cpu", "sdpa": "fa2"}


def measure_scaling(ns, impls=("tiled", "sdpa", "naive"), *, mode: str = "fwd", heads: int = 4, head_dim: int = 64,
                    causal: bool = True, block: int = 256, budget_s: float = 0.2, naive_max_n: int = 4096,
                    seed: int = 0, progress=None) -> list[dict]:
    """Median time and peak extra memory of each (impl, N), fp32, B=1. Rows have the columns of
    fa2lab.bench.cpu (impl, mode, N, seconds, peak_extra_mib, gflops), so cpu.fit_exponent reads
    them. Sets glibc's timing thresholds (fa2lab.measure.memory.configure_for_timing) first."""
    unknown = [i for i in impls if i not in cpu.IMPLS]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {list(cpu.IMPLS)}")
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"expected mode 'fwd' or 'fwd+bwd', got {mode!r}")
    memory.configure_for_timing()
    calls = dict(cpu.IMPLS, tiled=lambda q, k, v, c: tiled_attention(q, k, v, causal=c, block_q=block,
                                                                     block_k=block))
    rows = []
    for n in ns:
        g = torch.Generator().manual_seed(seed)
        shape = (1, heads, n, head_dim)  # (B, H, N, D)
        q, k, v, do = (torch.randn(shape, generator=g) for _ in range(4))
        for impl in impls:
            if impl == "naive" and n > naive_max_n:
                continue
            fn = cpu._make_call(calls[impl], q, k, v, do, causal, mode)
            seconds = median_seconds(fn, min_repeats=2, budget_s=budget_s)
            # Other threads' allocations only ever add to a peak: the smaller of two readings is the call's.
            peaks = [p for p in (memory.peak_extra_bytes(fn), memory.peak_extra_bytes(fn)) if p is not None]
            peak = min(peaks) if peaks else None
            flops = cpu.attention_flops(mode, 1, heads, n, head_dim, causal)
            rows.append(dict(impl=impl, mode=mode, N=n, seconds=seconds, gflops=flops / seconds / 1e9,
                             peak_extra_mib=None if peak is None else peak / 2**20))
            if progress:
                progress(f"{impl:>6} {mode} N={n}: {seconds * 1e3:.1f} ms, +{rows[-1]['peak_extra_mib']} MiB")
    return rows


def exponents(rows: list[dict], column: str = "peak_extra_mib") -> dict[str, float | None]:
    """Fitted log-log slope of `column` against N, per implementation (None: fewer than 2 points)."""
    out = {}
    for impl in dict.fromkeys(r["impl"] for r in rows):
        ns = [int(r["N"]) for r in rows if r["impl"] == impl]
        mode = next(r["mode"] for r in rows if r["impl"] == impl)
        out[impl] = cpu.fit_exponent(rows, impl, mode, min(ns), max(ns), column)
    return out


def predicted_scaling(ns, impls=("tiled", "sdpa", "naive"), *, mode: str = "fwd", heads: int = 4,
                      head_dim: int = 64, causal: bool = True, block: int = 256, profile=None) -> list[dict]:
    """The cost model's peak extra memory (every impl it models) and time (tiled forward, from the
    profile: `fa2lab.hardware.detect()` when None) for the same calls. Empty if fa2lab.cost is absent."""
    try:
        from fa2lab.cost.memory import peak_extra_bytes
        from fa2lab.cost.roofline import cpu_tiled_forward
    except ImportError:
        return []
    if profile is None and "tiled" in impls and mode == "fwd":
        from fa2lab.hardware import detect

        profile = detect()
    rows = []
    for n in ns:
        for impl in impls:
            if impl == "tiled" and mode != "fwd":
                mib = None  # fa2lab.cost models the tiled forward's memory only
            else:
                mib = peak_extra_bytes(MODEL_ALGO[impl], 1, heads, n, n, head_dim, elem=4, mode=mode,
                                       block_q=block, block_k=block) / 2**20
            seconds = None
            if impl == "tiled" and mode == "fwd" and profile is not None:
                seconds = cpu_tiled_forward(profile, 1, heads, n, n, head_dim, block_q=block, block_k=block,
                                            causal=causal).time
            rows.append(dict(impl=impl, mode=mode, N=n, seconds=seconds, peak_extra_mib=mib))
    return rows


def scaling_figure(rows: list[dict], predicted: list[dict] | None = None) -> go.Figure:
    """Log-log peak extra memory and time against N, one colour per implementation, the fitted
    exponent in each legend entry; the model's prediction dashed in the same colour."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("peak extra memory (MiB)", "median time (ms)"))
    mem_exp, time_exp = exponents(rows), exponents(rows, "seconds")
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = [r for r in rows if r["impl"] == impl]
        color = IMPL_COLORS.get(impl)
        for col, key, scale, expo in ((1, "peak_extra_mib", 1.0, mem_exp), (2, "seconds", 1e3, time_exp)):
            pts = [(r["N"], r[key] * scale) for r in mine if r[key] is not None]
            slope = expo.get(impl)
            fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                            name=f"{impl} (slope {slope:.2f})" if slope is not None else impl,
                            legendgroup=f"{impl}-{key}", line=dict(color=color), row=1, col=col)
        for col, key, scale in ((1, "peak_extra_mib", 1.0), (2, "seconds", 1e3)):
            pts = [(r["N"], r[key] * scale) for r in predicted or [] if r["impl"] == impl and r[key] is not None]
            if pts:
                fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines",
                                name=f"{impl} model", legendgroup=f"{impl}-{key}",
                                line=dict(color=color, dash="dash"), row=1, col=col)
    fig.update_xaxes(type="log", title_text="N (query = key length)")
    fig.update_yaxes(type="log")
    mode = rows[0]["mode"] if rows else ""
    return styled(fig, title=f"Scaling with N ({mode}); dashed: fa2lab.cost's prediction", width=1000, height=420)
