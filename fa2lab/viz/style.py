"""Shared look of the figures, and the notebook renderer. Nothing here changes global state on
import; `use_notebook_renderer()` does, and only notebooks call it."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

# A small template written into every figure: plotly's default one adds ~6 KB of JSON per figure.
TEMPLATE = go.layout.Template(layout=dict(
    font=dict(family="Helvetica, Arial, sans-serif", size=12),
    paper_bgcolor="white", plot_bgcolor="white",
    colorway=["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d"],
    xaxis=dict(gridcolor="#e5e5e5", linecolor="#888888", zerolinecolor="#cccccc", ticks="outside"),
    yaxis=dict(gridcolor="#e5e5e5", linecolor="#888888", zerolinecolor="#cccccc", ticks="outside"),
    hovermode="closest", margin=dict(l=60, r=20, t=60, b=50)))

# One colour per tile state, used by every schedule figure.
STATE_COLORS = {"skipped": "#eeeeee", "full": "#4c78a8", "partial": "#f58518"}
GOOD, BAD = "#4c78a8", "#e45756"


def use_notebook_renderer() -> None:
    """Render figures as plotly JSON (application/vnd.plotly.v1+json): small outputs that
    JupyterLab draws natively, without plotly.js embedded in the notebook."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype"


def f32(values) -> np.ndarray:
    """Figure data as float32: plotly stores numpy arrays as base64 typed arrays, half the size of
    float64 and a fraction of a JSON number list."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float32)


def styled(fig: go.Figure, **layout) -> go.Figure:
    """Apply fa2lab's template and the given layout."""
    fig.update_layout(template=TEMPLATE, **layout)
    return fig
