"""Tile schedules of the tiled FA2 forward, drawn from its tracer (never redrawn by hand).

    trace_schedule(case, ...)  run fa2lab's tiled forward on one of CASES with a TileTracer
    tile_map_figure(blocks)    the traced tiles as rectangles in token coordinates
    tile_cases_figure(...)     every case side by side
    tile_schedule_figure       one traced grid as a heatmap (tile coordinates)
    running_stats_figure       running max m and sum l of one query row, tile after tile
"""

from __future__ import annotations

from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from fa2lab.tiled import tiled_attention
from fa2lab.tiled.trace import TileTracer
from fa2lab.viz.style import STATE_COLORS, styled

STATE_CODE = {"skipped": 0, "full": 1, "partial": 2}
_HEAT_COLORS = [[0.0, STATE_COLORS["skipped"]], [0.33, STATE_COLORS["skipped"]], [0.34, STATE_COLORS["full"]],
                [0.66, STATE_COLORS["full"]], [0.67, STATE_COLORS["partial"]], [1.0, STATE_COLORS["partial"]]]
CASES = ("full", "causal", "window", "gqa", "varlen")
CASE_TITLES = {"full": "full", "causal": "causal", "window": "sliding window", "gqa": "GQA, Nq < Nk",
               "varlen": "varlen (packed)"}
MAX_ORDER_LABELS = 400  # beyond this many tiles the visit-order numbers are unreadable: omit them


@dataclass(frozen=True)
class TracedBlock:
    """One traced tiled call, placed in a (packed) query x key plane."""

    tracer: TileTracer
    q_offset: int = 0  # first query position of this call in the plane (varlen: cu_seqlens_q[s])
    k_offset: int = 0
    rows_per_query: int = 1  # GQA: G query heads packed as rows of one tile
    order_offset: int = 0  # tiles visited by earlier calls (varlen: earlier sequences)
    window: tuple[int, int] = (-1, -1)  # (left, right) of the call, causal folded in (right = 0)


def trace_schedule(case: str, *, seq_len: int = 256, block_q: int = 64, block_k: int = 64, window: int = 96,
                   group: int = 4, varlen_seqlens=(100, 60, 140), head_dim: int = 16,
                   seed: int = 0) -> list[TracedBlock]:
    """Run the tiled forward with a tracer on one case of CASES:

        full    Nq = Nk = seq_len, no mask          causal  bottom-right causal mask
        window  causal with window_size=(window, 0): key j visible from query i iff i - window <= j <= i
        gqa     Hq = group query heads on 1 K/V head, Nq = seq_len // 2 against Nk = seq_len, causal
                (the chunked-prefill shape: the mask is aligned bottom-right)
        varlen  one causal call per sequence of varlen_seqlens, as varlen_attention does, placed
                on the diagonal of the packed (total_q x total_k) plane
    """
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; choose one of {list(CASES)}")
    g = torch.Generator().manual_seed(seed)

    def run(hq, hkv, nq, nk, **kw):
        q = torch.randn(1, hq, nq, head_dim, generator=g)  # (B, Hq, Nq, D)
        k = torch.randn(1, hkv, nk, head_dim, generator=g)  # (B, Hkv, Nk, D)
        tracer = TileTracer(record_stats=False)
        tiled_attention(q, k, k, block_q=block_q, block_k=block_k, tracer=tracer, **kw)
        return tracer

    causal = (-1, 0)
    if case == "full":
        return [TracedBlock(run(1, 1, seq_len, seq_len))]
    if case == "causal":
        return [TracedBlock(run(1, 1, seq_len, seq_len, causal=True), window=causal)]
    if case == "window":
        return [TracedBlock(run(1, 1, seq_len, seq_len, causal=True, window_size=(window, 0)), window=(window, 0))]
    if case == "gqa":
        return [TracedBlock(run(group, 1, max(1, seq_len // 2), seq_len, causal=True), rows_per_query=group,
                            window=causal)]
    blocks, offset, visited = [], 0, 0
    for n in varlen_seqlens:
        if n > 0:
            tracer = run(1, 1, n, n, causal=True)
            blocks.append(TracedBlock(tracer, offset, offset, order_offset=visited, window=causal))
            visited += sum(1 for s in tracer.steps if s.order >= 0)
        offset += n
    return blocks


def _counts(blocks) -> dict[str, int]:
    total = {"full": 0, "partial": 0, "skipped": 0}
    for b in blocks:
        for state, n in b.tracer.counts().items():
            total[state] += n
    return total


def _tile_traces(blocks, showlegend=True) -> list[go.Scatter]:
    """One filled-rectangle trace per tile state, a text trace with the visit order, and the mask's
    edges. showlegend: True, False, or a set of names already in the legend (updated here)."""
    xs = {s: [] for s in STATE_CODE}
    ys = {s: [] for s in STATE_CODE}
    label_x, label_y, labels = [], [], []
    n_tiles = sum(len(b.tracer.steps) for b in blocks)
    for b in blocks:
        r = b.rows_per_query
        for s in b.tracer.steps:
            x0, x1 = b.k_offset + s.k_range[0], b.k_offset + s.k_range[1]
            y0, y1 = (b.q_offset + s.q_range[0]) * r, (b.q_offset + s.q_range[1]) * r
            xs[s.state] += [x0, x1, x1, x0, x0, None]
            ys[s.state] += [y0, y0, y1, y1, y0, None]
            if s.order >= 0 and n_tiles <= MAX_ORDER_LABELS:
                label_x.append((x0 + x1) / 2)
                label_y.append((y0 + y1) / 2)
                labels.append(str(s.order + b.order_offset))
    def legend(name, present):
        if isinstance(showlegend, set):  # several panels: each entry once, where it first appears
            if not present or name in showlegend:
                return False
            showlegend.add(name)
            return True
        return showlegend

    traces = [go.Scatter(x=xs[s], y=ys[s], fill="toself", mode="lines", name=s, legendgroup=s,
                         showlegend=legend(s, bool(xs[s])), line=dict(color="white", width=1),
                         fillcolor=STATE_COLORS[s], hoverinfo="name") for s in ("skipped", "full", "partial")]
    traces.append(go.Scatter(x=label_x, y=label_y, text=labels, mode="text", name="visit order",
                             showlegend=False, hoverinfo="skip", textfont=dict(size=9)))
    edge_x, edge_y = _mask_edges(blocks)
    traces.append(go.Scatter(x=edge_x, y=edge_y, mode="lines", name="mask edge", legendgroup="edge",
                             showlegend=legend("mask edge", bool(edge_x)), hoverinfo="skip",
                             line=dict(color="#222222", width=1.5, dash="dot")))
    return traces


def _mask_edges(blocks) -> tuple[list, list]:
    """The lines the mask cuts along, in plane coordinates: query i sees keys j with
    i + Nk - Nq - left <= j <= i + Nk - Nq + right (bottom-right aligned, as fa2lab.masks)."""
    xs, ys = [], []
    for b in blocks:
        nq, nk = b.tracer.shape["Nq"], b.tracer.shape["Nk"]
        left, right = b.window
        shift = nk - nq
        for j_of_i in ([lambda i: i + shift + right + 1] if right >= 0 else []) + \
                      ([lambda i: i + shift - left] if left >= 0 else []):
            # Clip the line j = j_of_i(i) to the block's [0, nq] x [0, nk] rectangle.
            i0, i1 = max(0, -j_of_i(0)), min(nq, nk - j_of_i(0))
            if i1 > i0:
                xs += [b.k_offset + j_of_i(i0), b.k_offset + j_of_i(i1), None]
                ys += [(b.q_offset + i0) * b.rows_per_query, (b.q_offset + i1) * b.rows_per_query, None]
    return xs, ys


def _plane(blocks) -> tuple[int, int]:
    """(query rows, key positions) spanned by the traced calls."""
    nq = max(((b.q_offset + b.tracer.shape["Nq"]) * b.rows_per_query for b in blocks), default=0)
    nk = max((b.k_offset + b.tracer.shape["Nk"] for b in blocks), default=0)
    return nq, nk


def tile_map_figure(blocks: list[TracedBlock], title: str | None = None) -> go.Figure:
    """The traced tiles as rectangles in token coordinates: grey skipped (no arithmetic), blue
    computed without a mask, orange masked element by element; numbers give the visit order."""
    fig = go.Figure(_tile_traces(blocks))
    nq, nk = _plane(blocks)
    c = _counts(blocks)
    shape = blocks[0].tracer.shape if blocks else {"Br": "-", "Bc": "-"}
    rows = blocks[0].rows_per_query if blocks else 1
    ytitle = f"packed row (query position x {rows} heads)" if rows > 1 else "query position i"
    styled(fig, title=title or (f"Br={shape['Br']}, Bc={shape['Bc']}: {c['full']} full, {c['partial']} masked, "
                                f"{c['skipped']} skipped"),
           xaxis=dict(title="key position j", range=[0, nk], side="top"),
           yaxis=dict(title=ytitle, range=[nq, 0]), width=560, height=520, legend=dict(orientation="h"))
    return fig


def tile_cases_figure(cases=CASES, **kw) -> go.Figure:
    """Every case of `cases` traced with the same settings (kw: as trace_schedule), side by side."""
    traced = {case: trace_schedule(case, **kw) for case in cases}
    titles = []
    for case, blocks in traced.items():
        c = _counts(blocks)
        titles.append(f"{CASE_TITLES[case]}<br>{c['full']} full, {c['partial']} masked, {c['skipped']} skipped")
    fig = make_subplots(rows=1, cols=len(cases), subplot_titles=titles, horizontal_spacing=0.035)
    in_legend: set = set()
    for col, (case, blocks) in enumerate(traced.items(), start=1):
        for trace in _tile_traces(blocks, showlegend=in_legend):
            fig.add_trace(trace, row=1, col=col)
        nq, nk = _plane(blocks)
        fig.update_xaxes(range=[0, nk], title_text="key j", row=1, col=col)
        fig.update_yaxes(range=[nq, 0], row=1, col=col)
    fig.update_yaxes(title_text="query i (GQA: packed rows)", row=1, col=1)
    fig.update_annotations(font_size=11)
    b0 = next(iter(traced.values()))[0].tracer.shape
    # No fixed width: the figure takes the width of the notebook (or page) it is shown in.
    return styled(fig, title=f"Tile schedules, Br={b0['Br']}, Bc={b0['Bc']}", height=440, margin=dict(t=100),
                  legend=dict(orientation="h", y=-0.2))


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
                               colorscale=_HEAT_COLORS, zmin=0, zmax=2, showscale=False, xgap=1, ygap=1))
    counts = tracer.counts()
    shape = tracer.shape
    return styled(fig,
                  title=title or (f"Tile schedule: Nq={shape['Nq']}, Nk={shape['Nk']}, Br={shape['Br']}, "
                                  f"Bc={shape['Bc']} - {counts['full']} full, {counts['partial']} masked, "
                                  f"{counts['skipped']} skipped"),
                  xaxis_title="key tile j", yaxis_title="query tile i", yaxis_autorange="reversed",
                  width=560, height=480)


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
    return styled(fig, title=f"Online softmax state of query {steps[0].q_range[0] + row} (head {head})",
                  xaxis_title="after key tile j", yaxis_title="m", width=620, height=380,
                  yaxis2=dict(title="l", overlaying="y", side="right"))
