"""KV caches (notebook 05): the paged allocator's page table as sequences grow and finish, the
sliding-window ring buffer, and memory saved against output error of compressed caches.

Every picture is read off the real cache classes of fa2lab.kvcache, driven with tiny tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from fa2lab.kvcache import PagedKVCache, SlidingWindowKVCache
from fa2lab.viz.style import f32, styled

PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d",
           "#ff9da6", "#bab0ac"]


@dataclass
class PagedTrace:
    """Snapshots of a PagedKVCache after every step of a little serving workload."""

    num_pages: int
    page_size: int
    owners: list[list[int]] = field(default_factory=list)  # per step: sequence id owning each page, -1 free
    tables: list[dict] = field(default_factory=list)  # per step: {seq id: [physical page, ...]}
    lengths: list[dict] = field(default_factory=list)  # per step: {seq id: tokens held}
    utilisation: list[float] = field(default_factory=list)  # per step: tokens held / slots of used pages
    events: list[str] = field(default_factory=list)  # per step: what happened


def simulate_paged(num_pages: int = 24, page_size: int = 4, steps: int = 40, max_active: int = 4,
                   prompt_range=(2, 10), output_range=(4, 24), seed: int = 0) -> PagedTrace:
    """Serve sequences from one page pool: up to `max_active` at a time, each arriving with a
    prompt (prompt_range tokens), then growing one token per step until it has produced its
    output (output_range tokens) and is freed. A sequence that does not fit waits."""
    if min(num_pages, page_size, steps, max_active) < 1:
        raise ValueError(f"expected positive sizes, got num_pages={num_pages}, page_size={page_size}, "
                         f"steps={steps}, max_active={max_active}")
    rng = np.random.default_rng(seed)
    cache = PagedKVCache(num_pages, page_size, heads_kv=1, head_dim=1, dtype=torch.float32)
    trace = PagedTrace(num_pages, page_size)
    remaining: dict[int, int] = {}  # seq id -> tokens still to generate
    next_id, waiting = 0, None
    for _ in range(steps):
        events = []
        for s in [s for s, left in remaining.items() if left == 0]:
            cache.free(s)
            del remaining[s]
            events.append(f"seq {s} done")
        for s in remaining:
            try:
                cache.append(s, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))  # one decoded token
                remaining[s] -= 1
            except RuntimeError:  # needs a new page and none is free: it stalls this step
                events.append(f"seq {s} stalls")
        if len(remaining) < max_active:
            if waiting is None:
                waiting = (next_id, int(rng.integers(*prompt_range, endpoint=True)),
                           int(rng.integers(*output_range, endpoint=True)))
                next_id += 1
            s, prompt, output = waiting
            cache.add_sequence(s)
            try:
                cache.append(s, torch.zeros(1, prompt, 1), torch.zeros(1, prompt, 1))
                remaining[s], waiting = output, None
                events.append(f"seq {s} arrives ({prompt} tokens)")
            except RuntimeError:  # pool exhausted: nothing was taken; try again next step
                cache.free(s)
                events.append(f"seq {s} waits for pages")
        owners = [-1] * num_pages
        for s, pages in cache.pages.items():
            for p in pages:
                owners[p] = s
        trace.owners.append(owners)
        trace.tables.append({s: list(p) for s, p in cache.pages.items()})
        trace.lengths.append(dict(cache.lengths))
        trace.utilisation.append(cache.utilisation())
        trace.events.append("; ".join(events) or "decode")
    return trace


def page_timeline_figure(trace: PagedTrace) -> go.Figure:
    """Which sequence owns each physical page at every step (blank: free), and the share of the
    token slots of used pages that hold tokens (only the last page of a sequence has holes)."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3], horizontal_spacing=0.1,
                        subplot_titles=("page owner over time", "utilisation of used pages"))
    z = np.array(trace.owners, dtype=np.float32)
    z[z < 0] = np.nan
    n_ids = int(np.nanmax(z)) + 1 if np.isfinite(z).any() else 1
    colorscale = [[i / max(1, n_ids - 1), PALETTE[i % len(PALETTE)]] for i in range(n_ids)] if n_ids > 1 \
        else [[0, PALETTE[0]], [1, PALETTE[0]]]
    fig.add_heatmap(z=z, colorscale=colorscale, showscale=False, xgap=1, ygap=1, zmin=0, zmax=max(1, n_ids - 1),
                    hovertemplate="page %{x}, step %{y}: seq %{z}<extra></extra>", row=1, col=1)
    steps = list(range(len(trace.utilisation)))
    fig.add_scatter(x=f32(trace.utilisation), y=steps, mode="lines", name="utilisation", row=1, col=2)
    fig.update_yaxes(autorange="reversed", title_text="step")
    fig.update_xaxes(title_text="physical page", row=1, col=1)
    fig.update_xaxes(title_text="tokens / slots", range=[0, 1.05], row=1, col=2)
    return styled(fig, title=f"Paged KV cache: {trace.num_pages} pages of {trace.page_size} tokens, "
                  f"{len(steps)} steps", width=900, height=460, showlegend=False)


def page_table_figure(trace: PagedTrace, step: int) -> go.Figure:
    """The block table at one step: a row per live sequence, its logical pages in order, each cell
    naming the physical page it maps to; the title says what happened at that step."""
    if not 0 <= step < len(trace.tables):
        raise ValueError(f"step {step} outside the {len(trace.tables)} recorded steps")
    table, lengths = trace.tables[step], trace.lengths[step]
    seqs = sorted(table)
    width = max([len(p) for p in table.values()] + [1])
    z = np.full((max(1, len(seqs)), width), np.nan, dtype=np.float32)
    text = [[""] * width for _ in range(max(1, len(seqs)))]
    for row, s in enumerate(seqs):
        for j, page in enumerate(table[s]):
            z[row, j] = s % len(PALETTE)
            text[row][j] = str(page)
    colorscale = [[i / (len(PALETTE) - 1), c] for i, c in enumerate(PALETTE)]
    fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", colorscale=colorscale, zmin=0,
                               zmax=len(PALETTE) - 1, showscale=False, xgap=2, ygap=2, hoverinfo="skip"))
    fig.update_yaxes(tickvals=list(range(len(seqs))),
                     ticktext=[f"seq {s} ({lengths[s]} tok)" for s in seqs], autorange="reversed")
    return styled(fig, title=f"Block table at step {step}: {trace.events[step]}", xaxis_title="logical page",
                  width=620, height=120 + 40 * max(1, len(seqs)))


def window_ring(window: int, tokens: int, max_new_tokens: int = 1) -> np.ndarray:
    """(tokens, C) absolute position held by each ring slot of a SlidingWindowKVCache after each
    of `tokens` single-token appends (-1: empty), read back from the cache's own buffer."""
    cache = SlidingWindowKVCache(1, 1, window, 1, max_new_tokens=max_new_tokens, dtype=torch.float32)
    held = np.full((tokens, cache.capacity), -1, dtype=np.float32)
    for t in range(tokens):
        cache.append(torch.full((1, 1, 1, 1), float(t)), torch.zeros(1, 1, 1, 1))
        slots = cache.k[0, 0, :, 0].numpy()  # the token's own position was stored as its key
        filled = min(t + 1, cache.capacity)
        held[t, :filled] = slots[:filled]
    return held


def window_ring_figure(window: int, tokens: int, max_new_tokens: int = 1) -> go.Figure:
    """Ring slots (columns) after each appended token (rows): the number is the token a slot holds.
    Memory is fixed at C = window + max_new_tokens - 1 slots however long the sequence grows."""
    held = window_ring(window, tokens, max_new_tokens)
    text = [[("" if v < 0 else str(int(v))) for v in row] for row in held]
    z = held.copy()
    z[z < 0] = np.nan
    fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", colorscale="Blues", showscale=False,
                               xgap=1, ygap=1, hovertemplate="slot %{x}, after %{y} tokens: %{text}<extra></extra>"))
    return styled(fig, title=f"Sliding-window ring buffer: W={window}, {held.shape[1]} slots",
                  xaxis_title="ring slot", yaxis=dict(title="tokens appended - 1", autorange="reversed"),
                  width=120 + 40 * held.shape[1], height=160 + 16 * tokens)


def tradeoff_figure(rows) -> go.Figure:
    """Memory against fp16 (x) and relative output error (y, log) of each cache configuration of
    fa2lab.bench.kvmemory.cache_tradeoffs: lower left is better."""
    fig = go.Figure()
    for i, cache in enumerate(dict.fromkeys(r.cache for r in rows)):
        mine = [r for r in rows if r.cache == cache]
        fig.add_scatter(x=[r.memory_vs_fp16 for r in mine], y=[max(r.rel_err, 1e-9) for r in mine],
                        text=[r.setting for r in mine], mode="markers+text", textposition="top center",
                        name=cache, marker=dict(size=10, color=PALETTE[i % len(PALETTE)]))
    return styled(fig, title="KV cache memory against decode error (errors below 1e-9 drawn at 1e-9)",
                  xaxis_title="memory / fp16 static cache", yaxis=dict(title="relative error", type="log"),
                  width=760, height=440)


def paged_vs_dense_error(page_size: int, lengths=(37, 20), *, heads_q: int = 4, heads_kv: int = 2,
                         head_dim: int = 16, seed: int = 0) -> float:
    """Max |paged - dense| decode output for sequences of `lengths` held in a PagedKVCache of
    `page_size`, each against decode_attention over its own dense cache (float32)."""
    from fa2lab.decode import decode_attention

    g = torch.Generator().manual_seed(seed)
    pages = sum(-(-n // page_size) for n in lengths) + 1
    cache = PagedKVCache(pages, page_size, heads_kv, head_dim, dtype=torch.float32)
    dense = []
    for s, n in enumerate(lengths):
        k, v = (torch.randn(heads_kv, n, head_dim, generator=g) for _ in range(2))  # (Hkv, n, D)
        cache.add_sequence(s)
        cache.append(s, k, v)
        dense.append((k[None], v[None]))  # (1, Hkv, n, D)
    q = torch.randn(len(lengths), heads_q, 1, head_dim, generator=g)  # (B, Hq, 1, D)
    paged = cache.attend(q, list(range(len(lengths))))
    ref = torch.cat([decode_attention(q[b:b + 1], k, v) for b, (k, v) in enumerate(dense)])
    return (paged - ref).abs().max().item()
