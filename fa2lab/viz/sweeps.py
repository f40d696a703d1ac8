"""Figures of sweep results (fa2lab report): one metric (or several) against one parameter,
a line per value of a grouping column, optionally log-log with the fitted slope in the legend.

Timed metrics recorded with their spread (`<m>_min`, `<m>_max`, from Timing.as_metrics) get error
bars; a point measured under contention (see `unsound`) is drawn as an open x and left out of the
fitted slope, and the legend says how many were left out."""

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


def _truthy(values):
    """A column of flags or counts as read back from results.csv (True/'True'/1/2.0 -> True)."""
    return values.map(lambda v: str(v).strip().lower() in ("true", "1") or
                      (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0))


def unsound(table, col: str):
    """Per row: was `col` measured under contention or at throttled GPU clocks? A notebook that
    records its timings with Timing.as_metrics says which metrics are timed (`<m>_contended`);
    the others (errors, memory, counts) are not judged. Without any such column every metric of a
    point whose timings were contended (timing_contended, timing_throttled) is."""
    import pandas as pd

    if f"{col}_contended" in table.columns:
        return _truthy(table[f"{col}_contended"])
    flags = pd.Series(False, index=table.index)
    if any(c.endswith("_contended") and c[: -len("_contended")] in table.columns for c in table.columns):
        return flags
    for c in ("timing_contended", "timing_throttled"):
        if c in table.columns:
            flags |= _truthy(table[c].fillna(0))
    return flags


def sweep_figure(table, x: str, y, color: str | None = None, *, log_x: bool = False, log_y: bool = False,
                 fit: bool = False, title: str | None = None) -> go.Figure:
    """table: a pandas DataFrame of sweep results (one row per point). y: a column or a list of
    columns (one line each); color: a column whose values split the points into lines. Points of
    the same x are averaged (repeats; the sound ones only, where there are any); failed points
    (status != 'ok') are left out. Spread as error bars, contended points marked and not fitted."""
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
            xs, vals, lows, highs, bad = _points(part, x, col)
            sound = [(a, b) for a, b, u in zip(xs, vals, bad) if not u]
            slope = fit_slope([a for a, _ in sound], [b for _, b in sound]) if fit else None
            name = " ".join(str(s) for s in ([col] if len(ys) > 1 or color is None else []) +
                            ([f"{color}={key}"] if color else []))
            if slope is not None:
                name += f" (slope {slope:.2f}" + (f"; {sum(bad)} contended left out)" if any(bad) else ")")
            elif fit and any(bad):
                name += f" (no slope: {sum(bad)} contended left out)"
            error = None
            if lows is not None:
                error = dict(type="data", symmetric=False, array=[h - v for h, v in zip(highs, vals)],
                             arrayminus=[v - lo for lo, v in zip(lows, vals)])
            marker = dict(symbol=["x-open" if u else "circle" for u in bad], size=[12 if u else 7 for u in bad])
            fig.add_scatter(x=xs, y=vals, mode="lines+markers", name=name or col, line=line, error_y=error,
                            marker=marker, text=["contended: left out of the fit" if u else "" for u in bad])
    return styled(fig, title=title or f"{', '.join(ys)} against {x}",
                  xaxis=dict(title=x, type="log" if log_x else "linear"),
                  yaxis=dict(title=ys[0] if len(ys) == 1 else "value", type="log" if log_y else "linear"),
                  width=720, height=420)


def _points(part, x: str, col: str):
    """Per x: the mean of the sound rows (all rows when none is sound), the spread of those rows
    (min of `<col>_min`, max of `<col>_max`; None without those columns) and whether it is unsound."""
    import pandas as pd

    if not len(part):
        return [], [], None, None, []
    flags = unsound(part, col)
    spread = f"{col}_min" in part.columns and f"{col}_max" in part.columns
    xs, vals, lows, highs, bad = [], [], [], [], []
    for key, rows in part.groupby(x, sort=True):
        ok = rows[~flags.loc[rows.index]]
        used = ok if len(ok) else rows
        value = pd.to_numeric(used[col], errors="coerce").mean()
        if math.isnan(value):
            continue
        xs.append(key)
        vals.append(float(value))
        bad.append(not len(ok))
        if spread:
            lows.append(float(used[f"{col}_min"].min()) if used[f"{col}_min"].notna().any() else float(value))
            highs.append(float(used[f"{col}_max"].max()) if used[f"{col}_max"].notna().any() else float(value))
    return xs, vals, (lows if spread else None), (highs if spread else None), bad
