"""Ring attention (context parallelism): the schedule of a `fa2lab.distributed.plan_ring` plan
and the log-sum-exp merge of each rank's partial results, step by step.

    ring_schedule_figure(plan)        which K/V shard each rank holds at each step, the step at
                                      which each (query, key) pair of the sequence is computed,
                                      and the work per rank for both layouts
    ring_merge_errors(q, k, v, plan)  each rank's error against float64 after each ring step
    ring_merge_figure(errors)         the same as a figure
    comm_table(plan, uplan, ...)      bytes one rank sends at each step of the ring and of Ulysses
    comm_steps_figure(rows)           the same as bars, one panel per schedule
    ulysses_heads_figure(uplan)       which heads each rank holds before and after the all-to-all
    comm_by_world_size(n_local, ...)  total bytes per rank against W for both schedules
    comm_totals_figure(rows)          the same as a figure
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from fa2lab import masks
from fa2lab.distributed.plan import RingPlan, plan_ring
from fa2lab.distributed.ulysses import UlyssesPlan, check_ulysses_heads, plan_ulysses
from fa2lab.viz.style import TEMPLATE, f32, styled


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


# Ring or Ulysses: what travels at each step. Every row comes from the plans' comm_volume.


def ulysses_refusal(world_size: int, heads_q: int, heads_kv: int) -> str | None:
    """None if Ulysses can split Hq and Hkv over `world_size` ranks, else `check_ulysses_heads`'
    message (W must divide both, so W <= Hkv)."""
    try:
        check_ulysses_heads(world_size, heads_q, heads_kv)
    except ValueError as e:
        return str(e)
    return None


def _check_same_problem(plan: RingPlan, uplan: UlyssesPlan, heads_q: int, heads_kv: int) -> None:
    ring = (plan.world_size, plan.nq_local, plan.nk_local, heads_q, heads_kv)
    uly = (uplan.world_size, uplan.nq_local, uplan.nk_local, uplan.heads_q, uplan.heads_kv)
    if ring != uly:
        raise ValueError(f"expected the ring and Ulysses plans of one problem (W, Nq_local, Nk_local, Hq, Hkv), got "
                         f"{ring} for the ring and {uly} for Ulysses; plan both with the same shapes")


def comm_table(plan: RingPlan, uplan: UlyssesPlan | None, *, batch: int, heads_q: int, heads_kv: int,
               head_dim: int, head_dim_v: int | None = None, itemsize: int = 2, grad_itemsize: int = 4,
               backward: bool = True) -> list[dict]:
    """Bytes one rank sends at each step of both schedules of one problem: the rows of
    `RingPlan.comm_volume` then `UlyssesPlan.comm_volume` (schedule, phase, step, what,
    bytes_sent, world_size), each with a `label` ("fwd 0", "bwd 1", ...) for the figures.
    uplan=None (Ulysses cannot split the heads, see `ulysses_refusal`) gives the ring's rows alone.
    itemsize: bytes of q, k, v, out and of Ulysses' gradients; grad_itemsize: the ring's dK/dV."""
    rows = plan.comm_volume(batch, heads_q, heads_kv, head_dim, head_dim_v, itemsize=itemsize,
                            grad_itemsize=grad_itemsize, backward=backward)
    if uplan is not None:
        _check_same_problem(plan, uplan, heads_q, heads_kv)
        rows += uplan.comm_volume(batch, head_dim, head_dim_v, itemsize=itemsize, backward=backward)
    short = dict(forward="fwd", backward="bwd")
    return [dict(row, label=f"{short[row['phase']]} {row['step']}") for row in rows]


def comm_steps_figure(rows: list[dict], note: str = "") -> go.Figure:
    """`comm_table` rows as bars: bytes one rank sends per step, ring left, Ulysses right (same
    y axis). `note` is written in the Ulysses panel when it has no rows (why it cannot run)."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=("ring: one K/V shard per hop, B*Hkv*N_local*(D+Dv)*bytes",
                                        "Ulysses: (W-1)/W of q, k, v / out per all-to-all"))
    colours = dict(forward=TEMPLATE.layout.colorway[0], backward=TEMPLATE.layout.colorway[1])
    for col, schedule in enumerate(("ring", "ulysses"), start=1):
        mine = [r for r in rows if r["schedule"] == schedule]
        for phase in ("forward", "backward"):
            part = [r for r in mine if r["phase"] == phase]
            if part:
                fig.add_bar(x=[r["label"] for r in part], y=[r["bytes_sent"] for r in part], name=phase,
                            marker_color=colours[phase], legendgroup=phase, showlegend=col == 1,
                            customdata=[r["what"] for r in part],
                            hovertemplate="%{x}: %{customdata}, %{y:,} bytes<extra></extra>", row=1, col=col)
        if not mine and schedule == "ulysses" and note:
            fig.add_annotation(text=note[:120] + ("..." if len(note) > 120 else ""), showarrow=False,
                               xref="x2 domain", yref="y2 domain", x=0.5, y=0.5)
    fig.update_yaxes(title_text="bytes sent per rank", tickformat="~s", row=1, col=1)
    fig.update_xaxes(title_text="step", type="category")
    w = rows[0]["world_size"] if rows else 0
    total = {s: sum(r["bytes_sent"] for r in rows if r["schedule"] == s) for s in ("ring", "ulysses")}
    uly = f"{total['ulysses']:,}" if any(r["schedule"] == "ulysses" for r in rows) else "n/a"
    return styled(fig, width=1000, height=400, legend=dict(x=1.0, y=1.0),
                  title=f"Bytes one rank sends at each step, W = {w}: ring {total['ring']:,}, Ulysses {uly} in all")


def _rank_colorscale(world_size: int) -> list:
    colours = TEMPLATE.layout.colorway
    scale = []
    for r in range(world_size):  # one flat band per rank: z = rank reads as that rank's colour
        c = colours[r % len(colours)]
        scale += [(r / world_size, c), ((r + 1) / world_size, c)]
    return scale


def ulysses_heads_figure(uplan: UlyssesPlan) -> go.Figure:
    """Which rank holds each (head, shard of positions) block, from `UlyssesPlan.heads_of`.
    Before the all-to-all rank j holds every head of shard j (k and v alike); after it, rank j
    holds query heads [j*Hq/W, (j+1)*Hq/W) and K/V heads [j*Hkv/W, (j+1)*Hkv/W) of every shard."""
    w = uplan.world_size
    owner_q = np.zeros(uplan.heads_q, dtype=int)
    owner_kv = np.zeros(uplan.heads_kv, dtype=int)
    for r in range(w):
        h = uplan.heads_of(r)
        owner_q[slice(*h["q_heads"])] = r
        owner_kv[slice(*h["kv_heads"])] = r
    before = np.tile(np.arange(w), (uplan.heads_q, 1))  # (Hq, W): shard j sits on rank j
    after_q = np.tile(owner_q[:, None], (1, w))  # (Hq, W)
    after_kv = np.tile(owner_kv[:, None], (1, w))  # (Hkv, W)
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08,
                        subplot_titles=("before: q (k, v alike) by position", "after: query heads",
                                        "after: K/V heads"))
    shards = [f"shard {j}" for j in range(w)]
    for col, z in enumerate((before, after_q, after_kv), start=1):
        fig.add_heatmap(z=f32(z), x=shards, y=list(range(z.shape[0])), text=[[f"r{v}" for v in row] for row in z],
                        texttemplate="%{text}", colorscale=_rank_colorscale(w), zmin=-0.5, zmax=w - 0.5,
                        showscale=False, xgap=1, ygap=1,
                        hovertemplate="head %{y}, %{x}: on rank %{text}<extra></extra>", row=1, col=col)
        fig.update_yaxes(autorange="reversed", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="query head", row=1, col=1)
    fig.update_yaxes(title_text="K/V head", row=1, col=3)
    fig.update_xaxes(title_text=f"positions (N_local = {uplan.nq_local} each)")
    g = uplan.heads_q // uplan.heads_kv
    return styled(fig, width=1000, height=380,
                  title=f"Ulysses over {w} ranks: rank j computes query heads [{uplan.heads_q_local}j, "
                        f"{uplan.heads_q_local}(j+1)) against K/V heads [{uplan.heads_kv_local}j, "
                        f"{uplan.heads_kv_local}(j+1)) over all {w * uplan.nq_local} positions (G = {g})")


def comm_by_world_size(n_local: int, *, heads_q: int, heads_kv: int, head_dim: int, batch: int = 1,
                       world_sizes=(1, 2, 4, 8), head_dim_v: int | None = None, itemsize: int = 2,
                       grad_itemsize: int = 4) -> list[dict]:
    """Total bytes one rank sends per phase at each W, N_local fixed (weak scaling): one row per
    (world_size, schedule, phase), bytes_sent summed over `comm_table`'s steps, None with the
    reason in `note` where Ulysses cannot split the heads. The mask does not change the bytes
    (a skipped block's K/V shard still travels), so the ring is planned unmasked."""
    rows = []
    for w in world_sizes:
        refusal = ulysses_refusal(w, heads_q, heads_kv)
        uplan = None if refusal else plan_ulysses(w, n_local, heads_q=heads_q, heads_kv=heads_kv)
        steps = comm_table(plan_ring(w, n_local, layout="contiguous"), uplan, batch=batch, heads_q=heads_q,
                           heads_kv=heads_kv, head_dim=head_dim, head_dim_v=head_dim_v, itemsize=itemsize,
                           grad_itemsize=grad_itemsize)
        for schedule in ("ring", "ulysses"):
            for phase in ("forward", "backward"):
                sent = None if schedule == "ulysses" and refusal else \
                    sum(r["bytes_sent"] for r in steps if r["schedule"] == schedule and r["phase"] == phase)
                rows.append(dict(world_size=w, schedule=schedule, phase=phase, bytes_sent=sent,
                                 note=refusal if schedule == "ulysses" and refusal else ""))
    return rows


def comm_totals_figure(rows: list[dict]) -> go.Figure:
    """`comm_by_world_size` rows: bytes per rank against W, one line per (schedule, phase); gaps
    where Ulysses cannot run, named under the plot."""
    fig = go.Figure()
    ws = sorted({r["world_size"] for r in rows})
    for schedule, dash in (("ring", "solid"), ("ulysses", "dash")):
        for phase, colour in (("forward", TEMPLATE.layout.colorway[0]), ("backward", TEMPLATE.layout.colorway[1])):
            mine = sorted((r for r in rows if r["schedule"] == schedule and r["phase"] == phase),
                          key=lambda r: r["world_size"])
            if mine:
                fig.add_scatter(x=[str(r["world_size"]) for r in mine], y=[r["bytes_sent"] for r in mine],
                                mode="lines+markers", name=f"{schedule}, {phase}", line=dict(color=colour, dash=dash),
                                hovertemplate="W = %{x}: %{y:,} bytes<extra></extra>")
    refused = sorted({r["world_size"] for r in rows if r["schedule"] == "ulysses" and r["bytes_sent"] is None})
    if refused:
        fig.add_annotation(text=f"no Ulysses at W = {', '.join(map(str, refused))}: W must divide Hq and Hkv",
                           showarrow=False, xref="paper", yref="paper", x=0.0, y=-0.25, xanchor="left")
    fig.update_xaxes(title_text="ranks W (N_local fixed)", type="category", categoryarray=[str(w) for w in ws])
    fig.update_yaxes(title_text="bytes sent per rank", tickformat="~s")
    return styled(fig, width=800, height=420, margin=dict(b=90),
                  title="Per rank: the ring sends W-1 K/V shards, Ulysses (W-1)/W of its q, k, v, out (O(N_local))")
