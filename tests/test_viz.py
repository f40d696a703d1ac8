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


# style and widgets

def test_figures_are_small_and_float32():
    import numpy as np

    g = torch.Generator().manual_seed(0)
    trace = viz.online_softmax_trace(torch.randn(200, generator=g), torch.randn(200, 4, generator=g), 16)
    fig = viz.online_softmax_figure(trace)
    assert fig.data[0].y.dtype == np.float32  # scores stored as a float32 typed array
    assert len(fig.to_json()) < 12_000  # the compact template: plotly's default adds ~6 KB per figure


def test_explorer_rebuilds_on_change_and_survives_errors(monkeypatch):
    import ipywidgets as widgets
    import plotly.io as pio

    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")

    def builder(n, label):
        if n == 0:
            raise ValueError("n must be positive")
        return viz.tile_map_figure(viz.trace_schedule("causal", seq_len=64, block_q=n, block_k=n), title=label)

    ex = viz.explore(builder, n=viz.int_slider(16, 0, 64, 8), label=viz.choice("a", ["a", "b"]))
    assert ex.calls == 1 and ex.figure.layout.title.text == "a"
    ex.controls["label"].value = "b"  # the observer rebuilds
    assert ex.calls == 2 and ex.figure.layout.title.text == "b"
    ex.controls["n"].value = 0
    assert ex.figure is None and "n must be positive" in ex.error
    ex.controls["n"].value = 32
    assert ex.error is None and len(ex.figure.data) == 5
    assert ex.output.outputs == ()  # nothing drawn until the explorer is displayed
    assert "application/vnd.jupyter.widget-view+json" in ex._repr_mimebundle_()
    shown_data = ex.output.outputs[0]["data"]
    assert shown_data["application/vnd.plotly.v1+json"]["layout"]["title"]["text"] == "b"
    ex.controls["label"].value = "a"  # a change replaces the figure held by the Output widget
    assert ex.output.outputs[0]["data"]["application/vnd.plotly.v1+json"]["layout"]["title"]["text"] == "a"
    ex.controls["n"].value = 0
    assert ex.output.outputs[0]["data"] == {"text/plain": "ValueError: n must be positive"}
    shown = viz.explore(builder, initial="already built", n=viz.int_slider(16, 8, 64, 8), label=viz.choice("a", "ab"))
    assert shown.calls == 0 and shown.figure == "already built"  # not rebuilt until a control changes
    with pytest.raises(TypeError, match="value widget"):
        viz.explore(builder, n=widgets.Button())
    with pytest.raises(ValueError, match="at least one control"):
        viz.explore(builder)


# 01 online softmax

def test_online_softmax_trace_is_exact_and_rescales_where_the_max_grows():
    s = torch.tensor([0.0, 1.0, 5.0, 2.0, 9.0, 1.0], dtype=torch.float64)
    v = torch.eye(6, dtype=torch.float64)
    tr = viz.online_softmax_trace(s, v, 2)
    assert tr.tile_end == [2, 4, 6] and tr.m == [1.0, 5.0, 9.0]
    assert tr.alpha[0] == 1.0 and tr.alpha[1:] == pytest.approx([torch.e ** -4] * 2)
    assert tr.err[-1] < 1e-15 and torch.allclose(tr.out, torch.softmax(s, 0))
    assert tr.err[0] > 0.1  # most of the mass (s = 9) is still missing after the first tile
    with pytest.raises(ValueError, match="positive tile size"):
        viz.online_softmax_trace(s, v, 0)
    with pytest.raises(ValueError, match="same N"):
        viz.online_softmax_trace(s, v[:3], 2)


def test_naive_softmax_overflows_and_the_safe_one_does_not():
    res = viz.softmax_stability([-200, 0, 80, 100])
    assert res["naive"][0] == float("inf")  # every exp underflows: 0 / 0
    assert res["naive"][1] < 1e-6 and res["naive"][2] < 1e-6  # 80 + N(0,1) still fits under 88.7
    assert res["naive"][3] == float("inf")  # exp(100) = inf in float32
    assert max(res["safe"]) < 1e-6
    fig = viz.naive_vs_safe_figure([0, 100])
    assert list(fig.data[0].marker.symbol) == ["circle", "x"]


# 02 tiling

@pytest.mark.parametrize("case", viz.CASES)
def test_traced_cases_match_the_cost_model(case):
    from fa2lab.cost import tile_schedule

    kw = dict(seq_len=100, block_q=32, block_k=16, window=24, group=3, varlen_seqlens=(40, 0, 25))
    blocks = viz.trace_schedule(case, **kw)
    if case == "varlen":
        assert [(b.q_offset, b.k_offset, b.order_offset) for b in blocks] == [(0, 0, 0), (40, 40, 5)]
        expect = [tile_schedule(n, n, 32, 16, True).counts() for n in (40, 25)]
    else:
        nq = 50 if case == "gqa" else 100
        causal, window = {"full": (False, (-1, -1)), "window": (True, (24, 0))}.get(case, (True, (-1, -1)))
        expect = [tile_schedule(nq, 100, 32, 16, causal, window).counts()]
    assert [b.tracer.counts() for b in blocks] == expect
    fig = viz.tile_map_figure(blocks)
    assert [t.name for t in fig.data] == ["skipped", "full", "partial", "visit order", "mask edge"]
    edges = [x for x in fig.data[4].x if x is not None]
    assert len(edges) == {"full": 0, "window": 4, "varlen": 4}.get(case, 2)  # 2 points per edge
    assert fig.layout.yaxis.range[0] == (150 if case == "gqa" else 65 if case == "varlen" else 100)


def test_tile_cases_figure_and_unknown_case():
    fig = viz.tile_cases_figure(seq_len=64, block_q=32, block_k=32)
    assert len(fig.layout.annotations) == 5 and "1 full, 2 masked, 1 skipped" in fig.layout.annotations[1].text
    with pytest.raises(ValueError, match="unknown case"):
        viz.trace_schedule("diagonal")


# 03 scaling

def test_scaling_rows_exponents_and_figure():
    from fa2lab.bench.cpu import scaling_rows

    rows = scaling_rows([64, 128], ("tiled", "naive"), heads=1, head_dim=16, block=32, budget_s=0.0)
    assert [(r["impl"], r["N"]) for r in rows] == [("tiled", 64), ("naive", 64), ("tiled", 128), ("naive", 128)]
    assert all(r["seconds"] > 0 for r in rows)
    rows = [dict(impl=i, mode="fwd", N=n, seconds=n ** 2 * 1e-9, peak_extra_mib=n ** (2 if i == "naive" else 1) / 1e3)
            for i in ("tiled", "naive") for n in (256, 512, 1024)]
    mem = viz.scaling.exponents(rows)
    assert mem["tiled"] == pytest.approx(1.0) and mem["naive"] == pytest.approx(2.0)
    predicted = viz.scaling.predicted_scaling([256, 512], ("tiled", "naive"), heads=1, head_dim=16)
    naive = [p["peak_extra_mib"] for p in predicted if p["impl"] == "naive"]
    assert naive[1] / naive[0] == pytest.approx(4.0, rel=0.1)
    fig = viz.scaling.scaling_figure(rows, predicted)
    names = [t.name for t in fig.data]
    assert "tiled (slope 1.00)" in names and "naive (slope 2.00)" in names and "naive model" in names
    with pytest.raises(ValueError, match="unknown implementation"):
        scaling_rows([64], ("flash",))
    with pytest.warns(DeprecationWarning, match="moved to fa2lab.bench.cpu.scaling_rows"):
        assert len(viz.scaling.measure_scaling([64], ("tiled",), heads=1, head_dim=16, block=32, budget_s=0.0)) == 1


# 04 decoding

def test_decode_latency_figure_from_rows():
    rows = [dict(impl=f"fa2lab splits={s}", num_splits=s, L=L, us=L / s + 10 * s) for L in (1024, 4096) for s in (1, 4)]
    rows += [dict(impl="fa2lab auto (2)", num_splits=2, L=L, us=L / 2) for L in (1024, 4096)]
    rows += [dict(impl="torch sdpa", num_splits="", L=L, us=L / 3) for L in (1024, 4096)]
    fig = viz.decode_latency_figure(rows)
    names = [t.name for t in fig.data]
    assert names[:3] == ["fa2lab splits=1", "fa2lab splits=4", "fa2lab auto"]
    assert "split-K, L=4096" in names and "sdpa, L=1024" in names


# 05 KV caches

def test_simulated_page_pool_is_consistent():
    tr = viz.kvcache.simulate_paged(num_pages=8, page_size=2, steps=30, max_active=3, seed=1)
    for owners, table, lengths in zip(tr.owners, tr.tables, tr.lengths):
        pages = [p for ps in table.values() for p in ps]
        assert len(pages) == len(set(pages))  # no page owned twice
        assert all(owners[p] == s for s, ps in table.items() for p in ps)
        assert all(len(table[s]) == -(-lengths[s] // 2) for s in table)  # just enough pages
    assert any("waits" in e or "stalls" in e for e in tr.events)  # 8 pages are too few on purpose
    assert all(0 < u <= 1 for u in tr.utilisation)
    assert viz.kvcache.page_timeline_figure(tr).data[0].z.shape == (30, 8)
    assert "Block table at step 3" in viz.kvcache.page_table_figure(tr, 3).layout.title.text
    with pytest.raises(ValueError, match="outside"):
        viz.kvcache.page_table_figure(tr, 30)


def test_window_ring_holds_the_last_tokens():
    held = viz.kvcache.window_ring(3, 7)  # W = 3, one new token per step: 3 slots
    assert held[1].tolist() == [0, 1, -1] and held[6].tolist() == [6, 4, 5]
    assert viz.kvcache.paged_vs_dense_error(3) < 1e-6


def test_tradeoff_figure():
    from fa2lab.bench.kvmemory import TradeoffRow

    rows = [TradeoffRow("static", "16-bit", 512, 1.0, 0.0, 0.0, "full"),
            TradeoffRow("int8", "8-bit", 272, 0.53, 1e-3, 2e-3, "full"),
            TradeoffRow("lowrank", "r=8", 64, 0.13, 1e-2, 5e-2, "full")]
    fig = viz.kvcache.tradeoff_figure(rows)
    assert [t.name for t in fig.data] == ["static", "int8", "lowrank"] and fig.data[0].y[0] == 1e-9


# 06 hardware and 07 GPU results

GPU_RESULTS = dict(
    environment=dict(device="NVIDIA H100 80GB HBM3", date="2026-01-01"), peaks=dict(matmul_tflops=700.0, copy_tbps=3.0),
    rows=[dict(kind="fwd", impl="fa2lab triton", N=1024, D=64, B=32, H=32, causal=True, ms=1.0, tflops=300.0,
               exact=True),
          dict(kind="fwd", impl="sdpa flash", N=1024, D=64, B=32, H=32, causal=True, ms=1.5, tflops=200.0),
          dict(kind="fwd", impl="flex (compiled)", N=1024, D=64, causal=True, error="no"),
          dict(kind="decode", impl="fa2lab triton (splits=4)", B=1, Hq=32, Hkv=8, L=8192, D=128, us=20.0, tbps=1.5),
          dict(kind="decode", impl="sdpa cudnn", B=1, Hq=32, Hkv=8, L=8192, D=128, us=15.0, tbps=2.0)])


def test_latest_by_kind_takes_each_kind_from_its_newest_file(tmp_path):
    """Per kind the newest file (by the name's timestamp) with rows of that kind; decode-*.json's
    planned public call becomes fa2lab's decode bar, and its other rows keep their own names."""
    import json

    fwd_only = dict(GPU_RESULTS, rows=[r for r in GPU_RESULTS["rows"] if r["kind"] == "fwd"], tag="fwd only")
    (tmp_path / "gpu-20260101-000000.json").write_text(json.dumps(dict(GPU_RESULTS, tag="old full")))
    (tmp_path / "gpu-20260301-000000.json").write_text(json.dumps(fwd_only))
    public = dict(environment={"device": "D"}, peaks={"copy_tbps": 4.0}, rows=[
        dict(kind="decode_public", impl=impl, B=1, Hq=32, Hkv=8, L=8192, D=128, us=10.0, tbps=t)
        for impl, t in (("plan dense", 3.0), ("paged 16", 2.9), ("plan dense (again)", 3.1), ("sdpa cudnn", 3.2))])
    (tmp_path / "decode-20260201-000000.json").write_text(json.dumps(public))
    latest = viz.gpu.latest_by_kind(tmp_path)
    assert {k: p.name for k, (p, _) in latest.items()} == {"fwd": "gpu-20260301-000000.json", "decode":
                                                          "decode-20260201-000000.json"}
    dec = latest["decode"][1]
    assert [r["impl"] for r in dec["rows"]] == ["fa2lab triton", "fa2lab paged 16", "sdpa cudnn"]  # "again" left out
    assert viz.gpu.ratio_table(dec, "decode", "sdpa cudnn")[0]["ratio"] == pytest.approx(3.0 / 3.2)
    assert viz.gpu.throughput_figure(dec, "decode").layout.shapes[0].y0 == 4.0
    assert viz.gpu.latest_by_kind(tmp_path / "none") == {}
    # bench.hopper_bwd_gpu --plan final's JSONL: the dispatcher's row is fa2lab's bwd bar, candidates left out
    shape = dict(N=4096, D=128, causal=True, H=16, Hkv=16, B=8)
    lines = [dict(environment={"device": "H"}, plan="final"),
             dict(impl="fa2lab", config="dispatch", cfg="'dispatch'", bwd_ms=2.0, bwd_tflops=400.0, exact=True, **shape),
             dict(impl="fa2lab", config="one-pass s3", cfg="{}", bwd_ms=1.0, bwd_tflops=800.0, exact=True, **shape),
             dict(impl="sdpa cudnn", config="sdpa cudnn", cfg="None", bwd_ms=1.6, bwd_tflops=500.0, exact=True, **shape),
             dict(impl="sdpa flash", config="sdpa flash", cfg="None", error="no", **shape)]
    (tmp_path / "bwd-final-20260401-000000.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    bwd_path, bwd = viz.gpu.latest_by_kind(tmp_path)["bwd"]
    assert bwd_path.name == "bwd-final-20260401-000000.jsonl" and bwd["environment"]["device"] == "H"
    assert [(r["impl"], r["tflops"]) for r in bwd["rows"]] == [("fa2lab triton", 400.0), ("sdpa cudnn", 500.0)]
    assert viz.gpu.ratio_table(bwd, "bwd", "sdpa cudnn")[0]["ratio"] == pytest.approx(0.8)


def test_latest_merged_joins_each_kinds_newest_file_of_one_device(tmp_path):
    import json

    fwd = [r for r in GPU_RESULTS["rows"] if r["kind"] == "fwd"]
    dec = [r for r in GPU_RESULTS["rows"] if r["kind"] == "decode"]
    h200 = dict(device="NVIDIA H200", date="2026-02-01")
    (tmp_path / "gpu-20260101-000000.json").write_text(json.dumps(dict(GPU_RESULTS, tag="old full")))
    (tmp_path / "gpu-20260201-000000.json").write_text(json.dumps(dict(GPU_RESULTS, environment=h200, rows=fwd,
                                                                       tag="h200 fwd")))
    label, res = viz.gpu.latest_merged(tmp_path)
    # the H100 file's decode rows are newer than nothing, but from another device: left out
    assert res["tag"] == "h200 fwd" and {r["kind"] for r in res["rows"]} == {"fwd"}
    assert label == "fwd: gpu-20260201-000000.json"
    (tmp_path / "gpu-20260301-000000.json").write_text(json.dumps(dict(GPU_RESULTS, environment=h200, rows=dec)))
    label, res = viz.gpu.latest_merged(tmp_path)
    assert [r["kind"] for r in res["rows"]] == ["fwd"] * 3 + ["decode"] * 2 and res["tag"] == "h200 fwd"
    assert label == "fwd: gpu-20260201-000000.json, decode: gpu-20260301-000000.json"
    assert viz.gpu.latest_merged(tmp_path / "none") == (None, None)


def test_gpu_results_figures_and_ratios(tmp_path):
    import json

    for name in ("gpu-20250101-000000.json", "gpu-20260101-000000.json"):
        (tmp_path / name).write_text(json.dumps(dict(GPU_RESULTS, tag=name)))
    path, res = viz.gpu.latest_gpu_results(tmp_path)
    assert path.name == "gpu-20260101-000000.json" and res["tag"] == path.name
    assert viz.gpu.latest_gpu_results(tmp_path / "empty") == (None, None)
    # a newer partial run (no backward rows here, no decode rows there) does not hide a full one
    full = dict(GPU_RESULTS, rows=GPU_RESULTS["rows"] + [dict(kind="bwd", impl="fa2lab triton", N=1024, D=64,
                                                               causal=True, ms=2.0, tflops=250.0)], tag="full")
    (tmp_path / "gpu-20260601-000000.json").write_text(json.dumps(full))
    (tmp_path / "gpu-20260701-000000.json").write_text(json.dumps(dict(GPU_RESULTS, rows=GPU_RESULTS["rows"][:2])))
    assert viz.gpu.latest_gpu_results(tmp_path)[1]["tag"] == "full"
    assert viz.gpu.has_kind(full, "bwd") and not viz.gpu.has_kind(None, "fwd")
    fig = viz.gpu.throughput_figure(res, "fwd")
    assert [t.name for t in fig.data] == ["fa2lab triton", "sdpa flash"]  # the failed flex row is left out
    assert fig.layout.shapes[0].y0 == 700.0  # the matmul peak of the same run
    dec = viz.gpu.throughput_figure(res, "decode")
    assert [t.name for t in dec.data] == ["fa2lab triton", "sdpa cudnn"] and dec.layout.shapes[0].y0 == 3.0
    assert viz.gpu.ratio_table(res, "fwd")[0]["ratio"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="expected kind"):
        viz.gpu.throughput_figure(res, "prefill")


def test_hardware_figures():
    from fa2lab.hardware import get_profile

    rows = viz.hardware.tile_table(["t4", "h100"], 128)
    assert all(r["onchip_bytes"] <= r["limit_bytes"] for r in rows)
    assert viz.hardware.profile_for_device("NVIDIA H100 80GB HBM3") == "h100"
    assert viz.hardware.profile_for_device("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert viz.hardware.profile_for_device("Some NPU") is None
    h100 = get_profile("h100")
    preds = viz.hardware.gpu_predictions(GPU_RESULTS, h100)
    assert [p["group"] for p in preds] == ["fwd", "decode"] and all(p["predicted_s"] > 0 for p in preds)
    fig = viz.hardware.predicted_vs_measured_figure([dict(label="a", group="g", measured_s=2.0, predicted_s=1.0),
                                                     dict(label="b", group="g", measured_s=8.0, predicted_s=2.0)])
    assert "geometric mean 2.83" in fig.layout.title.text
    roof = viz.hardware.roofline_figure(h100, measured=viz.hardware.gpu_roofline_measured(GPU_RESULTS, h100))
    assert [t.name for t in roof.data] == ["roof", "predicted fwd", "predicted decode", "measured"]
    assert len(viz.hardware.tile_configs_figure(["t4", "cpu-generic"], [64]).data) == 2
    assert viz.hardware.available() is None


# sweep results

def test_sweep_figure():
    import pandas as pd

    table = pd.DataFrame(dict(N=[1, 2, 4, 1, 2, 4, 4], mode=["a"] * 3 + ["b"] * 4,
                              y=[1.0, 4.0, 16.0, 2.0, 4.0, 8.0, 999.0], status=["ok"] * 6 + ["error"]))
    fig = viz.sweeps.sweep_figure(table, "N", "y", "mode", log_x=True, log_y=True, fit=True)
    assert [t.name for t in fig.data] == ["mode=a (slope 2.00)", "mode=b (slope 1.00)"]
    assert list(fig.data[1].y) == [2.0, 4.0, 8.0]  # the failed point is left out
    with pytest.raises(ValueError, match="not in the results table"):
        viz.sweeps.sweep_figure(table, "N", "z")


def test_ring_pair_steps_follow_the_ring_and_the_mask():
    from fa2lab.distributed import plan_ring

    plan = plan_ring(2, 2, causal=True)  # zigzag: rank 0 holds positions 0 and 3, rank 1 holds 1 and 2
    steps = viz.ring.pair_steps(plan)
    nan = float("nan")
    expected = torch.tensor([[0, nan, nan, nan], [1, 0, nan, nan], [1, 0, 0, nan], [0, 1, 1, 0]])
    assert torch.equal(torch.isnan(torch.from_numpy(steps)), torch.isnan(expected))
    assert (torch.from_numpy(steps).nan_to_num(-1) == expected.nan_to_num(-1)).all()
    # every visible pair of a bigger ring is computed exactly once, at step (owner(q) - owner(k)) mod W
    big = plan_ring(4, 6, causal=False)
    s = viz.ring.pair_steps(big)
    owner = torch.arange(24) // 6
    assert torch.equal(torch.from_numpy(s).long(), (owner[:, None] - owner[None, :]) % 4)


def test_ring_figures_show_schedule_balance_and_a_converging_merge():
    from fa2lab.distributed import plan_ring

    plan = plan_ring(4, 4, causal=True)
    fig = viz.ring.ring_schedule_figure(plan)
    held, pairs, *bars = fig.data
    assert held.text[1][2] == "K/V of 3"  # rank 1 holds rank (1 - 2) mod 4 = 3's shard at step 2
    assert {b.name for b in bars} == {"contiguous", "zigzag"}
    zigzag = next(b for b in bars if b.name == "zigzag")
    assert len(set(zigzag.y)) == 1  # equal work on every rank
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    errors = viz.ring.ring_merge_errors(q, k, v, plan)
    assert len(errors) == 16
    for rank in range(4):
        mine = [r["max_error"] for r in errors if r["rank"] == rank]
        assert mine[-1] < 1e-5 < mine[0]  # exact only once every shard has been merged
    assert len(viz.ring.ring_merge_figure(errors).data) == 4


def test_figure_modules_do_not_measure():
    # viz draws the rows it is given: no timing, memory accounting or device code of its own.
    import ast
    from pathlib import Path

    banned = {"fa2lab.measure", "fa2lab.measure.timing", "fa2lab.measure.memory", "time", "fa2lab.kernels"}
    for path in sorted((Path(viz.__file__).parent).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not banned.intersection(names), f"{path.name} imports {banned.intersection(names)}"
