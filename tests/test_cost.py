"""The cost model: counts against hand computation and against an instrumented tiled run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fa2lab import TileTracer, tiled_attention
from fa2lab.measure.memory import peak_extra_bytes as measured_peak
from fa2lab.cost import (QWEN3_VL_8B, cpu_tiled_forward, decode, exact_flops, executed_flops, fa1_bytes,
                         fa2_backward, fa2_backward_bytes, fa2_backward_two_pass_bytes, fa2_forward,
                         fa2_forward_bytes, formula_flops, kv_cache_bytes,
                         naive_bytes, peak_extra_bytes, roofline, split_k_decode_bytes, theorem2_bytes,
                         tile_schedule, varlen_flops, visible_pairs)
from fa2lab.cost.traffic import fa_paper_tiles
from fa2lab.hardware import get_profile
from fa2lab.masks import dense_mask
from helpers import make_qkv

# (nq, nk, block_q, block_k, causal, window): awkward lengths, Nq != Nk both ways, windows
CASES = [(97, 97, 16, 32, True, (-1, -1)), (50, 130, 16, 16, True, (-1, -1)), (130, 50, 32, 16, True, (-1, -1)),
         (130, 50, 32, 16, False, (7, 3)), (64, 64, 16, 16, False, (-1, -1)), (100, 100, 32, 8, False, (10, -1)),
         (1, 232, 1, 64, True, (-1, -1)), (232, 1, 64, 1, False, (0, 0))]


@pytest.mark.parametrize("nq, nk, bq, bk, causal, window", CASES)
def test_schedule_matches_instrumented_run(nq, nk, bq, bk, causal, window):
    q, k, v = make_qkv(1, 4, 2, nq, nk, 8, dtype=torch.float32)  # GQA: 2 query heads per KV head
    tracer = TileTracer(record_stats=False)
    tiled_attention(q, k, v, causal=causal, window_size=window, block_q=bq, block_k=bk, tracer=tracer)
    sched = tile_schedule(nq, nk, bq, bk, causal, window)
    assert sched.counts() == tracer.counts()
    computed = [s for s in tracer.steps if s.state != "skipped"]
    assert sched.computed_elements == sum((s.q_range[1] - s.q_range[0]) * (s.k_range[1] - s.k_range[0])
                                          for s in computed)
    assert sched.partial_elements == sum((s.q_range[1] - s.q_range[0]) * (s.k_range[1] - s.k_range[0])
                                         for s in computed if s.state == "partial")
    assert sched.kv_rows == sum(s.k_range[1] - s.k_range[0] for s in computed)
    assert sched.visible_elements == int(dense_mask(nq, nk, causal, window).sum())


def test_visible_pairs_by_hand():
    assert visible_pairs(4, 4, causal=True) == 10  # 1 + 2 + 3 + 4
    assert visible_pairs(3, 5, causal=True) == 12  # bottom-right aligned: 3 + 4 + 5
    assert visible_pairs(6, 6, window_size=(1, 1)) == 16  # 2 + 3 + 3 + 3 + 3 + 2


def test_flops_by_hand():
    d = 8
    assert formula_flops(1, 1, 4, 4, d) == 4 * 16 * d == 512
    assert formula_flops(1, 1, 4, 4, d, causal=True) == 256
    assert exact_flops(1, 1, 4, 4, d, causal=True) == 2 * 10 * (d + d) == 320  # N(N+1)/2 pairs, not N^2/2
    # tiles of 2 on N=4 causal: 2 partial diagonal tiles + 1 full = 12 computed scores
    assert executed_flops(1, 1, 4, 4, d, block_q=2, block_k=2, causal=True) == 2 * 12 * 16 == 384
    assert formula_flops(2, 3, 4, 4, d, mode="fwd+bwd") == 3.5 * 4 * 2 * 3 * 16 * d
    assert varlen_flops([4, 3], [4, 5], 1, d, causal=True) == exact_flops(1, 1, 4, 4, d, causal=True) + \
        exact_flops(1, 1, 3, 5, d, causal=True)
    with pytest.raises(ValueError, match="mode"):
        formula_flops(1, 1, 4, 4, d, mode="backward")


def test_bytes_by_hand():
    d, e = 2, 2  # head dim 2, 2-byte elements, one (batch, head), N = 4
    # naive: Q, K, V in (3 x 4 x 2), S written + read, P written + read (4 x 16), O out (4 x 2)
    assert naive_bytes(1, 1, 4, 4, d, elem=e).total == e * (8 + 8 + 64 + 8 + 8) == 192
    sched = tile_schedule(4, 4, 2, 2)  # 2 x 2 full tiles
    # FA2: Q once (8), K_j/V_j per tile (4 tiles x 2 rows x 4), O once (8); LSE 4 x 4 B
    assert fa2_forward_bytes(sched, 1, 1, d, elem=e).total == e * (8 + 32 + 8) + 16 == 112
    # FA1: K, V once (16); per tile Q_i (2x2), O_i in + out (2 x 2x2), l and m in + out (4 x 2 x 4 B)
    assert fa1_bytes(sched, 1, 1, d, elem=e).total == e * 16 + 4 * (e * (4 + 8) + 32) == 256
    # FA2 backward: O, dO for Delta (16 el.), K, V (16) and dK, dV (16) once, per tile Q_i, dO_i (4 x 8 el.),
    # LSE_i, Delta_i (4 x 2 x 2 x 4 B), dQ_i fp32 in + out (2 x 4 x 4 x 4 B), dQ convert (32 B in, 8 el. out),
    # Delta out (16 B)
    bwd = fa2_backward_bytes(sched, 1, 1, d, elem=e).total
    assert bwd == e * (16 + 16 + 16 + 32 + 8) + 64 + 128 + 32 + 16 == 416
    # GQA packing: K/V loads shared by the 4 query heads of the group
    packed = fa2_forward_bytes(sched, 1, 4, d, elem=e, hkv=1, pack_gqa=True).terms["read K_j, V_j"]
    assert packed == fa2_forward_bytes(sched, 1, 1, d, elem=e).terms["read K_j, V_j"]


def test_two_pass_backward_bytes_by_hand():
    d, e = 2, 2
    sched = tile_schedule(4, 4, 2, 2)  # 2 x 2 full tiles
    # O, dO for Delta (16 el.); dK/dV pass: K, V once (16), Q_i, dO_i per tile (4 x 8 el.), LSE_i, Delta_i
    # (4 x 2 x 2 x 4 B); dQ pass: Q, dO once (16 el.), LSE, Delta (2 x 4 x 4 B), K_j, V_j per tile (4 x 8 el.);
    # writes: Delta (16 B), dK, dV (16 el.), dQ (8 el.)
    two = fa2_backward_two_pass_bytes(sched, 1, 1, d, elem=e).total
    assert two == e * (16 + 16 + 32 + 16 + 32 + 16 + 8) + 64 + 32 + 16 == 384


def test_backward_roofline_one_pass_against_two():
    """One pass: 5 matmuls and one exp per computed score; two passes: 7 and two. Without cache reuse
    the bytes are the traffic counts; with it, a head's re-reads that fit the L2 are counted once."""
    prof = get_profile("h200")
    sched = tile_schedule(4096, 4096, 64, 128, True)
    one = fa2_backward(prof, 8, 16, 4096, 4096, 128, "bfloat16", causal=True, passes=1, cache_reuse=False)
    two = fa2_backward(prof, 8, 16, 4096, 4096, 128, "bfloat16", causal=True, passes=2, cache_reuse=False)
    elems = 8 * 16 * sched.computed_elements
    assert one.flops == 10 * 128 * elems and two.flops == 14 * 128 * elems
    assert (one.exps, two.exps) == (elems, 2 * elems)
    assert one.bytes == fa2_backward_bytes(sched, 8, 16, 128, elem=2).total
    assert two.bytes == fa2_backward_two_pass_bytes(sched, 8, 16, 128, elem=2).total
    reused = fa2_backward(prof, 8, 16, 4096, 4096, 128, "bfloat16", causal=True, passes=1)
    assert reused.bytes < one.bytes and reused.bound == "compute"
    assert reused.t_compute == pytest.approx(one.t_compute) and two.t_compute / one.t_compute == pytest.approx(1.4)
    with pytest.raises(ValueError, match="passes must be 1"):
        fa2_backward(prof, 1, 1, 64, 64, 64, passes=3)


def test_backward_roofline_rows_read_both_result_formats():
    from fa2lab.bench.hopper_sweep import backward_roofline_rows

    shape = dict(N=4096, D=128, causal=False, H=16, Hkv=16, B=8)
    rows = backward_roofline_rows([
        dict(impl="fa2lab", config="dispatch", cfg="'dispatch'", bwd_ms=6.5, **shape),  # not recorded: left out
        dict(impl="fa2lab", config="one-pass tma 64x128 s2", cfg="{'gluon_dkdvq': (64, 128, 2)}", bwd_ms=6.0,
             **shape),
        dict(impl="fa2lab", config="one 64x128 w8 s2", cfg="{'dkdvq': (64, 128, 8, 2)}", bwd_ms=8.0, **shape),
        dict(impl="fa2lab", config="gluon dkdv + dq", cfg="{'gluon_dkdv': (64, 128, 2)}", bwd_ms=7.0, **shape),
        dict(impl="sdpa cudnn", config="sdpa cudnn", cfg="None", bwd_ms=5.0, **shape)])  # not fa2lab: left out
    assert [r["passes"] for r in rows] == [1, 1, 2]
    rows = [rows[2], rows[0]]  # two passes, then one
    assert rows[1]["compute_ms"] == pytest.approx(rows[0]["compute_ms"] / 1.4)
    assert all(r["measured_over_predicted"] == pytest.approx(r["measured_ms"] / r["predicted_ms"]) for r in rows)
    # the wide one pass (D=256, 64-key blocks): one pass over its own tile (the cache-reuse rule then sees
    # fewer heads in flight); a timing probe is left out, and a configuration that is not a literal counts as
    # two passes
    wide = dict(shape, D=256, H=8, Hkv=8)
    rows = backward_roofline_rows([
        dict(impl="fa2lab", config="wide", cfg="{'dv': (64, 128, 8, 2), 'gluon_wide': (64, 64, 2, 1, 64, 'keys')}",
             bwd_ms=9.0, **wide),
        dict(impl="fa2lab", config="probe", cfg="{'gluon_wide': (64, 64, 2, 1, 64), 'probe_skip_dq_reduce': True}",
             bwd_ms=8.0, **wide),
        dict(impl="fa2lab", config="odd", cfg="{'dv': __import__('os')}", bwd_ms=12.0, **wide)])
    assert [(r["config"], r["passes"]) for r in rows] == [("wide", 1), ("odd", 2)]
    from fa2lab.cost.predict import fa2_backward
    from fa2lab.hardware import get_profile

    roof = fa2_backward(get_profile("h200"), 8, 8, 4096, 4096, 256, "bfloat16", passes=1, block_q=64, block_k=64)
    assert rows[0]["memory_ms"] == pytest.approx(roof.t_memory * 1e3)
    assert roof.bytes != fa2_backward(get_profile("h200"), 8, 8, 4096, 4096, 256, "bfloat16", passes=1).bytes


def test_split_k_decode_bytes_by_hand():
    # B=1, Hq=4, Hkv=1, L=100, D=2: K, V 100 x 4 el.; q read once per split
    one = split_k_decode_bytes(1, 4, 1, 100, 2, splits=1, elem=2)
    assert one.total == 2 * 400 + 2 * 8 + 2 * 8 == 832
    four = split_k_decode_bytes(1, 4, 1, 100, 2, splits=4, elem=2)
    partial = 4 * 4 * (2 + 1) * 4  # heads x splits x (Dv + LSE) x float32
    assert four.total == 2 * 400 + 4 * 2 * 8 + 2 * 8 + 2 * partial
    with pytest.raises(ValueError, match="splits"):
        split_k_decode_bytes(1, 4, 1, 100, 2, splits=0)


def test_exact_bytes_follow_theorem_2():
    """FA's HBM traffic with the paper's own tiles grows as N^2 d^2 / M: the ratio to Theorem 2's
    term settles to a constant as N grows, and halving M doubles the quadratic part."""
    d, m = 64, 16 * 1024  # a 16 KB SRAM: Br = Bc = 32 for d = 64 in fp16
    br, bc = fa_paper_tiles(m, d)
    ratios = []
    for n in (2048, 4096, 8192):
        sched = tile_schedule(n, n, br, bc)
        ratios.append(fa2_forward_bytes(sched, 1, 1, d).total / theorem2_bytes(1, 1, n, d, m))
    assert abs(ratios[-1] / ratios[-2] - 1) < 0.01 and abs(ratios[-2] / ratios[-3] - 1) < 0.02
    with pytest.raises(ValueError, match="Theorem 2"):
        theorem2_bytes(1, 1, 16, 64, 10**9)


def test_kv_cache_qwen3_vl_8b():
    per_token = 2 * 36 * 8 * 128 * 2  # K and V, layers, KV heads, head dim, bf16
    assert kv_cache_bytes(QWEN3_VL_8B, 1) == per_token == 147456
    assert kv_cache_bytes(QWEN3_VL_8B, 4096) == 576 * 2**20
    assert kv_cache_bytes(QWEN3_VL_8B, 32768) == 4.5 * 2**30
    assert kv_cache_bytes(QWEN3_VL_8B, 131072) == 18 * 2**30
    assert kv_cache_bytes(QWEN3_VL_8B, 131072, window=4096) == 576 * 2**20
    assert kv_cache_bytes(QWEN3_VL_8B, 4096, batch=8) == 8 * 576 * 2**20


def test_peak_memory_models_by_hand():
    # B=1, H=2, N=4, D=2, 2-byte elements: O is 2 x 4 x 2 x 2 = 32 B
    assert peak_extra_bytes("naive", 1, 2, 4, 4, 2) == 32 + 2 * 2 * 16 * 2
    assert peak_extra_bytes("fa2", 1, 2, 4, 4, 2) == 32 + 2 * 4 * 4
    assert peak_extra_bytes("fa1", 1, 2, 4, 4, 2) == 32 + 2 * 2 * 4 * 4
    assert peak_extra_bytes("split_k", 1, 2, 1, 4, 2, splits=2) == 2 * 2 * 2 + 2 * 2 * 3 * 4
    with pytest.raises(ValueError, match="unknown algorithm"):
        peak_extra_bytes("fa3", 1, 1, 4, 4, 2)


def test_tiled_cpu_memory_model_against_measurement():
    b, h, n, d, tile = 1, 8, 1024, 64, 128  # model: 5.3 MiB
    q, k, v = make_qkv(b, h, h, n, n, d, dtype=torch.float32)

    def run():
        with torch.no_grad():
            tiled_attention(q, k, v, causal=True, block_q=tile, block_k=tile)
    run()  # the first call of a process also allocates torch's and MKL's one-time buffers
    if measured_peak(run) is None:
        pytest.skip("peak memory is measurable only on Linux with glibc")
    measured = min(measured_peak(run) for _ in range(2))  # heap noise only ever adds
    model = peak_extra_bytes("tiled_cpu", b, h, n, n, d, elem=4, block_q=tile, block_k=tile)
    # The model counts fa2lab's own tensors; BLAS packing buffers and heap noise add up to ~3 MiB.
    assert 0.75 < measured / model < 1.6, f"measured {measured} B, model {model} B"


def test_roofline_by_hand():
    p = dataclasses.replace(get_profile("cpu-generic"), peak_flops_simd={"float32": 100e9}, mem_bw=10e9,
                            exp_per_s=1e9, step_overhead_s=0.0)
    r = roofline(p, 200e9, 5e9, "float32", exps=1e9)
    assert (r.t_compute, r.t_memory, r.t_exp, r.time, r.bound) == (2.0, 0.5, 1.0, 2.0, "compute")
    assert roofline(p, 1e9, 50e9, "float32").bound == "memory"
    with pytest.raises(ValueError, match="no peak FLOP/s"):
        roofline(dataclasses.replace(p, peak_flops_simd={"float64": 1e9}), 1, 1, "bfloat16")


def test_gpu_rooflines_are_lower_bounds_of_the_anchors():
    """ANCHORS.md measured on the H100 (2026-11-22): FA2 forward, N=4096, D=128, B*N = 32k tokens:
    354 TFLOP/s; decode B=1, Hq=32, Hkv=8, L=32768: 65-72 us. A roofline may not beat them by less
    than nothing: predicted time <= measured."""
    h100 = get_profile("h100")
    n, b, h, d = 4096, 8, 16, 128
    r = fa2_forward(h100, b, h, n, n, d, "bfloat16")
    assert r.time <= formula_flops(b, h, n, n, d) / 354e12
    assert decode(h100, 1, 32, 8, 32768, d, "bfloat16").time <= 65e-6
    # Without L2 reuse the paper's HBM count makes the same case look memory-bound.
    assert fa2_forward(h100, b, h, n, n, d, "bfloat16", cache_reuse=False).bytes > r.bytes


def test_cpu_tiled_model_by_hand():
    p = dataclasses.replace(get_profile("cpu-generic"), step_overhead_s=1e-4, score_s=1e-9, mask_s=2e-9,
                            spill_factor=2.0, fault_s_per_byte=1e-10, row_s=3e-9)
    r = cpu_tiled_forward(p, 1, 4, 256, 256, 64, block_q=64, block_k=64, causal=True)
    sched = tile_schedule(256, 256, 64, 64, True)  # 4 partial diagonal tiles + 6 full
    assert (sched.partial, sched.full, sched.partial_elements) == (4, 6, 4 * 64 * 64)
    assert r.overhead == pytest.approx(10 * 1e-4)
    rescale = 4 * sched.q_rows * 64 * 3e-9  # acc (Br x Dv) rescaled once per computed tile
    assert sched.q_rows == 10 * 64
    assert r.t_compute == pytest.approx(4 * 10 * 4096 * 1e-9 + 4 * 4 * 4096 * 2e-9 + rescale)
    # 64 heads x 1024^2 fp32 = 256 MiB per score tile: beyond L2 (x2 per score) and >= 32 MiB (faulted in)
    big = cpu_tiled_forward(p, 1, 64, 4096, 4096, 64, block_q=1024, block_k=1024)
    assert big.t_compute == pytest.approx(2 * 64 * 4096 * 4096 * 1e-9 + 64 * 16 * 1024 * 64 * 3e-9)
    assert big.overhead == pytest.approx(16 * (1e-4 + 256 * 2**20 * 1e-10))
