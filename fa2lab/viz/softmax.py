"""The online softmax of one row of scores, streamed tile by tile (notebook 01).

The row s (N,) and its values V (N, Dv) are visited Bc keys at a time, keeping only the running
max m, the running sum l and an unnormalised output acc, as FA2's forward does per query row
(fa2lab/tiled/forward.py, Algorithm 1), with the same step function
(fa2lab/tiled/softmax.online_softmax_step):

    m'   = max(m, max(s_j))                  new running max
    alpha = exp(m - m')                      rescale factor of everything accumulated so far
    l    = alpha * l + sum(exp(s_j - m'))
    acc  = alpha * acc + exp(s_j - m') V_j
    out  = acc / l                           after the last tile: exactly softmax(s) V
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from fa2lab.tiled.softmax import online_softmax_step
from fa2lab.viz.style import BAD, GOOD, f32, styled


@dataclass(frozen=True)
class OnlineSoftmaxTrace:
    scores: torch.Tensor  # (N,) the row, float64
    block: int  # Bc
    tile_end: list[int]  # keys seen after each tile
    m: list[float]  # running max after each tile
    l: list[float]  # running sum after each tile
    alpha: list[float]  # rescale factor applied at each tile (1 at the first)
    err: list[float]  # max |acc / l - softmax(s) V| after each tile
    out: torch.Tensor  # (Dv,) final acc / l
    exact: torch.Tensor  # (Dv,) softmax(s) V in one shot
    probs: torch.Tensor  # (N,) exp(s - m) / l with the final m, l
    exact_probs: torch.Tensor  # (N,) torch.softmax(s)


def online_softmax_trace(scores: torch.Tensor, values: torch.Tensor, block: int) -> OnlineSoftmaxTrace:
    """Stream scores (N,) and values (N, Dv) in tiles of `block` keys, in float64."""
    if scores.dim() != 1 or values.dim() != 2 or values.shape[0] != scores.shape[0]:
        raise ValueError(f"expected scores (N,) and values (N, Dv) with the same N, got {tuple(scores.shape)} "
                         f"and {tuple(values.shape)}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"expected a positive tile size, got block={block!r}")
    s, v = scores.double(), values.double()
    exact = torch.softmax(s, 0) @ v  # (Dv,)
    # One query row: m, l (1, 1), acc (1, Dv); the step is the tiled forward's own.
    m = torch.full((1, 1), -math.inf, dtype=torch.float64)
    l = torch.zeros(1, 1, dtype=torch.float64)
    acc = torch.zeros(1, v.shape[1], dtype=torch.float64)
    ends, ms, ls, alphas, errs = [], [], [], [], []
    for j0 in range(0, s.shape[0], block):
        s_j, v_j = s[j0:j0 + block].clone()[None, :], v[j0:j0 + block]  # (1, Bc), (Bc, Dv)
        # alpha is 0 at the first tile (m = -inf): nothing to rescale yet.
        m, l, acc, alpha = online_softmax_step(s_j, m, l, acc, v_j)
        ends.append(j0 + v_j.shape[0])
        ms.append(m.item())
        ls.append(l.item())
        alphas.append(alpha.item() if j0 else 1.0)
        errs.append((acc[0] / l.item() - exact).abs().max().item())
    out = acc[0] / l.item()
    return OnlineSoftmaxTrace(s, block, ends, ms, ls, alphas, errs, out, exact, (s - m.item()).exp() / l.item(),
                              torch.softmax(s, 0))


def online_softmax_figure(trace: OnlineSoftmaxTrace) -> go.Figure:
    """Three panels: the scores with the running max after each tile; the running sum l and the
    rescale factor alpha; the error of the running output acc / l against softmax(s) V."""
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
        "scores and running max m", "running sum l and rescale alpha", "max |acc/l - softmax(s)V|"))
    n = trace.scores.shape[0]
    fig.add_scatter(x=f32(range(n)), y=f32(trace.scores), mode="markers", marker=dict(size=4, color="#999999"),
                    name="score s_j", row=1, col=1)
    # Running max as a step over the keys seen so far.
    starts = [0] + trace.tile_end[:-1]
    fig.add_scatter(x=[x for a, b in zip(starts, trace.tile_end) for x in (a, b)],
                    y=[m for m in trace.m for _ in range(2)], mode="lines", line=dict(color=GOOD, width=2),
                    name="running max m", row=1, col=1)
    fig.add_scatter(x=trace.tile_end, y=trace.l, mode="lines+markers", name="running sum l", row=1, col=2)
    fig.add_bar(x=trace.tile_end, y=trace.alpha, name="alpha = exp(m_old - m_new)", marker_color="#f58518",
                opacity=0.6, row=1, col=2)
    fig.add_scatter(x=trace.tile_end, y=[max(e, 1e-17) for e in trace.err], mode="lines+markers",
                    name="output error", line=dict(color=BAD), row=1, col=3)
    fig.update_yaxes(type="log", row=1, col=3)
    fig.update_yaxes(type="log", row=1, col=2)
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="keys seen" if col > 1 else "key j", row=1, col=col)
    final = trace.err[-1]
    return styled(fig, title=f"Online softmax, N={n}, Bc={trace.block}: {len(trace.tile_end)} tiles; "
                  f"error after the last tile {final:.1e}", width=1050, height=380,
                  legend=dict(orientation="h", y=-0.2), margin=dict(t=70))


def softmax_stability(offsets, n: int = 64, dtype=torch.float32, seed: int = 0) -> dict[str, list[float]]:
    """Max error against float64 of the naive softmax exp(s) / sum(exp(s)) and of the safe one
    exp(s - max s) / sum(...), in `dtype`, for rows s = offset + N(0, 1) (n logits each).
    A NaN error (inf / inf, 0 / 0) is reported as inf."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    naive, safe = [], []
    for off in offsets:
        s64 = base + float(off)
        truth = torch.softmax(s64, 0)
        s = s64.to(dtype)
        e = s.exp()
        p_naive = e / e.sum()
        e = (s - s.max()).exp()
        p_safe = e / e.sum()
        for out, p in ((naive, p_naive), (safe, p_safe)):
            err = (p.double() - truth).abs().max().item()
            out.append(err if err == err else math.inf)
    return {"offset": [float(o) for o in offsets], "naive": naive, "safe": safe}


def naive_vs_safe_figure(offsets, n: int = 64, dtype=torch.float32, seed: int = 0) -> go.Figure:
    """Error of the naive and the max-subtracted softmax against float64 as the logits grow: the
    naive one overflows (exp(s) = inf, inf / inf = NaN) above log(float max) ~ 88.7 in float32,
    and divides 0 by 0 once every exp(s) underflows; the safe one never does."""
    res = softmax_stability(offsets, n, dtype, seed)
    cap = 1.0
    fig = go.Figure()
    for name, color in (("naive", BAD), ("safe", GOOD)):
        errs = res[name]
        fig.add_scatter(x=res["offset"], y=[min(max(e, 1e-12), cap) for e in errs], mode="lines+markers",
                        name=f"{name} (NaN shown at {cap:g})", line=dict(color=color),
                        marker=dict(symbol=["x" if e == math.inf else "circle" for e in errs], size=8))
    limit = math.log(torch.finfo(dtype).max)
    for x in (limit, -limit):
        fig.add_vline(x=x, line_dash="dot", line_color="#888888")
    return styled(fig, title=f"Naive vs safe softmax in {str(dtype).removeprefix('torch.')}: |log(max)| = "
                  f"{limit:.1f} (dotted)", xaxis_title="logit offset (row = offset + N(0,1))",
                  yaxis=dict(title="max |p - p_float64|", type="log"), width=760, height=380)
