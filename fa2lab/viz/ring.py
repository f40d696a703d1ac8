"""Ring attention (context parallelism): the schedule of a `fa2lab.distributed.plan_ring` plan
and the log-sum-exp merge of each rank's partial results, step by step.

    ring_schedule_figure(plan)        which K/V shard each rank holds at each step, the step at
                                      which each (query, key) pair of the sequence is computed,
                                      and the work per rank for both layouts
    ring_merge_errors(q, k, v, plan)  each rank's error against float64 after each ring step
    ring_merge_figure(errors)         the same as a figure
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from fa2lab import masks
from fa2lab.distributed.plan import RingPlan, plan_ring
from fa2lab.viz.style import f32, styled


def pair_steps(plan: RingPlan) -> np.ndarray:
    """(Nq, Nk) float array over the gathered sequence: the ring step at which the pair is
    computed (by the rank holding the query), NaN where the mask hides it. Filled from the plan's
    computed blocks (`RingPlan.global_blocks`), intersected with the global mask."""
    w = plan.world_size
    nq, nk = w * plan.nq_local, w * plan.nk_local
    visible = masks.dense_mask(nq, nk, plan.causal, plan.window_size).numpy()
    steps = np.full((nq, nk), np.nan)
    for blk in plan.global_blocks():
        region = (slice(blk["q0"], blk["q1"]), slice(blk["k0"], blk["k1"]))
        steps[region] = np.where(visible[region], blk["step"], steps[region])
    return steps


def _balance(world_size, n_local, causal, window_size) -> dict[str, list[int]]:
    out = {}
    for layout in ("contiguous", "zigzag"):
        try:
            plan = plan_ring(world_size, n_local, causal=causal, window_size=window_size, layout=layout)
        except ValueError:  # zigzag needs even shard lengths
            continue
        out[layout] = [row["pairs"] for row in plan.balance()]
    return out


def ring_schedule_figure(plan: RingPlan) -> go.Figure:
    w = plan.world_size
    sched = plan.schedule()
    work = np.zeros((w, w))
    text = [["" for _ in range(w)] for _ in range(w)]
    for row in sched:
        work[row["rank"], row["step"]] = row["pairs"]
        text[row["rank"]][row["step"]] = f"K/V of {row['kv_rank']}" + ("" if row["computed"] else " (skip)")
    fig = make_subplots(rows=1, cols=3, column_widths=[0.3, 0.4, 0.3], horizontal_spacing=0.09,
                        subplot_titles=("K/V shard held (colour: pairs computed)",
                                        f"step computing each pair ({plan.layout})", "pairs per rank"))
    fig.add_heatmap(z=f32(work), x=list(range(w)), y=list(range(w)), text=text, texttemplate="%{text}",
                    colorscale="Blues", showscale=False, hovertemplate="rank %{y}, step %{x}: %{z} pairs<extra></extra>",
                    row=1, col=1)
    fig.add_heatmap(z=f32(pair_steps(plan)), colorscale="Viridis", zmin=0, zmax=max(w - 1, 1),
                    colorbar=dict(title="step", x=0.66, len=0.9), hoverongaps=False,
                    hovertemplate="query %{y}, key %{x}: step %{z}<extra></extra>", row=1, col=2)
    for layout, pairs in _balance(w, plan.nq_local, plan.causal, plan.window_size).items():
        if plan.nk_local == plan.nq_local:
            fig.add_bar(x=[f"rank {r}" for r in range(w)], y=pairs, name=layout, row=1, col=3)
    fig.update_xaxes(title_text="step", dtick=1, row=1, col=1)
    fig.update_yaxes(title_text="rank", dtick=1, autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="key position", row=1, col=2)
    fig.update_yaxes(title_text="query position", autorange="reversed", scaleanchor="x2", row=1, col=2)
    crit = plan.critical_path_pairs()
    total = sum(row["pairs"] for row in plan.balance())
    return styled(fig, width=1100, height=420, barmode="group", legend=dict(x=1.0, y=1.0),
                  title=f"Ring of {w} ranks, {plan.layout} layout: critical path {crit} pairs "
                        f"(perfect balance: {total / w:.0f})")


def ring_merge_errors(q, k, v, plan: RingPlan) -> list[dict]:
    """One row per (rank, step): max |merged output - float64 attention| over the rank's query
    shard after merging the blocks of steps 0..step (rows that saw no key yet count their full
    value), and how many of its query rows have seen a key."""
    from fa2lab.distributed.simulate import shard, simulate_ring
    from fa2lab.reference import attention_ref

    truth = attention_ref(q.double(), k.double(), v.double(), causal=plan.causal, window_size=plan.window_size)
    rows = []
    for rank, states in enumerate(simulate_ring(q, k, v, plan)):
        exact = shard(truth, plan, rank, plan.nq_local)
        for step, (out, lse) in enumerate(states):
            rows.append(dict(rank=rank, step=step, max_error=(out.double() - exact).abs().max().item(),
                             rows_with_keys=int(torch.isfinite(lse[0, 0]).sum())))
    return rows


def ring_merge_figure(errors: list[dict]) -> go.Figure:
    fig = go.Figure()
    for rank in sorted({r["rank"] for r in errors}):
        mine = [r for r in errors if r["rank"] == rank]
        fig.add_scatter(x=[r["step"] for r in mine], y=[max(r["max_error"], 1e-17) for r in mine],
                        mode="lines+markers", name=f"rank {rank}",
                        customdata=[r["rows_with_keys"] for r in mine],
                        hovertemplate="step %{x}: error %{y:.2e}, %{customdata} rows have seen a key<extra></extra>")
    fig.update_yaxes(type="log", title_text="max |merged - float64| (floor 1e-17)")
    fig.update_xaxes(title_text="ring step (K/V shards merged so far: step + 1)", dtick=1)
    return styled(fig, width=700, height=380, title="Each rank's output converges to exact attention as the "
                                                    "K/V shards arrive")
