"""11 numerics: figures of the rows fa2lab.bench.numerics returns - error against float64 per
backend and dtype, its ratio to PyTorch's own same-dtype error (the 2x rule), where it comes from.

    error_figure / ratio_figure / sources_figure
"""

from __future__ import annotations

import plotly.graph_objects as go

from fa2lab.viz.style import f32, styled

RULE = 2.0  # the bound drawn: fa2lab.bench.numerics.RULE



def error_figure(rows: list[dict], x: str = "N") -> go.Figure:
    """Max error against float64 (log) per backend and dtype against N or logit_scale; PyTorch's
    own same-dtype error dashed, its 2x bound dotted."""
    fig = go.Figure()
    rows = [r for r in rows if r["err"] is not None]
    fixed = "logit_scale" if x == "N" else "N"
    keep = max(r[fixed] for r in rows) if rows else None
    rows = [r for r in rows if r[fixed] == keep]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        part = sorted([r for r in rows if r["dtype"] == dtype], key=lambda r: r[x])
        base = list({r[x]: r for r in part}.values())
        fig.add_scatter(x=[r[x] for r in base], y=f32([r["torch_err"] for r in base]), mode="lines",
                        line_dash="dash", name=f"{dtype}: PyTorch in {dtype}")
        fig.add_scatter(x=[r[x] for r in base], y=f32([RULE * r["torch_err"] for r in base]), mode="lines",
                        line_dash="dot", name=f"{dtype}: 2x bound", opacity=0.5)
        for backend in dict.fromkeys(r["backend"] for r in part):
            b = [r for r in part if r["backend"] == backend]
            fig.add_scatter(x=[r[x] for r in b], y=f32([r["err"] for r in b]), mode="lines+markers",
                            name=f"{dtype}: {backend}")
    return styled(fig, title=f"max |out - float64| against {x} ({fixed} = {keep})", xaxis_type="log",
                  yaxis_type="log", xaxis_title=x, yaxis_title="max abs error", height=460)


def ratio_figure(rows: list[dict]) -> go.Figure:
    """err / PyTorch's own same-dtype error for every case run; the rule's bound at 2."""
    rows = [r for r in rows if r["ratio"] is not None]
    fig = go.Figure()
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        part = [r for r in rows if r["dtype"] == dtype]
        fig.add_scatter(x=[f"{r['backend']} N={r['N']} s={r['logit_scale']:g}" for r in part],
                        y=f32([r["ratio"] for r in part]), mode="markers", name=dtype)
    fig.add_hline(y=RULE, line_dash="dot", annotation_text="2x rule", annotation_position="top left")
    return styled(fig, title="error / PyTorch's own same-dtype error (must stay below 2)", yaxis_type="log",
                  yaxis_title="ratio", height=440)


def sources_figure(rows: list[dict], dtype: str = "") -> go.Figure:
    fig = go.Figure(go.Bar(x=[r["source"] for r in rows], y=f32([r["err"] for r in rows]),
                           text=[f"{r['err']:.2g}" for r in rows], textposition="outside"))
    return styled(fig, title=f"where the error comes from {dtype}".strip(), yaxis_type="log",
                  yaxis_title="max abs error against float64", height=420)
