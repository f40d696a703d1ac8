"""10 backward: figures of FA2's Algorithm 2 from the rows fa2lab.bench.backward returns - the
order of the backward's tiles, which gradient tile each step adds to, saved memory against N - and
of one pass against two on a GPU (measured rows next to the cost model's compute roof).

    schedule_figure / accumulation_figure / saved_memory_figure / passes_figure
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from fa2lab.viz.style import f32, styled


def saved_memory_figure(rows: list[dict]) -> go.Figure:
    """Saved MiB against N, log-log: naive grows as N^2 (P is kept), tiled as N (Q, K, V, O, LSE)."""
    fig = go.Figure()
    for impl in dict.fromkeys(r["impl"] for r in rows):
        part = [r for r in rows if r["impl"] == impl]
        fig.add_scatter(x=[r["N"] for r in part], y=f32([r["saved_mib"] for r in part]), mode="lines+markers",
                        name=f"{impl}: saved for backward", hovertext=[r["tensors"] for r in part])
    return styled(fig, title="What autograd keeps between forward and backward (measured)", xaxis_type="log",
                  yaxis_type="log", xaxis_title="N (queries = keys)", yaxis_title="MiB saved", height=420)


def schedule_figure(steps: list[dict], nq: int, nk: int, block_q: int, block_k: int) -> go.Figure:
    """The (query tile, key tile) grid coloured by the step at which the backward computes it."""
    rows, cols = -(-nq // block_q), -(-nk // block_k)
    z = [[None] * cols for _ in range(rows)]
    text = [[""] * cols for _ in range(rows)]
    for s in steps:
        z[s["i"]][s["j"]] = s["step"]
        text[s["i"]][s["j"]] = f"{s['step']}{'*' if s['state'] == 'partial' else ''}"
    fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", colorscale="Viridis",
                               colorbar=dict(title="step"), hoverongaps=False,
                               hovertemplate="query tile %{y}, key tile %{x}: step %{z}<extra></extra>"))
    return styled(fig, title="Algorithm 2's order: key tiles outer, query tiles inner (* = partly masked)",
                  xaxis_title="key tile j (dK_j, dV_j)", yaxis_title="query tile i (dQ_i)",
                  yaxis_autorange="reversed", height=420)


def accumulation_figure(steps: list[dict]) -> go.Figure:
    """When each gradient tile receives a contribution: dK_j and dV_j in one run of consecutive
    steps (then written once), dQ_i spread over the whole backward (read-modify-written each time)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("dK_j, dV_j: one column each, on chip",
                                                       "dQ_i: += on every key tile"), shared_xaxes=True)
    fig.add_scatter(x=[s["step"] for s in steps], y=[f"dK/dV {s['j']}" for s in steps], mode="markers",
                    name="dK_j, dV_j +=", row=1, col=1)
    fig.add_scatter(x=[s["step"] for s in steps], y=[f"dQ {s['i']}" for s in steps], mode="markers",
                    name="dQ_i +=", row=1, col=2)
    fig.update_xaxes(title_text="step")
    return styled(fig, title="Which gradient tile each step adds to", height=420)


def passes_figure(rows: list[dict]) -> go.Figure:
    """Measured backward time against the cost model's compute roof, one pass (dQ added across key
    blocks: 5 matmuls per score) and two passes (a separate dQ kernel: 7), per shape. rows:
    `fa2lab.bench.hopper_sweep.backward_roofline_rows` (one configuration per pass count and shape)."""
    fig = go.Figure()
    cases = list(dict.fromkeys(_case(r) for r in rows))
    for passes, colour in ((2, "#636efa"), (1, "#ef553b")):
        by_case = {_case(r): r for r in rows if r["passes"] == passes}
        name = "one pass (5 matmuls)" if passes == 1 else "two passes (7 matmuls)"
        fig.add_bar(x=cases, y=f32([by_case[c]["measured_ms"] if c in by_case else None for c in cases]),
                    name=f"{name}: measured", marker_color=colour,
                    hovertext=[by_case[c]["config"] if c in by_case else "" for c in cases])
        fig.add_scatter(x=cases, y=f32([by_case[c]["compute_ms"] if c in by_case else None for c in cases]),
                        mode="markers", marker=dict(symbol="line-ew-open", size=28, color=colour, line_width=3),
                        name=f"{name}: compute roof")
    return styled(fig, title="Backward: measured against the compute roof, one pass and two", barmode="group",
                  xaxis_title="shape", yaxis_title="ms", height=440)


def _case(r: dict) -> str:
    gqa = f" GQA {r['H']}:{r['Hkv']}" if r["H"] != r["Hkv"] else ""
    return f"N={r['N']} D={r['D']} {'causal' if r['causal'] else 'full'}{gqa}"

