"""Split-K decoding (notebook 04): partial (out, lse) pairs merging into the exact result, latency
against num_splits and cache length, and where FlashDecoding++'s unified max is exact."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from fa2lab.viz.style import BAD, GOOD, styled


def splitk_merge_figure(q, k, v, num_splits: int, head: int = 0) -> go.Figure:
    """Split-K decoding of one query row: each split's log-sum-exp, its weight exp(lse_s - lse) in
    the merge, and the error of the merged output as the splits are merged one by one."""
    from fa2lab.decode.merge import merge_states_stack
    from fa2lab.decode.readers import DenseReader
    from fa2lab.decode.splitk import splitk_decode
    from fa2lab.reference import attention_ref

    seqlens = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32)
    out, lse, _, (outs, lses) = splitk_decode(q, DenseReader(k, v), seqlens, scale=q.shape[-1] ** -0.5,
                                              left=-1, right=0, num_splits=num_splits, return_partials=True)
    truth = attention_ref(q.double(), k.double(), v.double(), causal=True)[0, head, 0]
    part_lse = lses[:, 0, head, 0]  # (S,)
    weights = (part_lse - lse[0, head, 0]).exp()
    errors = []
    for s in range(1, outs.shape[0] + 1):
        merged, _ = merge_states_stack(outs[:s, 0, head, 0:1], lses[:s, 0, head, 0:1])
        errors.append((merged[0].double() - truth).abs().max().item())
    fig = make_subplots(rows=1, cols=2, subplot_titles=("each split's lse and merge weight",
                                                        "max |merged - exact| after s splits"))
    splits = list(range(outs.shape[0]))
    fig.add_bar(x=splits, y=part_lse.tolist(), name="lse of split", row=1, col=1)
    fig.add_scatter(x=splits, y=weights.tolist(), name="weight exp(lse_s - lse)", mode="lines+markers",
                    row=1, col=1)
    fig.add_scatter(x=[s + 1 for s in splits], y=[max(e, 1e-18) for e in errors], mode="lines+markers",
                    name="error", row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="split", row=1, col=1)
    fig.update_xaxes(title_text="splits merged", row=1, col=2)
    return styled(fig, width=900, height=380,
                  title=f"Split-K: {outs.shape[0]} splits of a {k.shape[2]}-token cache (weights sum to "
                        f"{weights.sum().item():.6f}; {math.ceil(k.shape[2] / outs.shape[0])} keys/split)")


def unified_max_errors(q, k, v, phis, num_splits: int = 4) -> tuple[list[float], list[bool]]:
    """Max error of the unified-max decode (no fallback) against float64 for each phi, and whether
    fa2lab's range check accepts it. A NaN error (inf / inf) counts as inf."""
    from fa2lab.decode.readers import DenseReader
    from fa2lab.decode.splitk import splitk_decode
    from fa2lab.reference import attention_ref

    seqlens = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32)
    truth = attention_ref(q.double(), k.double(), v.double(), causal=True)
    errs, ok = [], []
    for phi in phis:
        out, _, stats = splitk_decode(q, DenseReader(k, v), seqlens, scale=q.shape[-1] ** -0.5, left=-1, right=0,
                                      num_splits=num_splits, unified_max=float(phi), fallback=False)
        err = (out.double() - truth).abs().max().item()
        errs.append(err if err == err else float("inf"))
        ok.append(stats.exact)
    return errs, ok


def unified_max_figure(q, k, v, phis) -> go.Figure:
    """Error of FlashDecoding++'s unified-max decode (no fallback) against the exact result, for
    each fixed reference phi, with the range check's verdict: where it is exact and where it breaks."""
    errs, ok = unified_max_errors(q, k, v, phis)
    shown = [min(e, 1e3) for e in errs]
    fig = go.Figure()
    fig.add_scatter(x=list(phis), y=shown, mode="lines+markers", name="max error (capped at 1e3)",
                    marker=dict(color=[GOOD if o else BAD for o in ok]))
    return styled(fig, title="Unified max: error against phi (blue: range check passes; red: fa2lab would recompute)",
                  xaxis_title="phi (fixed softmax reference)", yaxis_title="max |out - exact|",
                  yaxis_type="log", width=760, height=400)


def decode_latency(lengths, splits=(1, 2, 4, 8), *, heads_q: int = 8, heads_kv: int = 2, head_dim: int = 64,
                   budget_s: float = 0.1) -> list[dict]:
    """Deprecated: `fa2lab.bench.decode.run(lengths=..., splits=...)` (figures only draw)."""
    import warnings

    from fa2lab.bench.decode import run

    warnings.warn("fa2lab.viz.decode_latency moved to fa2lab.bench.decode.run", DeprecationWarning, stacklevel=2)
    return run(lengths=tuple(lengths), batch=1, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
               splits=tuple(splits), budget_s=budget_s, progress=lambda line: None)


def decode_latency_figure(rows: list[dict]) -> go.Figure:
    """Left: latency against cache length for every implementation (log-log). Right: latency
    against num_splits for every cache length, torch SDPA as a dashed reference."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("latency against cache length", "latency against num_splits"))
    impls = list(dict.fromkeys(r["impl"].split(" (")[0] for r in rows))
    for impl in impls:
        pts = [r for r in rows if r["impl"].split(" (")[0] == impl]
        fig.add_scatter(x=[r["L"] for r in pts], y=[r["us"] for r in pts], mode="lines+markers", name=impl,
                        row=1, col=1)
    palette = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2"]
    for i, length in enumerate(dict.fromkeys(r["L"] for r in rows)):
        color = palette[i % len(palette)]
        fixed = [r for r in rows if r["L"] == length and r["impl"].startswith("fa2lab splits=")]
        fig.add_scatter(x=[r["num_splits"] for r in fixed], y=[r["us"] for r in fixed], mode="lines+markers",
                        name=f"split-K, L={length}", line=dict(color=color), row=1, col=2)
        sdpa = [r["us"] for r in rows if r["L"] == length and r["impl"] == "torch sdpa"]
        if sdpa and fixed:
            xs = [r["num_splits"] for r in fixed]
            fig.add_scatter(x=[min(xs), max(xs)], y=[sdpa[0]] * 2, mode="lines", name=f"sdpa, L={length}",
                            line=dict(color=color, dash="dash"), row=1, col=2)
    fig.update_xaxes(type="log", title_text="cache length L", row=1, col=1)
    fig.update_xaxes(type="log", title_text="num_splits", row=1, col=2)
    fig.update_yaxes(type="log", title_text="us per decode step")
    return styled(fig, title="Decode latency on this machine (one query token)", width=1000, height=420)
