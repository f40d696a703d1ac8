"""Figures for the notebooks. Each function returns a plotly Figure, so tests can check it
without a browser; nothing here changes global state on import."""

from __future__ import annotations

import plotly.graph_objects as go

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
