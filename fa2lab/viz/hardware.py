"""Hardware profiles (notebook 06): the tile sizes each profile derives, rooflines, and the cost
model's predictions against measurements (this CPU live; GPUs from benchmark results files).

Uses fa2lab.hardware (profiles) and fa2lab.cost (tile_config, fa2_forward, decode,
cpu_tiled_forward); `available()` says whether both are importable.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from fa2lab.cost.tiles import tile_config
from fa2lab.viz.style import GOOD, styled


def available() -> str | None:
    """None if fa2lab.hardware and fa2lab.cost import; else what is missing, in words."""
    try:
        import fa2lab.cost  # noqa: F401
        import fa2lab.hardware  # noqa: F401
    except ImportError as exc:
        return f"{exc.name or exc} is not available yet"
    return None


def tile_table(names, head_dim: int = 128, dtype: str = "float16", causal: bool = False) -> list[dict]:
    """One row per profile: the derived Br x Bc (and warps/stages on a GPU), its on-chip bytes and
    the profile's limit (shared memory per block, or L2 per core on a CPU)."""
    from fa2lab.hardware import get_profile

    rows = []
    for name in names:
        p = get_profile(name)
        cfg = tile_config(p, head_dim, dtype, causal)
        rows.append(dict(profile=name, kind=p.kind, block_q=cfg.block_q, block_k=cfg.block_k,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages, onchip_bytes=cfg.onchip_bytes,
                         limit_bytes=p.smem_per_block))
    return rows


def tile_configs_figure(names, head_dims=(64, 128), dtype: str = "float16", causal: bool = False) -> go.Figure:
    """Br x Bc that each profile derives, per head dim (bar height: tile area Br*Bc; label: the
    tile, and warps/stages on GPUs), and the on-chip bytes it uses against the profile's budget."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("derived tile (area Br x Bc)", "on-chip bytes used / budget"))
    for d in head_dims:
        rows = tile_table(names, d, dtype, causal)
        labels = [f"{r['block_q']}x{r['block_k']}" + (f", {r['num_warps']}w{r['num_stages']}s"
                                                      if r["num_warps"] else "") for r in rows]
        fig.add_bar(x=[r["profile"] for r in rows], y=[r["block_q"] * r["block_k"] for r in rows], text=labels,
                    name=f"D={d}", row=1, col=1)
        fig.add_scatter(x=[r["profile"] for r in rows], y=[r["onchip_bytes"] / r["limit_bytes"] for r in rows],
                        mode="markers", marker=dict(size=10), name=f"D={d} usage", row=1, col=2)
    fig.add_hline(y=1.0, line_dash="dot", line_color="#888888", row=1, col=2)
    fig.update_yaxes(type="log", title_text="Br x Bc", row=1, col=1)
    fig.update_yaxes(title_text="fraction of the budget", row=1, col=2)
    return styled(fig, title=f"Tiles derived from each profile ({dtype}{', causal' if causal else ''}); CPUs "
                  "may exceed L2 on purpose (their budget is the L3 share)", width=1000, height=420,
                  barmode="group")


def roofline_points(profile, dtype: str | None = None, ns=(512, 2048, 8192, 32768), head_dim: int = 128,
                    heads: int = 16, tokens: int = 32768) -> list[dict]:
    """Predicted FA2 forward (B*N = tokens) and one-token decode points for a profile: arithmetic
    intensity (FLOP/byte), predicted FLOP/s and time, and which roof binds."""
    from fa2lab.cost import decode, fa2_forward

    dtype = dtype or ("bfloat16" if profile.is_gpu else "float32")
    pts = []
    for n in ns:
        b = max(1, tokens // n)
        r = fa2_forward(profile, b, heads, n, n, head_dim, dtype, causal=False)
        pts.append(dict(label=f"fwd N={n}", kind="fwd", N=n, intensity=r.intensity, flops_per_s=r.flops / r.time,
                        seconds=r.time, bound=r.bound))
        r = decode(profile, 1, 32, 8, n, head_dim, dtype)
        pts.append(dict(label=f"decode L={n}", kind="decode", N=n, intensity=r.intensity,
                        flops_per_s=r.flops / r.time, seconds=r.time, bound=r.bound))
    return pts


def roofline_figure(profile, dtype: str | None = None, points=None, measured=None) -> go.Figure:
    """The roofline min(peak, bandwidth x intensity) of a profile, with the cost model's FA2
    forward and decode points on it, and measured points (dicts with label, intensity,
    flops_per_s) where given."""
    dtype = dtype or ("bfloat16" if profile.is_gpu else "float32")
    points = roofline_points(profile, dtype) if points is None else points
    peak = profile.flops(dtype) or profile.flops("float32")
    ridge = peak / profile.mem_bw
    xs = [10 ** (e / 4) for e in range(-8, 21)]  # 0.01 .. 1e5 FLOP/byte
    fig = go.Figure()
    fig.add_scatter(x=xs, y=[min(peak, profile.mem_bw * x) for x in xs], mode="lines", name="roof",
                    line=dict(color="#333333"))
    for kind, symbol in (("fwd", "circle"), ("decode", "diamond")):
        mine = [p for p in points if p["kind"] == kind]
        fig.add_scatter(x=[p["intensity"] for p in mine], y=[p["flops_per_s"] for p in mine],
                        text=[p["label"] for p in mine],
                        mode="markers", marker=dict(symbol=symbol, size=9), name=f"predicted {kind}",
                        hovertemplate="%{text}: %{y:.3s}FLOP/s<extra></extra>")
    if measured:
        fig.add_scatter(x=[p["intensity"] for p in measured], y=[p["flops_per_s"] for p in measured],
                        text=[p["label"] for p in measured], mode="markers", name="measured",
                        marker=dict(symbol="x", size=10, color="#e45756"))
    return styled(fig, title=f"{profile.name} roofline, {dtype}: peak {peak / 1e12:.3g} TFLOP/s, "
                  f"{profile.mem_bw / 1e9:.0f} GB/s, ridge at {ridge:.0f} FLOP/B",
                  xaxis=dict(title="arithmetic intensity (FLOP / byte)", type="log"),
                  yaxis=dict(title="FLOP/s", type="log"), width=760, height=440)


def measure_cpu_tiles(ns=(512, 1024), tiles=(64, 128, 256), **kw) -> list[dict]:
    """Deprecated: `fa2lab.bench.tiles.cpu_tile_rows` (figures only draw; the benchmark drivers measure)."""
    import warnings

    from fa2lab.bench.tiles import cpu_tile_rows

    warnings.warn("fa2lab.viz.hardware.measure_cpu_tiles moved to fa2lab.bench.tiles.cpu_tile_rows",
                  DeprecationWarning, stacklevel=2)
    return cpu_tile_rows(ns, tiles, **kw)


def gpu_predictions(results: dict, profile) -> list[dict]:
    """fa2lab's Triton rows of a GPU results file (fa2lab.viz.gpu.latest_gpu_results) with the
    profile's predicted time for the same shape (forward: fa2_forward; decode: decode)."""
    from fa2lab.cost import decode, fa2_forward

    rows = []
    for r in results.get("rows", []):
        if not r.get("impl", "").startswith("fa2lab") or "error" in r:
            continue
        if r["kind"] == "fwd":
            pred = fa2_forward(profile, r["B"], r["H"], r["N"], r["N"], r["D"], "bfloat16", causal=r["causal"]).time
            rows.append(dict(label=f"fwd N={r['N']} D={r['D']}{' causal' if r['causal'] else ''}", group="fwd",
                             measured_s=r["ms"] * 1e-3, predicted_s=pred))
        elif r["kind"] == "decode":
            pred = decode(profile, r["B"], r["Hq"], r["Hkv"], r["L"], r["D"], "bfloat16").time
            rows.append(dict(label=f"decode B={r['B']} L={r['L']}", group="decode", measured_s=r["us"] * 1e-6,
                             predicted_s=pred))
    return rows


def predicted_vs_measured_figure(rows: list[dict], title: str = "Predicted against measured") -> go.Figure:
    """Measured time (y) against the cost model's prediction (x), log-log; on the diagonal the model
    is exact, above it the hardware is slower than predicted. Title gives the geometric-mean ratio."""
    fig = go.Figure()
    for group in dict.fromkeys(r["group"] for r in rows):
        mine = [r for r in rows if r["group"] == group]
        fig.add_scatter(x=[r["predicted_s"] * 1e3 for r in mine], y=[r["measured_s"] * 1e3 for r in mine],
                        text=[r["label"] for r in mine], mode="markers", marker=dict(size=9), name=group,
                        hovertemplate="%{text}: predicted %{x:.3g} ms, measured %{y:.3g} ms<extra></extra>")
    if rows:
        lo = min(min(r["predicted_s"], r["measured_s"]) for r in rows) * 1e3 / 1.5
        hi = max(max(r["predicted_s"], r["measured_s"]) for r in rows) * 1e3 * 1.5
        fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="measured = predicted",
                        line=dict(dash="dot", color=GOOD))
    ratio = geomean_ratio(rows)
    return styled(fig, title=f"{title} (measured / predicted: geometric mean {ratio:.2f})" if ratio else title,
                  xaxis=dict(title="predicted ms", type="log"), yaxis=dict(title="measured ms", type="log"),
                  width=700, height=440)


def geomean_ratio(rows: list[dict]) -> float | None:
    """Geometric mean of measured / predicted over the rows not contended (None without any)."""
    logs = [math.log(r["measured_s"] / r["predicted_s"]) for r in rows
            if r["measured_s"] > 0 and r["predicted_s"] > 0 and not r.get("contended")]
    return math.exp(sum(logs) / len(logs)) if logs else None


def profile_for_device(device: str) -> str | None:
    """The built-in profile whose name appears in a device name ('NVIDIA H100 80GB HBM3' -> 'h100'),
    longest name first; None if no profile matches."""
    from fa2lab.hardware import list_profiles

    squashed = "".join(device.lower().split())
    return next((n for n in sorted(list_profiles(), key=len, reverse=True) if n.replace("-", "") in squashed), None)


def gpu_roofline_measured(results: dict, profile) -> list[dict]:
    """fa2lab's Triton rows of a GPU results file as roofline points: the model's intensity for the
    shape, and the FLOP/s actually reached (the model's FLOPs over the measured time)."""
    from fa2lab.cost import decode, fa2_forward

    pts = []
    for r in results.get("rows", []):
        if not r.get("impl", "").startswith("fa2lab") or "error" in r:
            continue
        if r["kind"] == "fwd":
            m = fa2_forward(profile, r["B"], r["H"], r["N"], r["N"], r["D"], "bfloat16", causal=r["causal"])
            pts.append(dict(label=f"fwd N={r['N']} D={r['D']}{' causal' if r['causal'] else ''}",
                            intensity=m.intensity, flops_per_s=m.flops / (r["ms"] * 1e-3)))
        elif r["kind"] == "decode":
            m = decode(profile, r["B"], r["Hq"], r["Hkv"], r["L"], r["D"], "bfloat16")
            pts.append(dict(label=f"decode B={r['B']} L={r['L']}", intensity=m.intensity,
                            flops_per_s=m.flops / (r["us"] * 1e-6)))
    return pts
