"""Figures of sweep results (fa2lab report): one metric (or several) against one parameter,
a line per value of a grouping column, optionally log-log with the fitted slope in the legend."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from fa2lab.viz.style import TEMPLATE, styled

PALETTE = TEMPLATE.layout.colorway
DASHES = ("solid", "dash", "dot", "dashdot")


def fit_slope(xs, ys) -> float | None:
    """Least-squares slope of log y against log x over the positive points (None: < 2 points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys)
           if x is not None and y is not None and x > 0 and y > 0 and math.isfinite(y)]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def sweep_figure(table, x: str, y, color: str | None = None, *, log_x: bool = False, log_y: bool = False,
                 fit: bool = False, title: str | None = None) -> go.Figure:
    """table: a pandas DataFrame of sweep results (one row per point). y: a column or a list of
    columns (one line each); color: a column whose values split the points into lines. Points of
    the same x are averaged (repeats); failed points (status != 'ok') are left out."""
    ys = [y] if isinstance(y, str) else list(y)
    missing = [c for c in [x, *ys, *([color] if color else [])] if c not in table.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the results table; it has {list(table.columns)}")
    ok = table[table["status"] == "ok"] if "status" in table.columns else table
    groups = [(None, ok)] if color is None else list(ok.groupby(color, sort=True))
    fig = go.Figure()
    for g, (key, part) in enumerate(groups):
        for c, col in enumerate(ys):
            # Several columns and groups: colour says the column, the dash the group.
            line = dict(color=PALETTE[c % len(PALETTE)], dash=DASHES[g % len(DASHES)]) if len(ys) > 1 else {}
            mean = part.groupby(x, sort=True)[col].mean(numeric_only=True) if len(part) else part[col]
            xs, vals = list(mean.index), [float(v) for v in mean.values]
            slope = fit_slope(xs, vals) if fit else None
            name = " ".join(str(s) for s in ([col] if len(ys) > 1 or color is None else []) +
                            ([f"{color}={key}"] if color else []))
            if slope is not None:
                name += f" (slope {slope:.2f})"
            fig.add_scatter(x=xs, y=vals, mode="lines+markers", name=name or col, line=line)
    return styled(fig, title=title or f"{', '.join(ys)} against {x}",
                  xaxis=dict(title=x, type="log" if log_x else "linear"),
                  yaxis=dict(title=ys[0] if len(ys) == 1 else "value", type="log" if log_y else "linear"),
                  width=720, height=420)
