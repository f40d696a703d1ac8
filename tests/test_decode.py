"""Split-K decoding against a single-request float64 reference, and merge_states."""

import logging

import pytest
import torch
from helpers import finite_lse, max_err, to_paged

from fa2lab import decode_attention, merge_states, merge_states_stack
from fa2lab.decode import auto_num_splits, plan_splits
from fa2lab.reference import attention_ref

LENGTHS = [1, 54, 97, 512, 2048]


def _dense_case(hq=8, hkv=2, d=40, nq=1, lengths=LENGTHS, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    b, nmax = len(lengths), max(lengths) + 3  # some slack past the longest sequence
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, nmax, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, nmax, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, torch.tensor(lengths, dtype=torch.int32)


def _per_request_reference(q, k, v, seqlens, **kw):
    outs, lses = [], []
    for b, n in enumerate(seqlens.tolist()):  # each request alone, from the raw tensors
        o, l = attention_ref(q[b:b + 1].double(), k[b:b + 1, :, :n].double(), v[b:b + 1, :, :n].double(),
                             return_lse=True, **kw)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 16, 1000, None])
@pytest.mark.parametrize("nq", [1, 4])
@pytest.mark.parametrize("window", [(-1, -1), (100, 0)])
def test_dense_decode_matches_each_request(num_splits, nq, window):
    q, k, v, seqlens = _dense_case(nq=nq)
    out, lse = decode_attention(q, k, v, cache_seqlens=seqlens, num_splits=num_splits, window_size=window,
                                return_lse=True)
    out_r, lse_r = _per_request_reference(q, k, v, seqlens, causal=True, window_size=window)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert max_err(out, out_r) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_r))  # nq=4 with length 1: rows with no key
    assert max_err(finite_lse(lse), finite_lse(lse_r)) < 1e-12


@pytest.mark.parametrize("page_size", [1, 8, 16, 256])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_matches_each_request(page_size, num_splits):
    q, k, v, seqlens = _dense_case(hq=4, hkv=4, d=32, nq=2, lengths=[1, 54, 97, 300])
    kp, vp, table = to_paged(k, v, seqlens, page_size)
    out = decode_attention(q, kp, vp, cache_seqlens=seqlens, block_table=table, num_splits=num_splits)
    out_r, _ = _per_request_reference(q, k, v, seqlens, causal=True)
    assert max_err(out, out_r) < 1e-12  # NaN-poisoned unused slots never leak in


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_decode_within_torch_rule(dtype):
    q, k, v, seqlens = _dense_case(hq=32, hkv=8, d=64, lengths=[97, 512], dtype=dtype)
    out = decode_attention(q, k, v, cache_seqlens=seqlens, num_splits=3)
    truth, _ = _per_request_reference(q, k, v, seqlens, causal=True)
    naive = torch.cat([attention_ref(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], upcast=False)
                       for b, n in enumerate(seqlens.tolist())])
    assert max_err(out, truth) <= 2 * max_err(naive, truth)


def test_num_splits_planning():
    assert plan_splits(2048, 1000, 512).num_splits == 4  # never more splits than tiles
    assert plan_splits(2048, 3, 512).ranges == ((0, 1024), (1024, 1536), (1536, 2048))
    assert plan_splits(0, 4).ranges == ((0, 0),)
    assert auto_num_splits(work_items=64, cache_len=8192, num_units=16) == 1  # enough parallel work
    s = auto_num_splits(work_items=8, cache_len=32768, num_units=132)  # B=1, Hkv=8 on an H100
    assert 8 <= s <= 64 and s <= 32768 // 512


def test_merge_states_is_exact_order_independent_and_associative():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 90, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 90, 16, generator=g, dtype=torch.float64)
    parts = [attention_ref(q, k[:, :, a:b], v[:, :, a:b], return_lse=True) for a, b in [(0, 10), (10, 50), (50, 90)]]
    full = attention_ref(q, k, v, return_lse=True)
    (oa, la), (ob, lb), (oc, lc) = parts
    left = merge_states(*merge_states(oa, la, ob, lb), oc, lc)
    right = merge_states(oa, la, *merge_states(ob, lb, oc, lc))
    swapped = merge_states(*merge_states(oc, lc, oa, la), ob, lb)
    stacked = merge_states_stack(torch.stack([oa, ob, oc]), torch.stack([la, lb, lc]))
    for out, lse in (left, right, swapped, stacked):
        assert max_err(out, full[0]) < 1e-14 and max_err(lse, full[1]) < 1e-14


def test_merge_with_empty_parts():
    out = torch.randn(2, 4, 8)
    lse = torch.randn(2, 4)
    empty_out, empty_lse = torch.zeros(2, 4, 8), torch.full((2, 4), float("-inf"))
    o, l = merge_states(out, lse, empty_out, empty_lse)
    assert torch.allclose(o, out) and torch.allclose(l, lse)
    o, l = merge_states(empty_out, empty_lse, empty_out, empty_lse)
    assert (o == 0).all() and torch.isneginf(l).all()
    with pytest.raises(ValueError, match="out.shape\\[:-1\\]"):
        merge_states(out, lse[:, :2], out, lse)


def test_unified_max_exact_in_range_and_falls_back_outside(caplog):
    q, k, v, seqlens = _dense_case(hq=4, hkv=4, d=64, lengths=[97, 512], dtype=torch.float32)
    truth, _ = _per_request_reference(q, k, v, seqlens, causal=True)
    exact = decode_attention(q, k, v, cache_seqlens=seqlens, num_splits=3)
    with caplog.at_level(logging.WARNING, logger="fa2lab"):
        good = decode_attention(q, k, v, cache_seqlens=seqlens, num_splits=3, unified_max=4.0)
        assert not caplog.records
        for phi in (-200.0, 300.0):  # logits far above phi overflow; far below, underflow
            out = decode_attention(q, k, v, cache_seqlens=seqlens, num_splits=3, unified_max=phi)
            assert max_err(out, truth) <= 2 * max_err(exact, truth) + 1e-6
    assert max_err(good, truth) <= 2 * max_err(exact, truth) + 1e-6
    assert len([r for r in caplog.records if "unified max" in r.getMessage()]) == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(cache_seqlens=torch.tensor([5, 5], dtype=torch.int64)), "int32"),
    (dict(cache_seqlens=torch.tensor([5, 99], dtype=torch.int32)), "cache capacity 60"),
    (dict(num_splits=0), "positive int"),
    (dict(backend="flash"), "unknown decode backend"),
])
def test_decode_bad_input(kwargs, match):
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 60, 16), torch.randn(2, 2, 60, 16)
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, v, **kwargs)


def test_paged_bad_input():
    q = torch.randn(2, 4, 1, 16)
    kp = vp = torch.randn(10, 2, 8, 16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match="needs cache_seqlens"):
        decode_attention(q, kp, vp, block_table=table)
    with pytest.raises(ValueError, match=r"block_table\[1\] points outside the pool of 10 pages"):
        decode_attention(q, kp, vp, block_table=torch.tensor([[0, 1], [2, 12]], dtype=torch.int32),
                         cache_seqlens=torch.tensor([16, 16], dtype=torch.int32))
