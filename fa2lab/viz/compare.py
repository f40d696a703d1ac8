"""Figures of `fa2lab report --compare`: the ratio B / A of every figure two runs share, with the
run-to-run spread the runs measured as the band a change must leave to count."""

from __future__ import annotations

import plotly.graph_objects as go

from fa2lab.viz.style import styled

VERDICT_COLORS = {"faster": "#54a24b", "better": "#54a24b", "slower": "#e45756", "worse": "#e45756",
                  "changed": "#eeca3b", "within spread": "#9d9d9d", "no spread measured": "#4c78a8"}


def ratio_figure(rows: list[dict], title: str = "B / A") -> go.Figure:
    """One marker per (case, figure) of fa2lab.sweep.compare.compare()'s rows: B / A on a log axis
    (1 = unchanged, dotted), coloured by verdict, the error bar the sum of both relative spreads."""
    fig = go.Figure()
    for verdict, color in VERDICT_COLORS.items():
        part = [r for r in rows if r["verdict"] == verdict]
        if not part:
            continue
        spread = [(r["spread_a"] or 0) + (r["spread_b"] or 0) for r in part]
        fig.add_trace(go.Scatter(
            y=[f"{r['case']} | {r['impl']}" for r in part], x=[r["ratio"] for r in part], mode="markers",
            name=verdict, marker=dict(color=color, size=10),
            # the band around 1 a change must leave, drawn around the measured ratio
            error_x=dict(type="data", array=[r["ratio"] * s for r, s in zip(part, spread)],
                         visible=any(spread)),
            hovertemplate="%{y}<br>B / A = %{x:.3f}<extra>" + verdict + "</extra>"))
    fig.add_vline(x=1.0, line_dash="dot", line_color="#444")
    fig.update_layout(title=title, height=max(260, 22 * len(rows) + 120),
                      xaxis=dict(type="log", title="B / A"), yaxis=dict(automargin=True))
    return styled(fig)
