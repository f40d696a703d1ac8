"""Figures are plotly objects built from real traces."""

import pytest
import torch

from fa2lab import TileTracer, tiled_attention, viz


def _trace(**kw):
    q = k = v = torch.randn(1, 2, 40, 8)
    tracer = TileTracer()
    tiled_attention(q, k, v, block_q=16, block_k=16, tracer=tracer, **kw)
    return tracer


def test_tile_schedule_figure_shows_the_traced_grid():
    fig = viz.tile_schedule_figure(_trace(causal=True))
    heat = fig.data[0]
    assert [list(r) for r in heat.z] == [[2, 0, 0], [1, 2, 0], [1, 1, 2]]  # partial=2, full=1, skipped=0
    assert "3 full, 3 masked, 3 skipped" in fig.layout.title.text


def test_running_stats_figure():
    fig = viz.running_stats_figure(_trace(), q_tile=2, row=1)
    assert [len(t.x) for t in fig.data] == [3, 3]
    with pytest.raises(ValueError, match="no recorded steps"):
        viz.running_stats_figure(TileTracer())


def test_splitk_and_unified_max_figures():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1, 16, generator=g) * 3
    k, v = torch.randn(1, 1, 300, 16, generator=g), torch.randn(1, 1, 300, 16, generator=g)
    fig = viz.splitk_merge_figure(q, k, v, 3)
    assert len(fig.data[0].x) == 1  # 300 keys are one 512-key tile: never more splits than tiles
    assert fig.data[2].y[-1] < 1e-5  # merging every split gives the exact result
    fig = viz.unified_max_figure(q, k, v, [-200, 0, 300])
    colors = list(fig.data[0].marker.color)
    assert colors[1] == "#4c78a8" and colors[0] == colors[2] == "#e45756"
