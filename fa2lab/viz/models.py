"""12 models: figures of the rows fa2lab.bench.model_checks returns - logits against float64 per
attention implementation, prefill memory against N.

    agreement_figure / memory_figure
"""

from __future__ import annotations

import plotly.graph_objects as go

from fa2lab.viz.style import f32, styled


def agreement_figure(rows: list[dict], title: str = "logits: max |x - float64|") -> go.Figure:
    fig = go.Figure(go.Bar(x=[r["impl"] for r in rows], y=f32([r["max_abs_err"] for r in rows]),
                           text=[f"{r['max_abs_err']:.2g}" for r in rows], textposition="outside"))
    return styled(fig, title=title, yaxis_type="log", yaxis_title="max abs error (fp32 model)", height=400)


def memory_figure(rows: list[dict]) -> go.Figure:
    fig = go.Figure()
    for impl in dict.fromkeys(r["impl"] for r in rows):
        part = [r for r in rows if r["impl"] == impl and r["peak_mib"] is not None]
        fig.add_scatter(x=[r["N"] for r in part], y=f32([max(r["peak_mib"], 1e-3) for r in part]),
                        mode="lines+markers", name=impl)
    return styled(fig, title="prefill: peak extra memory against N (measured, VmHWM)", xaxis_type="log",
                  yaxis_type="log", xaxis_title="N (prompt tokens)", yaxis_title="MiB", height=420)
