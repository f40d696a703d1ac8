"""Notebook 08's communication view: the per-step table of the ring and Ulysses, its totals
against the plans' comm_volume and against the closed forms, Ulysses' head limit, the figures."""

import plotly.graph_objects as go
import pytest

from fa2lab import viz
from fa2lab.distributed import plan_ring, plan_ulysses


def _sum(rows, schedule, phase=None):
    return sum(r["bytes_sent"] for r in rows if r["schedule"] == schedule and phase in (None, r["phase"]))


def _plans(w, n, nk, hq, hkv, causal):
    uplan = None if viz.ring.ulysses_refusal(w, hq, hkv) else plan_ulysses(w, n, nk, heads_q=hq, heads_kv=hkv)
    return plan_ring(w, n, nk, causal=causal, layout="contiguous"), uplan


@pytest.mark.parametrize("w", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", [(24, 24), (24, 8), (48, 24), (8, 1)])
def test_step_totals_equal_comm_volume_and_the_closed_forms(w, causal, hq, hkv):
    b, n, nk, d, dv, isz, gisz = 2, 6, 10, 16, 8, 2, 4  # Nq_local != Nk_local, D != Dv: a swap shows
    plan, uplan = _plans(w, n, nk, hq, hkv, causal)
    assert (uplan is None) == bool(hq % w or hkv % w)
    rows = viz.ring.comm_table(plan, uplan, batch=b, heads_q=hq, heads_kv=hkv, head_dim=d, head_dim_v=dv,
                               itemsize=isz, grad_itemsize=gisz)
    ring = plan.comm_volume(b, hq, hkv, d, dv, itemsize=isz, grad_itemsize=gisz)
    for phase in ("forward", "backward"):
        assert _sum(rows, "ring", phase) == _sum(ring, "ring", phase)
    kv = b * hkv * nk * (d + dv)  # one K/V shard, elements
    assert _sum(rows, "ring", "forward") == (w - 1) * kv * isz
    assert _sum(rows, "ring", "backward") == ((w - 1) * kv * isz + w * kv * gisz if w > 1 else 0)
    assert [r["label"] for r in rows if r["schedule"] == "ring"][:w - 1] == [f"fwd {s}" for s in range(w - 1)]
    if uplan is None:
        assert not [r for r in rows if r["schedule"] == "ulysses"]
        return
    uly = uplan.comm_volume(b, d, dv, itemsize=isz)
    tensors = b * (hq * n * (d + dv) + hkv * nk * (d + dv))  # q, k, v and out of one rank, elements
    for phase in ("forward", "backward"):
        assert _sum(rows, "ulysses", phase) == _sum(uly, "ulysses", phase) == (w - 1) * tensors * isz // w
    assert {r["world_size"] for r in rows} == {w}


def test_a_ring_of_one_sends_nothing():
    plan, uplan = _plans(1, 8, 8, 4, 2, True)
    rows = viz.ring.comm_table(plan, uplan, batch=1, heads_q=4, heads_kv=2, head_dim=16)
    assert all(r["bytes_sent"] == 0 for r in rows)
    assert not [r for r in rows if r["schedule"] == "ring"]  # no hop at all, not even dK/dV home


def test_ulysses_refuses_a_degree_above_hkv():
    with pytest.raises(ValueError, match=r"Hq=16, Hkv=4, W=8.*at most Hkv=4.*ring_attention"):
        plan_ulysses(8, 16, heads_q=16, heads_kv=4)
    message = viz.ring.ulysses_refusal(8, 16, 4)
    assert "Hkv % W == 0" in message and "W=8" in message
    assert viz.ring.ulysses_refusal(4, 16, 4) is None
    assert viz.ring.ulysses_refusal(3, 6, 6) is None  # W need not be a power of two, only divide the heads
    assert "Hq % W" in viz.ring.ulysses_refusal(4, 6, 4)


def test_comm_table_refuses_plans_of_two_problems():
    with pytest.raises(ValueError, match=r"one problem.*\(4, 8, 8, 8, 4\) for the ring and \(4, 16, 16, 8, 4\)"):
        viz.ring.comm_table(plan_ring(4, 8), plan_ulysses(4, 16, heads_q=8, heads_kv=4), batch=1, heads_q=8,
                            heads_kv=4, head_dim=16)
    with pytest.raises(ValueError, match="one problem"):
        viz.ring.comm_table(plan_ring(4, 8), plan_ulysses(4, 8, heads_q=8, heads_kv=4), batch=1, heads_q=8,
                            heads_kv=8, head_dim=16)


def test_by_world_size_ring_grows_with_hops_ulysses_stays_bounded():
    n, hq, hkv, d = 16, 16, 4, 32
    rows = viz.ring.comm_by_world_size(n, heads_q=hq, heads_kv=hkv, head_dim=d, world_sizes=(1, 2, 4, 8))
    fwd = {(r["schedule"], r["world_size"]): r["bytes_sent"] for r in rows if r["phase"] == "forward"}
    hop = 1 * hkv * n * 2 * d * 2
    assert [fwd["ring", w] for w in (1, 2, 4, 8)] == [0, hop, 3 * hop, 7 * hop]
    tensors = n * (hq + hkv) * 2 * d * 2  # q, k, v, out of one rank at N_local: independent of W
    assert [fwd["ulysses", w] for w in (1, 2, 4)] == [0, tensors // 2, 3 * tensors // 4]
    assert fwd["ulysses", 8] is None  # W = 8 > Hkv = 4
    refused = [r for r in rows if r["schedule"] == "ulysses" and r["world_size"] == 8]
    assert len(refused) == 2 and all("at most Hkv=4" in r["note"] for r in refused)
    assert all(r["note"] == "" for r in rows if r["bytes_sent"] is not None)
    # the mask and layout do not change what travels
    plan, uplan = _plans(4, n, n, hq, hkv, causal=True)
    steps = viz.ring.comm_table(plan, uplan, batch=1, heads_q=hq, heads_kv=hkv, head_dim=d)
    assert _sum(steps, "ring", "backward") == next(r["bytes_sent"] for r in rows if
                                                   (r["schedule"], r["world_size"], r["phase"]) == ("ring", 4, "backward"))


def test_comm_steps_figure_draws_one_bar_per_step():
    plan, uplan = _plans(4, 8, 8, 8, 4, True)
    rows = viz.ring.comm_table(plan, uplan, batch=1, heads_q=8, heads_kv=4, head_dim=16)
    fig = viz.ring.comm_steps_figure(rows)
    assert isinstance(fig, go.Figure)
    ring = [t for t in fig.data if t.xaxis == "x"]
    uly = [t for t in fig.data if t.xaxis == "x2"]
    assert [len(t.x) for t in ring] == [3, 4] and [len(t.x) for t in uly] == [2, 2]
    assert sum(sum(t.y) for t in fig.data) == sum(r["bytes_sent"] for r in rows)
    assert ring[1].customdata[-1] == "dK/dV home"
    # without Ulysses rows the panel says why
    note = viz.ring.ulysses_refusal(8, 8, 4)
    ring_only = viz.ring.comm_table(plan_ring(8, 8), None, batch=1, heads_q=8, heads_kv=4, head_dim=16)
    fig = viz.ring.comm_steps_figure(ring_only, note=note)
    assert all(t.xaxis == "x" for t in fig.data)
    assert "W=8" in fig.layout.annotations[-1].text and "n/a" in fig.layout.title.text


def test_ulysses_heads_figure_follows_heads_of():
    uplan = plan_ulysses(4, 8, heads_q=8, heads_kv=4)
    fig = viz.ring.ulysses_heads_figure(uplan)
    before, after_q, after_kv = fig.data
    assert before.z.shape == (8, 4) and after_kv.z.shape == (4, 4)
    assert [int(before.z[0][j]) for j in range(4)] == [0, 1, 2, 3]  # shard j on rank j, every head
    for r in range(4):
        h = uplan.heads_of(r)
        for head in range(*h["q_heads"]):
            assert set(after_q.z[head].tolist()) == {r}
        for head in range(*h["kv_heads"]):
            assert set(after_kv.z[head].tolist()) == {r}
    assert after_q.text[7][0] == "r3"


def test_comm_totals_figure_leaves_gaps_where_ulysses_cannot_run():
    rows = viz.ring.comm_by_world_size(8, heads_q=4, heads_kv=2, head_dim=16)
    fig = viz.ring.comm_totals_figure(rows)
    assert isinstance(fig, go.Figure)
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {"ring, forward", "ring, backward", "ulysses, forward", "ulysses, backward"}
    assert list(by_name["ring, forward"].x) == ["1", "2", "4", "8"]
    assert list(by_name["ulysses, forward"].y)[2:] == [None, None]  # W = 4, 8 > Hkv = 2
    assert "W = 4, 8" in fig.layout.annotations[0].text
