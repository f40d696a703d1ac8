"""Empty inputs on every public function and backend (correctly shaped outputs, zero gradients,
other arguments still checked), and bad arguments as ValueErrors naming the value."""

from __future__ import annotations

import os

import pytest
import torch

from fa2lab import attention, decode_attention, merge_states, tiled_attention, varlen_attention
from fa2lab.distributed import gather, plan_ring, shard, simulate_ring
from fa2lab.kvcache import (DecodeSession, LowRankKVCache, PagedKVCache, QuantizedKVCache, SlidingWindowKVCache,
                            StaticKVCache)
from fa2lab.reference import attention_ref

# (B, Hq, Nq, D, Hkv, Nk): every zero-sized dimension, alone and together
EMPTY = [(0, 4, 5, 8, 2, 7), (2, 4, 0, 8, 2, 7), (2, 0, 5, 8, 2, 7), (2, 0, 5, 8, 0, 7), (0, 0, 0, 8, 0, 0),
         (2, 4, 5, 8, 2, 0), (1, 2, 3, 0, 1, 4)]


def inputs(b, hq, nq, d, hkv, nk, dv=None, grad=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64).requires_grad_(grad)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64).requires_grad_(grad)
    v = torch.randn(b, hkv, nk, d if dv is None else dv, generator=g, dtype=torch.float64).requires_grad_(grad)
    return q, k, v


def backends(shape, causal):
    names = ["auto", "tiled", "reference"]
    b, hq, nq, d, hkv, nk = shape
    if not causal and not (nq and not nk):
        names.append("sdpa")
    return names


@pytest.mark.parametrize("shape", EMPTY)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_on_empty_inputs_matches_the_reference_with_gradients(shape, causal):
    for backend in backends(shape, causal):
        q, k, v = inputs(*shape)
        lse_ok = backend != "sdpa"
        res = attention(q, k, v, causal=causal, backend=backend, return_lse=lse_ok)
        out, lse = res if lse_ok else (res, None)
        b, hq, nq, d, hkv, nk = shape
        assert out.shape == (b, hq, nq, d) and out.dtype == q.dtype
        if lse is not None:
            assert lse.shape == (b, hq, nq) and lse.dtype == torch.float64
        ref = attention_ref(q.detach(), k.detach(), v.detach(), causal=causal)
        torch.testing.assert_close(out.detach(), ref)
        (out.sum() + (lse.clamp(min=-1e9).sum() if lse is not None else 0)).backward()
        for t in (q, k, v):
            assert t.grad is not None and t.grad.shape == t.shape, backend
        if not out.numel():
            assert all(not t.grad.any() for t in (q, k, v))


@pytest.mark.parametrize("shape", EMPTY)
def test_tiled_and_reference_directly(shape):
    q, k, v = inputs(*shape)
    out, lse = tiled_attention(q, k, v, causal=True, return_lse=True, block_q=2, block_k=3)
    assert out.shape == (*shape[:3], shape[3]) and lse.shape == shape[:3]
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    r_out, r_lse = attention_ref(q.detach(), k.detach(), v.detach(), causal=True, return_lse=True)
    torch.testing.assert_close(out.detach(), r_out)


@pytest.mark.parametrize("shape", [(0, 4, 1, 8, 2, 7), (2, 4, 0, 8, 2, 7), (2, 0, 1, 8, 2, 7), (2, 0, 1, 8, 0, 7),
                                   (2, 4, 1, 8, 2, 0), (0, 0, 0, 8, 0, 0)])
@pytest.mark.parametrize("backend", ["auto", "tiled", "reference"])
def test_decode_on_empty_inputs(shape, backend):
    q, k, v = inputs(*shape, grad=False)
    b, hq, nq, d, hkv, nk = shape
    for kw in ({}, dict(cache_seqlens=torch.zeros(b, dtype=torch.int32)), dict(num_splits=3)):
        out, lse = decode_attention(q, k, v, backend=backend, return_lse=True, **kw)
        assert out.shape == (b, hq, nq, d) and lse.shape == (b, hq, nq)
        if nq and hq and b:
            assert not out.any() and (lse == float("-inf")).all()  # a cache with no keys
    pages = torch.zeros(3, max(hkv, 1) if hkv else 0, 4, d, dtype=torch.float64)
    out = decode_attention(q, pages, pages, block_table=torch.zeros(b, 1, dtype=torch.int32),
                           cache_seqlens=torch.zeros(b, dtype=torch.int32), backend=backend)
    assert out.shape == (b, hq, nq, d)


def test_empty_inputs_still_validate_their_other_arguments():
    q, k, v = inputs(0, 4, 5, 8, 2, 7, grad=False)
    qd, kd, vd = inputs(2, 4, 0, 8, 2, 7, grad=False)
    for call, match in [
        (lambda: attention(q, k, v, backend="bogus"), "unknown backend"),
        (lambda: attention(q, k, v, window_size=(-5, 0)), "window_size"),
        (lambda: attention(q, k, v, softmax_scale=float("nan")), "softmax_scale"),
        (lambda: attention(q, k.float(), v), "share a dtype"),
        (lambda: attention(q, k, v, causal="yes"), "causal"),
        (lambda: decode_attention(qd, kd, vd, num_splits=0), "num_splits"),
        (lambda: decode_attention(qd, kd, vd, backend="bogus"), "unknown decode backend"),
        (lambda: decode_attention(qd, kd, vd, window_size=(1.5, 0)), "window_size"),
        (lambda: decode_attention(qd, kd, vd, cache_seqlens=torch.zeros(2)), "int32"),
        (lambda: tiled_attention(q, k, v, block_q=0), "block_q"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_varlen_with_no_queries_still_checks_the_backend():
    q, k = torch.randn(0, 4, 8), torch.randn(5, 2, 8)
    cu_q, cu_k = torch.tensor([0, 0], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        varlen_attention(q, k, k, cu_q, cu_k, backend="bogus")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'triton' cannot run"):
            varlen_attention(q, k, k, cu_q, cu_k, backend="triton")
    with pytest.raises(ValueError, match="log-sum-exp"):
        varlen_attention(q, k, k, cu_q, cu_k, backend="sdpa", return_lse=True)
    out, lse = varlen_attention(q, k, k, cu_q, cu_k, return_lse=True)
    assert out.shape == (0, 4, 8) and lse.shape == (4, 0)
    # no heads, with tokens
    q0, k0 = torch.randn(3, 0, 8, requires_grad=True), torch.randn(5, 0, 8, requires_grad=True)
    out = varlen_attention(q0, k0, k0, torch.tensor([0, 3], dtype=torch.int32), cu_k)
    out.sum().backward()
    assert out.shape == (3, 0, 8) and q0.grad.shape == q0.shape


@pytest.mark.parametrize("world, n, causal", [(2, 0, False), (3, 0, True), (1, 0, False), (2, 4, True)])
def test_ring_shards_and_gather_with_zero_length_shards(world, n, causal):
    plan = plan_ring(world, n, causal=causal)
    x = torch.randn(2, 3, world * n, 4)
    shards = [shard(x, plan, r, n) for r in range(world)]
    assert torch.equal(gather(shards, plan, n), x)
    q = torch.randn(1, 2, world * n, 4, dtype=torch.float64)
    out, lse = simulate_ring(q, q, q, plan)[0][-1]
    assert out.shape == (1, 2, n, 4) and lse.shape == (1, 2, n)


def test_empty_merge_states():
    out, lse = merge_states(torch.zeros(0, 3, 4), torch.zeros(0, 3), torch.zeros(0, 3, 4), torch.zeros(0, 3))
    assert out.shape == (0, 3, 4) and lse.shape == (0, 3)


# --- validation gaps ----------------------------------------------------------------------------

@pytest.mark.parametrize("window", [(-5, 0), (1.5, 0), (0, -2), (0,), "ab", None, (True, 0), (0, 1, 2)])
def test_plan_ring_refuses_bad_windows(window):
    with pytest.raises(ValueError, match="window_size"):
        plan_ring(2, 4, window_size=window)


@pytest.mark.parametrize("args, kw", [((2.5, 4), {}), ((2, 4.0), {}), ((True, 4), {}), (("2", 4), {}), ((2, -1), {}),
                                      ((2, 4, 3.0), {}), ((0, 4), {}), ((2, 4), dict(layout="zz")),
                                      ((2, 4), dict(causal="yes"))])
def test_plan_ring_refuses_bad_sizes_and_options(args, kw):
    with pytest.raises(ValueError):
        plan_ring(*args, **kw)


def test_shard_and_gather_refuse_mismatched_inputs():
    plan = plan_ring(2, 4)
    with pytest.raises(ValueError, match="one shard per rank"):
        gather([torch.zeros(1, 1, 4, 2)], plan, 4)
    with pytest.raises(ValueError, match="shard 1"):
        gather([torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 3, 2)], plan, 4)
    with pytest.raises(ValueError, match="gathered sequence"):
        shard(torch.zeros(1, 1, 7, 2), plan, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        shard(torch.zeros(1, 1, 8, 2), plan, 2, 4)


BAD = [None, "x", 1.5, [1, 2], float("nan"), object(), -3, torch.tensor([1.0, 2.0])]
Q, K = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8)
QP, KP = torch.randn(3, 2, 8), torch.randn(4, 2, 8)
CU, CUK = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32)
CALLS = {
    "attention q": lambda b: attention(b, K, K),
    "attention causal": lambda b: attention(Q, K, K, causal=b),
    "attention window": lambda b: attention(Q, K, K, window_size=b),
    "attention softmax_scale": lambda b: attention(Q, K, K, softmax_scale=b),
    "attention return_lse": lambda b: attention(Q, K, K, return_lse=b),
    "attention backend": lambda b: attention(Q, K, K, backend=b),
    "tiled block_q": lambda b: tiled_attention(Q, K, K, block_q=b),
    "reference causal": lambda b: attention_ref(Q, K, K, causal=b),
    "reference q": lambda b: attention_ref(b, K, K),
    "varlen cu_seqlens": lambda b: varlen_attention(QP, KP, KP, b, CUK),
    "varlen max_seqlen_q": lambda b: varlen_attention(QP, KP, KP, CU, CUK, max_seqlen_q=b),
    "varlen causal": lambda b: varlen_attention(QP, KP, KP, CU, CUK, causal=b),
    "decode cache_seqlens": lambda b: decode_attention(Q, K, K, cache_seqlens=b),
    "decode num_splits": lambda b: decode_attention(Q, K, K, num_splits=b),
    "decode causal": lambda b: decode_attention(Q, K, K, causal=b),
    "decode unified_max": lambda b: decode_attention(Q, K, K, unified_max=b),
    "decode return_lse": lambda b: decode_attention(Q, K, K, return_lse=b),
    "merge": lambda b: merge_states(b, torch.zeros(1, 2), torch.zeros(1, 2, 3), torch.zeros(1, 2)),
    "static sizes": lambda b: StaticKVCache(b, 2, 4, 8),
    "static dtype": lambda b: StaticKVCache(1, 2, 4, 8, dtype=b),
    "static append": lambda b: StaticKVCache(1, 2, 4, 8, dtype=torch.float32).append(b, b),
    "static lengths": lambda b: StaticKVCache(1, 2, 4, 8, dtype=torch.float32).append(K[:, :, :1], K[:, :, :1], b),
    "static attend": lambda b: StaticKVCache(1, 2, 4, 8, dtype=torch.float32).attend(b),
    "window sizes": lambda b: SlidingWindowKVCache(1, 2, b, 8),
    "window dtype": lambda b: SlidingWindowKVCache(1, 2, 4, 8, dtype=b),
    "paged sizes": lambda b: PagedKVCache(b, 4, 2, 8),
    "paged dtype": lambda b: PagedKVCache(4, 4, 2, 8, dtype=b),
    "paged seq_ids": lambda b: PagedKVCache(4, 4, 2, 8, dtype=torch.float32).attend(Q, b),
    "int8 sizes": lambda b: QuantizedKVCache(1, 2, b, 8),
    "int8 dtype": lambda b: QuantizedKVCache(1, 2, 4, 8, dtype=b),
    "lowrank rank": lambda b: LowRankKVCache(1, 2, 4, 8, b),
    "lowrank dtype": lambda b: LowRankKVCache(1, 2, 4, 8, 2, dtype=b),
    "session sizes": lambda b: DecodeSession(b, 2, 2, 4, 8),
    "session load_qkv": lambda b: DecodeSession(1, 2, 2, 4, 8, dtype=torch.float32).init().load_qkv(b, b, b),
    "plan_ring world_size": lambda b: plan_ring(b, 4),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_bad_arguments_are_value_errors(name):
    """No raw AttributeError, TypeError, KeyError or RuntimeError from a public entry point."""
    raised = 0
    for bad in BAD:
        try:
            CALLS[name](bad)
        except ValueError as exc:
            raised += 1
            assert str(exc), name
    assert raised >= 4, f"{name}: only {raised} of {len(BAD)} bad values refused"


def test_flash_attn_compat_with_an_empty_batch():
    from fa2lab.compat.flash_attn import flash_attn_func, flash_attn_with_kvcache

    cache = torch.zeros(0, 16, 2, 8)
    out = flash_attn_with_kvcache(torch.randn(0, 1, 4, 8), cache, cache, k=torch.randn(0, 1, 2, 8),
                                  v=torch.randn(0, 1, 2, 8), cache_seqlens=torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 1, 4, 8)
    assert flash_attn_func(torch.randn(0, 5, 4, 8), torch.randn(0, 7, 2, 8), torch.randn(0, 7, 2, 8)).shape == (0, 5, 4, 8)
