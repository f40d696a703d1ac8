"""Figures for the notebooks. Each function returns a plotly Figure, so tests can check it
without a browser; nothing here changes global state on import."""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from fa2lab.tiled.trace import TileTracer

STATE_CODE = {"skipped": 0, "full": 1, "partial": 2}
STATE_COLORS = [[0.0, "#eeeeee"], [0.33, "#eeeeee"], [0.34, "#4c78a8"], [0.66, "#4c78a8"],
                [0.67, "#f58518"], [1.0, "#f58518"]]


def use_notebook_renderer() -> None:
    """Render figures as plotly JSON (small outputs that JupyterLab draws natively)."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype"


def tile_schedule_figure(tracer: TileTracer, title: str | None = None) -> go.Figure:
    """Heatmap of the (query tile x key tile) grid: skipped / full / partially masked, with the
    order in which the forward pass visited each computed tile written in its cell."""
    grid = tracer.grid()
    order = [[""] * len(row) for row in grid]
    for s in tracer.steps:
        if s.order >= 0:
            order[s.q_tile][s.k_tile] = str(s.order)
    z = [[STATE_CODE[state] for state in row] for row in grid]
    hover = [[f"q tile {i}, k tile {j}: {state}" for j, state in enumerate(row)] for i, row in enumerate(grid)]
    fig = go.Figure(go.Heatmap(z=z, text=order, texttemplate="%{text}", hovertext=hover, hoverinfo="text",
                               colorscale=STATE_COLORS, zmin=0, zmax=2, showscale=False, xgap=1, ygap=1))
    counts = tracer.counts()
    shape = tracer.shape
    fig.update_layout(
        title=title or (f"Tile schedule: Nq={shape['Nq']}, Nk={shape['Nk']}, Br={shape['Br']}, Bc={shape['Bc']}"
                        f" - {counts['full']} full, {counts['partial']} masked, {counts['skipped']} skipped"),
        xaxis_title="key tile j", yaxis_title="query tile i", yaxis_autorange="reversed",
        width=560, height=480, margin=dict(l=60, r=20, t=60, b=50))
    return fig


def running_stats_figure(tracer: TileTracer, q_tile: int = 0, row: int = 0, head: int = 0) -> go.Figure:
    """Running max m and running sum l of one query row after each key tile it visited."""
    steps = [s for s in tracer.steps if s.q_tile == q_tile and s.order >= 0 and s.m is not None]
    if not steps:
        raise ValueError(f"query tile {q_tile} has no recorded steps; was the tracer made with "
                         f"record_stats=True and is the tile within the {len(tracer.grid())} query tiles?")
    x = [s.k_tile for s in steps]
    m = [s.m[0, head, row].item() for s in steps]
    l = [s.l[0, head, row].item() for s in steps]
    fig = go.Figure()
    fig.add_scatter(x=x, y=m, mode="lines+markers", name="running max m")
    fig.add_scatter(x=x, y=l, mode="lines+markers", name="running sum l", yaxis="y2")
    fig.update_layout(title=f"Online softmax state of query {steps[0].q_range[0] + row} (head {head})",
                      xaxis_title="after key tile j", yaxis_title="m", width=620, height=380,
                      yaxis2=dict(title="l", overlaying="y", side="right"), margin=dict(t=60))
    return fig


def splitk_merge_figure(q, k, v, num_splits: int, head: int = 0) -> go.Figure:
    """Split-K decoding of one query row: each split's log-sum-exp, its weight exp(lse_s - lse) in
    the merge, and the error of the merged output as the splits are merged one by one."""
    import math

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
    fig.update_layout(width=900, height=380, title=f"Split-K: {outs.shape[0]} splits of a {k.shape[2]}-token cache"
                      f" (weights sum to {weights.sum().item():.6f}; {math.ceil(k.shape[2] / outs.shape[0])} keys/split)")
    return fig


def unified_max_figure(q, k, v, phis) -> go.Figure:
    """Error of FlashDecoding++'s unified-max decode (no fallback) against the exact result, for
    each fixed reference phi, with the range check's verdict: where it is exact and where it breaks."""
    from fa2lab.decode.readers import DenseReader
    from fa2lab.decode.splitk import splitk_decode
    from fa2lab.reference import attention_ref

    seqlens = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32)
    truth = attention_ref(q.double(), k.double(), v.double(), causal=True)
    errs, ok = [], []
    for phi in phis:
        out, _, stats = splitk_decode(q, DenseReader(k, v), seqlens, scale=q.shape[-1] ** -0.5, left=-1, right=0,
                                      num_splits=4, unified_max=float(phi), fallback=False)
        err = (out.double() - truth).abs().max().item()
        errs.append(err if err == err else float("inf"))  # NaN (inf / inf) counts as broken
        ok.append(stats.exact)
    shown = [min(e, 1e3) for e in errs]
    fig = go.Figure()
    fig.add_scatter(x=list(phis), y=shown, mode="lines+markers", name="max error (capped at 1e3)",
                    marker=dict(color=["#4c78a8" if o else "#e45756" for o in ok]))
    fig.update_layout(title="Unified max: error against phi (blue: range check passes; red: fa2lab would recompute)",
                      xaxis_title="phi (fixed softmax reference)", yaxis_title="max |out - exact|",
                      yaxis_type="log", width=760, height=400)
    return fig
