"""Peak memory and time against N for naive, tiled and torch SDPA attention (notebook 03),
measured on this machine and set next to the cost model's prediction.

The rows come from the CPU benchmark (fa2lab.bench.cpu.scaling_rows: median time and
fa2lab.measure.memory.peak_extra_bytes, the most resident memory a call added); the model is
fa2lab.cost (memory.peak_extra_bytes, roofline.cpu_tiled_forward). This module only draws.
"""

from __future__ import annotations

import warnings

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from fa2lab.bench import cpu
from fa2lab.viz.style import styled

IMPL_COLORS = {"tiled": "#4c78a8", "sdpa": "#54a24b", "naive": "#e45756"}
# The cost model's name for each implementation's memory: torch's CPU SDPA kernel is itself a
# flash-style tiled kernel (output + log-sum-exp per row).
MODEL_ALGO = {"naive": "naive", "tiled": "tiled_cpu", "sdpa": "fa2"}


def measure_scaling(ns, impls=("tiled", "sdpa", "naive"), **kw) -> list[dict]:
    """Deprecated: `fa2lab.bench.cpu.scaling_rows` (figures only draw; the benchmark drivers measure)."""
    warnings.warn("fa2lab.viz.scaling.measure_scaling moved to fa2lab.bench.cpu.scaling_rows", DeprecationWarning,
                  stacklevel=2)
    return cpu.scaling_rows(ns, impls, **kw)


def exponents(rows: list[dict], column: str = "peak_extra_mib") -> dict[str, float | None]:
    """Fitted log-log slope of `column` against N, per implementation (None: fewer than 2 points)."""
    out = {}
    for impl in dict.fromkeys(r["impl"] for r in rows):
        ns = [int(r["N"]) for r in rows if r["impl"] == impl]
        mode = next(r["mode"] for r in rows if r["impl"] == impl)
        out[impl] = cpu.fit_exponent(rows, impl, mode, min(ns), max(ns), column)
    return out


def predicted_scaling(ns, impls=("tiled", "sdpa", "naive"), *, mode: str = "fwd", heads: int = 4,
                      head_dim: int = 64, causal: bool = True, block: int = 256, profile=None) -> list[dict]:
    """The cost model's peak extra memory (every impl it models) and time (tiled forward, from the
    profile: `fa2lab.hardware.detect()` when None) for the same calls. Empty if fa2lab.cost is absent."""
    try:
        from fa2lab.cost.memory import peak_extra_bytes
        from fa2lab.cost.roofline import cpu_tiled_forward
    except ImportError:
        return []
    if profile is None and "tiled" in impls and mode == "fwd":
        from fa2lab.hardware import detect

        profile = detect()
    rows = []
    for n in ns:
        for impl in impls:
            if impl == "tiled" and mode != "fwd":
                mib = None  # fa2lab.cost models the tiled forward's memory only
            else:
                mib = peak_extra_bytes(MODEL_ALGO[impl], 1, heads, n, n, head_dim, elem=4, mode=mode,
                                       block_q=block, block_k=block) / 2**20
            seconds = None
            if impl == "tiled" and mode == "fwd" and profile is not None:
                seconds = cpu_tiled_forward(profile, 1, heads, n, n, head_dim, block_q=block, block_k=block,
                                            causal=causal).time
            rows.append(dict(impl=impl, mode=mode, N=n, seconds=seconds, peak_extra_mib=mib))
    return rows


def scaling_figure(rows: list[dict], predicted: list[dict] | None = None) -> go.Figure:
    """Log-log peak extra memory and time against N, one colour per implementation, the fitted
    exponent in each legend entry; the model's prediction dashed in the same colour. Times show
    their spread (min to max) as error bars; a contended timing is an open x, left out of the slope."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("peak extra memory (MiB)", "median time (ms)"))
    mem_exp, time_exp = exponents(rows), exponents(rows, "seconds")
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = [r for r in rows if r["impl"] == impl]
        color = IMPL_COLORS.get(impl)
        for col, key, scale, expo in ((1, "peak_extra_mib", 1.0, mem_exp), (2, "seconds", 1e3, time_exp)):
            pts = [r for r in mine if r[key] is not None]
            slope = expo.get(impl)
            name = f"{impl} (slope {slope:.2f}" if slope is not None else impl
            timed = key == "seconds"
            # A contended timing is drawn as an open x and left out of the time slope (cpu.fit_exponent).
            bad = [timed and cpu.is_contended(r) for r in pts]
            if slope is not None:
                name += f"; {sum(bad)} contended left out)" if any(bad) else ")"
            spread = timed and all(r.get("min_s") is not None and r.get("max_s") is not None for r in pts)
            error = dict(type="data", symmetric=False, array=[(r["max_s"] - r["seconds"]) * scale for r in pts],
                         arrayminus=[(r["seconds"] - r["min_s"]) * scale for r in pts]) if spread and pts else None
            fig.add_scatter(x=[r["N"] for r in pts], y=[r[key] * scale for r in pts], mode="lines+markers",
                            name=name, legendgroup=f"{impl}-{key}", line=dict(color=color), error_y=error,
                            marker=dict(symbol=["x-open" if b else "circle" for b in bad],
                                        size=[11 if b else 6 for b in bad]),
                            row=1, col=col)
        for col, key, scale in ((1, "peak_extra_mib", 1.0), (2, "seconds", 1e3)):
            pts = [(r["N"], r[key] * scale) for r in predicted or [] if r["impl"] == impl and r[key] is not None]
            if pts:
                fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines",
                                name=f"{impl} model", legendgroup=f"{impl}-{key}",
                                line=dict(color=color, dash="dash"), row=1, col=col)
    fig.update_xaxes(type="log", title_text="N (query = key length)")
    fig.update_yaxes(type="log")
    mode = rows[0]["mode"] if rows else ""
    return styled(fig, title=f"Scaling with N ({mode}); dashed: fa2lab.cost's prediction", width=1000, height=420)
