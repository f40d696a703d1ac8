"""09 attention variants: how each one changes a row's probabilities and the online softmax.

Figures draw what the package computes (`fa2lab.attention_probs`, `fa2lab.dropout_mask`, the
tiled backend's tracer); nothing here re-implements a variant.
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

import fa2lab
from fa2lab.viz.style import STATE_COLORS, f32, styled


def row_probabilities(q, k, row: int, head: int = 0, **options) -> dict:
    """P of one query row with and without the options: {"keys", "plain", "variant", "sink_mass",
    "logits_max"} as lists (the variant's sink takes 1 - sum(P) of the row)."""
    plain = fa2lab.attention_probs(q, k, rows=[row], causal=options.get("causal", False),
                                   window_size=options.get("window_size", (-1, -1)))[0, head, 0]
    variant = fa2lab.attention_probs(q, k, rows=[row], **options)[0, head, 0]
    return {"keys": list(range(k.shape[2])), "plain": plain.tolist(), "variant": variant.tolist(),
            "sink_mass": float(1 - variant.sum()) if options.get("sinks") is not None else 0.0}


def row_probabilities_figure(rows: dict, title: str) -> go.Figure:
    """One row's probabilities over the keys, plain against the variant."""
    fig = go.Figure([go.Scatter(x=rows["keys"], y=f32(rows["plain"]), name="plain softmax", mode="lines"),
                     go.Scatter(x=rows["keys"], y=f32(rows["variant"]), name="with the variant", mode="lines")])
    if rows["sink_mass"]:
        title += f" - the sink absorbs {rows['sink_mass']:.1%} of the mass"
    return styled(fig, title=title, xaxis_title="key j", yaxis_title="P[row, j]")


def softcap_figure(scores, softcap: float) -> go.Figure:
    """Scaled scores against the logits soft-capping makes of them: bounded by +-softcap."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten().sort().values
    capped = softcap * torch.tanh(scores / softcap)
    fig = go.Figure([go.Scatter(x=f32(scores), y=f32(scores), name="no cap", mode="lines", line=dict(dash="dot")),
                     go.Scatter(x=f32(scores), y=f32(capped), name=f"softcap={softcap:g}", mode="lines")])
    return styled(fig, title=f"soft-capping bounds the logits to (-{softcap:g}, {softcap:g})",
                  xaxis_title="softmax_scale * q.k", yaxis_title="logit")


def alibi_figure(q, k, row: int, slopes: list[float], causal: bool = True) -> go.Figure:
    """A row's probabilities for several ALiBi slopes (head 0): the decay with distance."""
    fig = go.Figure()
    for s in slopes:
        slope = torch.full((q.shape[1],), float(s), dtype=torch.float32)
        p = fa2lab.attention_probs(q, k, rows=[row], causal=causal, alibi_slopes=slope)[0, 0, 0]
        fig.add_trace(go.Scatter(x=list(range(k.shape[2])), y=f32(p.tolist()), name=f"slope {s:g}", mode="lines"))
    return styled(fig, title=f"ALiBi: row {row}'s attention decays with the distance |i + Nk - Nq - j|",
                  xaxis_title="key j", yaxis_title="P[row, j]")


def dropout_mask_figure(mask: torch.Tensor, p: float) -> go.Figure:
    """The keep mask of one head (the one the call with the same generator state applies)."""
    m = mask[0, 0].to(torch.float32)
    fig = go.Figure(go.Heatmap(z=m.tolist(), colorscale=[[0, "#eeeeee"], [1, "#4c78a8"]], showscale=False))
    return styled(fig, title=f"dropout p={p:g}: {m.mean().item():.1%} kept (expected {1 - p:.0%})",
                  xaxis_title="key j", yaxis_title="query i", yaxis_autorange="reversed")


def mask_tiles_figure(block_mask) -> go.Figure:
    """A block mask's tiles: skipped (never computed), full (no element mask), partial."""
    grid = block_mask.grid()
    codes = {"skipped": 0, "partial": 1, "full": 2}
    z = [[codes[s] for s in row] for row in grid]
    scale = [[0, STATE_COLORS["skipped"]], [0.5, STATE_COLORS["partial"]], [1, STATE_COLORS["full"]]]
    fig = go.Figure(go.Heatmap(z=z, colorscale=scale, zmin=0, zmax=2, text=grid, hoverinfo="text", showscale=False))
    return styled(fig, title=f"mask_mod tiles ({block_mask.block_q} x {block_mask.block_k}): "
                             f"{block_mask.sparsity():.0%} skipped", xaxis_title="key tile", yaxis_title="query tile",
                  yaxis_autorange="reversed")


def variants_overview(q, k, row: int, softcap: float, slope: float, sink: float) -> go.Figure:
    """The three logit variants side by side on one row: soft-capping, ALiBi, a sink."""
    hq = q.shape[1]
    cases = {"softcap": dict(softcap=softcap), "ALiBi": dict(alibi_slopes=torch.full((hq,), slope)),
             "sink": dict(sinks=torch.full((hq,), sink, dtype=q.dtype))}
    fig = make_subplots(rows=1, cols=3, subplot_titles=list(cases), shared_yaxes=True)
    for c, (name, opts) in enumerate(cases.items(), start=1):
        rows = row_probabilities(q, k, row, causal=True, **opts)
        fig.add_trace(go.Scatter(x=rows["keys"], y=f32(rows["plain"]), name="plain", mode="lines",
                                 line=dict(color="#888888"), showlegend=c == 1), row=1, col=c)
        fig.add_trace(go.Scatter(x=rows["keys"], y=f32(rows["variant"]), name="variant", mode="lines",
                                 line=dict(color="#f58518"), showlegend=c == 1), row=1, col=c)
    return styled(fig, title=f"row {row}: softcap={softcap:g}, slope={slope:g}, sink={sink:g}")
