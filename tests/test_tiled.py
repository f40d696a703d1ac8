"""The PyTorch FA2 (fa2lab.tiled) against the float64 naive oracle, forward and backward."""

import pytest
import torch
from helpers import LargestTensor, assert_within_torch_error, finite_lse, loss_and_grads, make_qkv, max_err

from fa2lab import TileTracer, tiled_attention
from fa2lab.reference import attention_ref

# (B, Hq, Hkv, Nq, Nk, D, Dv, causal, window, Br, Bc): awkward on purpose.
CASES = [
    (1, 1, 1, 1, 1, 32, 32, False, (-1, -1), 16, 16),
    (2, 4, 1, 17, 97, 40, 40, True, (-1, -1), 16, 32),  # Nq < Nk, MQA 4:1
    (1, 4, 4, 97, 17, 80, 80, True, (-1, -1), 32, 16),  # Nq > Nk: rows with no key
    (1, 8, 2, 232, 232, 64, 64, True, (-1, -1), 64, 64),  # GQA 4:1, tile-aligned-ish
    (1, 2, 2, 97, 232, 128, 128, False, (-1, -1), 64, 48),
    (2, 2, 1, 232, 97, 40, 24, False, (16, 8), 32, 32),  # window, Dv != D
    (1, 2, 2, 97, 97, 32, 32, True, (8, -1), 16, 16),  # causal + window
    (1, 2, 2, 1, 1025, 64, 64, True, (-1, -1), 64, 128),  # decode-like
    (1, 2, 1, 1025, 1025, 40, 40, True, (100, -1), 128, 128),
    (1, 2, 2, 17, 97, 80, 80, False, (0, 0), 8, 8),  # each row sees one key
    (1, 2, 2, 17, 232, 32, 32, False, (-1, 3), 16, 64),  # right bound only: Nk - Nq shifts it
]


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,dv,causal,window,bq,bk", CASES)
def test_forward_backward_match_float64_reference(b, hq, hkv, nq, nk, d, dv, causal, window, bq, bk):
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dv, requires_grad=True)
    do = torch.randn(b, hq, nq, dv, dtype=torch.float64)
    dlse = torch.randn(b, hq, nq, dtype=torch.float64)
    kw = dict(causal=causal, window_size=window)
    out, lse, grads = loss_and_grads(tiled_attention, q, k, v, do, dlse, block_q=bq, block_k=bk, **kw)
    out_r, lse_r, grads_r = loss_and_grads(attention_ref, q, k, v, do, dlse, **kw)
    assert out.shape == (b, hq, nq, dv) and lse.shape == (b, hq, nq)
    assert max_err(out, out_r) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_r))
    assert max_err(finite_lse(lse), finite_lse(lse_r)) < 1e-12
    for g, g_r in zip(grads, grads_r):
        assert max_err(g, g_r) < 1e-11


def test_rows_without_keys_are_zero_with_minus_inf_lse():
    q, k, v = make_qkv(1, 2, 2, 9, 4, 16)
    out, lse = tiled_attention(q, k, v, causal=True, return_lse=True, block_q=4, block_k=4)
    assert (out[:, :, :5] == 0).all() and torch.isneginf(lse[:, :, :5]).all()
    assert torch.isfinite(lse[:, :, 5:]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nq,nk,causal,hq,hkv", [(97, 232, True, 4, 1), (232, 232, False, 2, 2)])
def test_low_precision_error_within_torch_rule(dtype, nq, nk, causal, hq, hkv):
    q, k, v = make_qkv(1, hq, hkv, nq, nk, 64, seed=3)
    fn = lambda *a, **kw: tiled_attention(*a, block_q=64, block_k=64, **kw)  # noqa: E731
    assert_within_torch_error(fn, q, k, v, dtype, causal=causal)


def test_output_dtype_follows_q_and_lse_is_float32():
    q, k, v = make_qkv(1, 2, 2, 33, 33, 32, dtype=torch.bfloat16)
    out, lse = tiled_attention(q, k, v, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


@pytest.mark.parametrize("causal", [False, True])
def test_no_tensor_of_size_nq_by_nk_in_forward_or_backward(causal):
    # One head, so a single (Nq, Nk) score matrix would be the largest tensor by far.
    q, k, v = make_qkv(1, 1, 1, 1025, 1025, 32, dtype=torch.float32, requires_grad=True)
    with LargestTensor() as mode:
        out = tiled_attention(q, k, v, causal=causal, block_q=128, block_k=128)
        out.sum().backward()
    assert mode.largest < 1025 * 1025 // 8, f"largest tensor has {mode.largest} elements"
    with LargestTensor() as naive:
        attention_ref(q.detach(), k.detach(), v.detach(), causal=causal)
    assert naive.largest >= 1025 * 1025  # the probe itself sees the naive matrix


def test_tracer_records_schedule_and_running_stats():
    q, k, v = make_qkv(1, 2, 1, 10, 10, 8)
    tracer = TileTracer()
    out, lse = tiled_attention(q, k, v, causal=True, block_q=4, block_k=4, tracer=tracer, return_lse=True)
    assert tracer.grid() == [["partial", "skipped", "skipped"],
                             ["full", "partial", "skipped"],
                             ["full", "full", "partial"]]
    assert tracer.counts() == {"full": 3, "partial": 3, "skipped": 3}
    visited = [s for s in tracer.steps if s.order >= 0]
    assert [s.order for s in visited] == list(range(6))
    # After a query tile's last step, m + log(l) is the final lse of its rows.
    last = {s.q_tile: s for s in visited}
    for qt, step in last.items():
        i0, i1 = step.q_range
        assert step.m.shape == (1, 2, i1 - i0)
        assert torch.allclose(step.m + step.l.log(), lse[:, :, i0:i1])
    assert torch.allclose(out, attention_ref(q, k, v, causal=True))


def test_tracer_is_off_by_default_and_results_do_not_depend_on_it():
    q, k, v = make_qkv(2, 4, 2, 50, 70, 16)
    a = tiled_attention(q, k, v, window_size=(5, 5), block_q=16, block_k=16)
    b = tiled_attention(q, k, v, window_size=(5, 5), block_q=16, block_k=16, tracer=TileTracer())
    assert torch.equal(a, b)


def test_non_finite_inputs_do_not_crash():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, dtype=torch.float32, requires_grad=True)
    with torch.no_grad():
        k[0, 0, 3, 0] = float("nan")
        q[0, 1, 2, 0] = float("inf")
    out = tiled_attention(q, k, v, causal=True, block_q=8, block_k=8)
    out.sum().backward()
    assert out.shape == q.shape
    assert torch.isfinite(out[0, 0, :3]).all()  # rows before the NaN key are untouched


@pytest.mark.slow
@pytest.mark.parametrize("d", [32, 40, 64, 80, 128])
@pytest.mark.parametrize("nq,nk", [(1, 1025), (97, 1025), (1025, 1025), (1025, 232), (232, 97)])
@pytest.mark.parametrize("hq,hkv", [(1, 1), (4, 1), (32, 8)])
def test_full_grid_against_reference(d, nq, nk, hq, hkv):
    q, k, v = make_qkv(1, hq, hkv, nq, nk, d, requires_grad=True)
    do = torch.randn(1, hq, nq, d, dtype=torch.float64)
    dlse = torch.randn(1, hq, nq, dtype=torch.float64)
    for kw in (dict(causal=True), dict(causal=False, window_size=(37, 11)), dict(causal=True, window_size=(100, -1))):
        out, lse, grads = loss_and_grads(tiled_attention, q, k, v, do, dlse, block_q=128, block_k=64, **kw)
        out_r, lse_r, grads_r = loss_and_grads(attention_ref, q, k, v, do, dlse, **kw)
        assert max_err(out, out_r) < 1e-12
        assert all(max_err(g, g_r) < 1e-10 for g, g_r in zip(grads, grads_r))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiled_on_cuda_within_torch_rule(dtype):
    q, k, v = (t.cuda() for t in make_qkv(2, 8, 2, 1025, 1025, 128, seed=5))
    fn = lambda *a, **kw: tiled_attention(*a, block_q=128, block_k=128, **kw)  # noqa: E731
    assert_within_torch_error(fn, q, k, v, dtype, causal=True)
