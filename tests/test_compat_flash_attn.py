"""fa2lab.compat.flash_attn, called as flash-attn's users call it: (B, N, H, D) tensors, packed
and varlen batches, KV caches updated in place. Each case against a float64 oracle written from
flash-attn's own tests (compat_ref.py); low precision by the 2x rule (3x for gradients)."""

import importlib.util
import inspect
import logging
import math
import sys

import pytest
import torch
from compat_ref import err, ref_attention, ref_rotary

import fa2lab
from fa2lab.compat import install, uninstall, use_backend
from fa2lab.compat.flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from fa2lab.compat.flash_attn.options import accepts

HAS_TRITON = importlib.util.find_spec("triton") is not None
LOW = [torch.float16, torch.bfloat16]


def rand(*shape, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def within_rule(ours, truth, naive, dtype, factor=2.0):
    floor = torch.finfo(dtype).eps / 4
    e, e_torch = err(ours, truth), err(naive, truth)
    assert e <= factor * e_torch + floor, f"error {e:.3g} vs torch's {e_torch:.3g} in {dtype}"


# flash-attn 2.8.3, flash_attn/flash_attn_interface.py: (name, default) in positional order.
_EMPTY = inspect.Parameter.empty
_DENSE_OPTS = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
               ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
SIGNATURES = {
    flash_attn_qkvpacked_func: [("qkv", _EMPTY), *_DENSE_OPTS],
    flash_attn_kvpacked_func: [("q", _EMPTY), ("kv", _EMPTY), *_DENSE_OPTS],
    flash_attn_func: [("q", _EMPTY), ("k", _EMPTY), ("v", _EMPTY), *_DENSE_OPTS],
    flash_attn_varlen_qkvpacked_func: [("qkv", _EMPTY), ("cu_seqlens", _EMPTY), ("max_seqlen", _EMPTY), *_DENSE_OPTS],
    flash_attn_varlen_kvpacked_func: [("q", _EMPTY), ("kv", _EMPTY), ("cu_seqlens_q", _EMPTY),
                                      ("cu_seqlens_k", _EMPTY), ("max_seqlen_q", _EMPTY), ("max_seqlen_k", _EMPTY),
                                      *_DENSE_OPTS],
    flash_attn_varlen_func: [("q", _EMPTY), ("k", _EMPTY), ("v", _EMPTY), ("cu_seqlens_q", _EMPTY),
                             ("cu_seqlens_k", _EMPTY), ("max_seqlen_q", _EMPTY), ("max_seqlen_k", _EMPTY),
                             *_DENSE_OPTS, ("block_table", None)],
    flash_attn_with_kvcache: [("q", _EMPTY), ("k_cache", _EMPTY), ("v_cache", _EMPTY), ("k", None), ("v", None),
                              ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
                              ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None),
                              ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
                              ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None),
                              ("num_splits", 0), ("return_softmax_lse", False)],
}


@pytest.mark.parametrize("fn", list(SIGNATURES), ids=lambda f: f.__name__)
def test_signature_is_flash_attn_2_8(fn):
    params = inspect.signature(fn).parameters.values()
    assert [(p.name, p.default) for p in params] == SIGNATURES[fn]
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)


# (B, Nq, Nk, H, Hkv, D, causal, window)
DENSE = [
    (2, 97, 232, 4, 2, 40, True, (-1, -1)),  # Nq < Nk causal, GQA, odd head dim
    (1, 232, 97, 4, 4, 80, True, (-1, -1)),  # Nq > Nk causal: the first rows see no key
    (2, 1, 1025, 6, 1, 64, False, (-1, -1)),  # one query, MQA
    (1, 130, 130, 2, 2, 32, False, (16, 8)),  # two-sided window
    (1, 64, 100, 4, 2, 32, True, (10, -1)),  # causal sliding window
]


@pytest.mark.parametrize("b,nq,nk,h,hkv,d,causal,window", DENSE)
def test_flash_attn_func_float64_exact(b, nq, nk, h, hkv, d, causal, window):
    q, k, v = rand(b, nq, h, d, seed=1), rand(b, nk, hkv, d, seed=2), rand(b, nk, hkv, d, seed=3)
    out, lse, s_dmask = flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    truth, lse_t = ref_attention(q, k, v, causal=causal, window=window)
    assert out.shape == (b, nq, h, d) and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (b, h, nq) and lse.dtype == torch.float64
    assert err(out, truth) < 1e-12 and err(lse, lse_t) < 1e-12
    assert s_dmask.shape == (0,) and s_dmask.dtype == q.dtype


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("b,nq,nk,h,hkv,d,causal,window", [DENSE[0], DENSE[1], DENSE[3]])
def test_flash_attn_func_low_precision_forward_and_gradients(dtype, b, nq, nk, h, hkv, d, causal, window):
    q64, k64, v64 = rand(b, nq, h, d, seed=4), rand(b, nk, hkv, d, seed=5), rand(b, nk, hkv, d, seed=6)
    do = rand(b, nq, h, d, seed=7)
    kw = dict(causal=causal, window=window)

    def run(fn, dt, **extra):
        leaves = [t.to(dt).requires_grad_() for t in (q64, k64, v64)]
        out = fn(*leaves, **extra)
        out = out[0] if isinstance(out, tuple) else out
        return out, torch.autograd.grad((out.double() * do).sum(), leaves)

    ours, g_ours = run(flash_attn_func, dtype, causal=causal, window_size=window)
    truth, g_truth = run(lambda *a: ref_attention(*a, **kw), torch.float64)
    naive, g_naive = run(lambda *a: ref_attention(*a, upcast=False, **kw), dtype)
    assert ours.dtype == dtype and lse_dtype_of(q64.to(dtype), k64.to(dtype), v64.to(dtype)) == torch.float32
    within_rule(ours, truth, naive, dtype)
    for a, t, n in zip(g_ours, g_truth, g_naive):
        within_rule(a, t, n, dtype, factor=3.0)


def lse_dtype_of(q, k, v):
    return flash_attn_func(q, k, v, return_attn_probs=True)[1].dtype


def test_rows_that_see_no_key_are_zero_with_flash_attn_lse():
    q, k, v = rand(1, 9, 2, 16, seed=1), rand(1, 4, 2, 16, seed=2), rand(1, 4, 2, 16, seed=3)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)  # rows 0-4 see no key
    assert torch.all(out[:, :5] == 0) and torch.all(lse[:, :, :5] == float("inf"))
    assert torch.isfinite(lse[:, :, 5:]).all()


def test_packed_variants_equal_unpacked_with_gradients():
    qkv = rand(2, 50, 3, 4, 32, seed=8).requires_grad_()
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(2))
    ref = flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out, ref)
    do = rand(*out.shape, seed=9)
    (dqkv,) = torch.autograd.grad((out * do).sum(), qkv)
    assert torch.allclose(dqkv, torch.stack(torch.autograd.grad((ref * do).sum(), (q, k, v)), 2), atol=1e-12)

    q = rand(2, 30, 4, 32, seed=10).requires_grad_()
    kv = rand(2, 70, 2, 2, 32, seed=11).requires_grad_()
    out = flash_attn_kvpacked_func(q, kv, causal=True, window_size=(20, 0))
    truth, _ = ref_attention(q, *kv.unbind(2), causal=True, window=(20, 0))
    assert err(out, truth) < 1e-12
    dq, dkv = torch.autograd.grad((out * 1.0).sum(), (q, kv))
    tq, tkv = torch.autograd.grad(truth.sum(), (q, kv))
    assert err(dq, tq) < 1e-10 and err(dkv, tkv) < 1e-10


def test_layouts_are_passed_as_views(monkeypatch):
    """(B, N, H, D) and packed tensors reach fa2lab.attention as strided views of the caller's memory."""
    seen = []
    real = fa2lab.attention

    def spy(q, k, v, **kw):
        seen.append([t.untyped_storage().data_ptr() for t in (q, k, v)])
        return real(q, k, v, **kw)

    monkeypatch.setattr(fa2lab, "attention", spy)
    qkv = rand(1, 20, 3, 2, 16)
    flash_attn_qkvpacked_func(qkv)
    q, k, v = rand(1, 20, 2, 16), rand(1, 25, 1, 16), rand(1, 25, 1, 16)
    flash_attn_func(q, k, v)
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert seen == [[ptr(qkv)] * 3, [ptr(q), ptr(k), ptr(v)]]


def test_window_and_scale_arguments_as_flash_attn_takes_them():
    q, k, v = rand(1, 40, 2, 16, seed=1), rand(1, 60, 2, 16, seed=2), rand(1, 60, 2, 16, seed=3)
    # a tensor pair (flash-attn's own tests draw windows with torch.randint) and any negative = unbounded
    out = flash_attn_func(q, k, v, softmax_scale=0.3, window_size=torch.tensor([7, -5]))
    truth, _ = ref_attention(q, k, v, window=(7, -1), scale=0.3)
    assert err(out, truth) < 1e-12
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=(3,))
    with pytest.raises(ValueError, match=r"\(batch_size, seqlen, nheads, headdim\)"):
        flash_attn_func(q[0], k, v)


@pytest.mark.parametrize("kvpacked", [False, True])
def test_varlen_with_empty_and_single_token_sequences(kvpacked):
    lens_q, lens_k = [5, 0, 1, 70, 33, 1], [5, 3, 0, 70, 50, 1]
    h, hkv, d = 4, 2, 40
    q = rand(sum(lens_q), h, d, seed=1).requires_grad_()
    k, v = rand(sum(lens_k), hkv, d, seed=2), rand(sum(lens_k), hkv, d, seed=3)
    if kvpacked:
        kv = torch.stack((k, v), 1).requires_grad_()  # (total_k, 2, Hkv, D)
        out, lse, _ = flash_attn_varlen_kvpacked_func(q, kv, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                                      causal=True, return_attn_probs=True)
        leaves = (q, kv)
    else:
        k, v = k.requires_grad_(), v.requires_grad_()
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), causal=True,
                                             return_attn_probs=True)
        leaves = (q, k, v)
    assert out.shape == (sum(lens_q), h, d) and lse.shape == (h, sum(lens_q))
    k_all, v_all = (kv.unbind(1) if kvpacked else (k, v))
    truths = []
    for s, (a, b, c, e) in enumerate(zip(cu(lens_q), cu(lens_q)[1:], cu(lens_k), cu(lens_k)[1:])):
        truth, lse_t = ref_attention(q[a:b][None], k_all[c:e][None], v_all[c:e][None], causal=True)
        assert err(out[a:b], truth[0]) < 1e-12 and err(lse[:, a:b], lse_t[0]) < 1e-12, f"sequence {s}"
        truths.append(truth[0])
    assert torch.all(lse[:, cu(lens_q)[2]:cu(lens_q)[3]] == float("inf"))  # the query that sees no key
    do = rand(*out.shape, seed=4)
    grads = torch.autograd.grad((out * do).sum(), leaves)
    grads_t = torch.autograd.grad((torch.cat(truths) * do).sum(), leaves)
    assert all(err(g, t) < 1e-10 for g, t in zip(grads, grads_t))


def test_varlen_qkvpacked_low_precision():
    lens = [1, 97, 0, 40]
    dtype = torch.bfloat16
    qkv64 = rand(sum(lens), 3, 4, 32, seed=5)
    out = flash_attn_varlen_qkvpacked_func(qkv64.to(dtype), cu(lens), max(lens), causal=True)
    for a, b in zip(cu(lens), cu(lens)[1:]):
        seq = qkv64[a:b][None]  # (1, n, 3, H, D)
        truth, _ = ref_attention(*seq.unbind(2), causal=True)
        naive, _ = ref_attention(*seq.to(dtype).unbind(2), causal=True, upcast=False)
        within_rule(out[a:b], truth[0], naive[0], dtype)


def paged_copy(k_dense, lens, page_size, seed=0):
    """Scatter (B, Nmax, Hkv, D) into a shuffled pool of pages: (pool, block_table int32)."""
    b, nmax = k_dense.shape[:2]
    per_seq = math.ceil(nmax / page_size)
    perm = torch.randperm(b * per_seq * 2, generator=torch.Generator().manual_seed(seed))[: b * per_seq]
    table = perm.view(b, per_seq).to(torch.int32)
    pool = rand(b * per_seq * 2, page_size, *k_dense.shape[2:], dtype=k_dense.dtype, seed=seed + 1)
    for s in range(b):
        for p in range(per_seq):
            chunk = k_dense[s, p * page_size:(p + 1) * page_size]
            pool[table[s, p], : chunk.shape[0]] = chunk
    return pool, table


@pytest.mark.parametrize("page_size", [1, 16, 256])
def test_varlen_paged_block_table(page_size):
    lens_q, lens_k = [3, 0, 1, 20], [40, 7, 0, 300]
    h, hkv, d = 4, 2, 32
    k_dense, v_dense = rand(4, 300, hkv, d, seed=2), rand(4, 300, hkv, d, seed=3)
    k_pool, table = paged_copy(k_dense, lens_k, page_size, seed=4)
    v_pool, _ = paged_copy(v_dense, lens_k, page_size, seed=4)
    q = rand(sum(lens_q), h, d, seed=1)
    out, lse, _ = flash_attn_varlen_func(q, k_pool, v_pool, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                         causal=True, return_attn_probs=True, block_table=table)
    for s, (a, b) in enumerate(zip(cu(lens_q), cu(lens_q)[1:])):
        truth, lse_t = ref_attention(q[a:b][None], k_dense[s:s + 1, : lens_k[s]], v_dense[s:s + 1, : lens_k[s]],
                                     causal=True)
        assert err(out[a:b], truth[0]) < 1e-12 and err(lse[:, a:b], lse_t[0]) < 1e-12


def make_cache_case(*, b=3, nq=1, n_new=1, h=4, hkv=2, d=32, nmax=80, page_size=None, batch_idx=False,
                    leftpad=False, rotary_dim=0, dtype=torch.float64, seed=0):
    """Inputs of one flash_attn_with_kvcache call and, in float64 terms, the cache it must leave."""
    bc = b + 2 if batch_idx else b
    k_cache, v_cache = rand(bc, nmax, hkv, d, dtype=dtype, seed=seed), rand(bc, nmax, hkv, d, dtype=dtype, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    seqlens = torch.randint(0, nmax - max(n_new, nq) + 1, (b,), generator=g, dtype=torch.int32)
    seqlens[0] = 0  # an empty cache
    seqlens[-1] = nmax - max(n_new, nq)  # a full one after the append
    case = dict(q=rand(b, nq, h, d, dtype=dtype, seed=seed + 3), cache_seqlens=seqlens)
    if n_new:
        case.update(k=rand(b, n_new, hkv, d, dtype=dtype, seed=seed + 4), v=rand(b, n_new, hkv, d, dtype=dtype, seed=seed + 5))
    rows = torch.arange(b)
    if batch_idx:
        rows = torch.randperm(bc, generator=g)[:b]
        case["cache_batch_idx"] = rows.to(torch.int32)
    if leftpad:
        case["cache_leftpad"] = (torch.rand(b, generator=g) * seqlens.double()).to(torch.int32)
    if rotary_dim:
        angle = torch.rand(nmax, rotary_dim // 2, generator=g, dtype=torch.float64) * 2 * math.pi
        case.update(rotary_cos=angle.cos().to(dtype), rotary_sin=angle.sin().to(dtype))
    expected_k, expected_v = k_cache[rows].clone(), v_cache[rows].clone()  # (B, Nmax, Hkv, D)
    if page_size is not None:
        k_pool, table = paged_copy(k_cache, None, page_size, seed=seed + 6)
        v_pool, _ = paged_copy(v_cache, None, page_size, seed=seed + 6)
        case.update(k_cache=k_pool, v_cache=v_pool, block_table=table)
    else:
        case.update(k_cache=k_cache, v_cache=v_cache)
    return case, expected_k, expected_v


def cache_reference(case, expected_k, expected_v, *, causal, window, interleaved, upcast=True):
    """Apply the append to the expected cache and attend sequence by sequence."""
    q, seqlens = case["q"], case["cache_seqlens"].long()
    b, nq = q.shape[:2]
    n_new = case["k"].shape[1] if "k" in case else 0
    local = tuple(window) != (-1, -1)
    if n_new:
        k_new = case["k"]
        if "rotary_cos" in case:
            pos = seqlens[:, None] + torch.arange(n_new)
            k_new = ref_rotary(k_new, case["rotary_cos"], case["rotary_sin"], pos, interleaved)
        for s in range(b):
            expected_k[s, seqlens[s]:seqlens[s] + n_new] = k_new[s]
            expected_v[s, seqlens[s]:seqlens[s] + n_new] = case["v"][s]
    if "rotary_cos" in case:
        steps = torch.arange(nq) if causal or local else torch.zeros(nq, dtype=torch.long)
        q = ref_rotary(q, case["rotary_cos"], case["rotary_sin"], seqlens[:, None] + steps, interleaved)
    lp = case.get("cache_leftpad", torch.zeros(b, dtype=torch.int32)).long()
    outs, lses = [], []
    for s in range(b):
        keys = slice(lp[s], seqlens[s] + n_new)
        o, lse = ref_attention(q[s:s + 1], expected_k[s:s + 1, keys], expected_v[s:s + 1, keys], causal=causal,
                               window=window, upcast=upcast)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def written_cache(case, expected_shape):
    """The caller's cache after the call, as (B, Nmax, Hkv, D) per sequence."""
    k, v = case["k_cache"], case["v_cache"]
    b = case["q"].shape[0]
    if "block_table" in case:
        t = case["block_table"].long()
        k = k[t].flatten(1, 2)[:, : expected_shape[1]]
        v = v[t].flatten(1, 2)[:, : expected_shape[1]]
    elif "cache_batch_idx" in case:
        k, v = k[case["cache_batch_idx"].long()], v[case["cache_batch_idx"].long()]
    return k[:b], v[:b]


KVCACHE = [  # (nq, n_new, page_size, batch_idx, leftpad, rotary_dim, interleaved, causal, window, hkv)
    (1, 1, None, False, False, 0, True, True, (-1, -1), 2),  # plain decode step, GQA
    (1, 0, None, False, False, 0, True, False, (-1, -1), 1),  # no append, MQA
    (3, 3, None, False, False, 32, True, True, (-1, -1), 2),  # three new tokens, full rotary interleaved
    (4, 2, None, False, False, 16, False, True, (-1, -1), 4),  # more queries than new tokens, half NeoX rotary
    (2, 2, None, True, False, 16, True, False, (-1, -1), 2),  # cache_batch_idx, rotary at one position
    (2, 1, None, False, True, 0, True, True, (-1, -1), 2),  # cache_leftpad
    (2, 2, None, True, True, 32, False, True, (5, -1), 2),  # batch idx + leftpad + window + rotary
    (1, 1, 1, False, False, 0, True, True, (-1, -1), 2),  # paged, one-token pages
    (3, 3, 16, False, False, 32, True, True, (-1, -1), 2),  # paged 16, rotary
    (2, 2, 256, False, False, 16, False, False, (4, 2), 1),  # paged 256 (flash-attn's granule), window
    (2, 1, 16, False, True, 0, True, True, (-1, -1), 2),  # paged + leftpad (flash-attn refuses; fa2lab reads it)
]


@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("nq,n_new,page_size,batch_idx,leftpad,rotary_dim,interleaved,causal,window,hkv", KVCACHE)
def test_flash_attn_with_kvcache_float64(nq, n_new, page_size, batch_idx, leftpad, rotary_dim, interleaved, causal,
                                         window, hkv, num_splits):
    case, exp_k, exp_v = make_cache_case(nq=nq, n_new=n_new, page_size=page_size, batch_idx=batch_idx,
                                         leftpad=leftpad, rotary_dim=rotary_dim, hkv=hkv, nmax=300 if page_size == 256 else 80)
    seqlens_before = case["cache_seqlens"].clone()
    k_cache_before = case["k_cache"].clone()
    out, lse = flash_attn_with_kvcache(**case, causal=causal, window_size=window, rotary_interleaved=interleaved,
                                       num_splits=num_splits, return_softmax_lse=True)
    truth, lse_t = cache_reference(case, exp_k, exp_v, causal=causal, window=window, interleaved=interleaved)
    assert out.shape == case["q"].shape and out.is_contiguous() and lse.shape == (3, 4, nq)
    assert err(out, truth) < 1e-12 and err(lse, lse_t) < 1e-12
    assert torch.equal(case["cache_seqlens"], seqlens_before)  # not advanced
    got_k, got_v = written_cache(case, exp_k.shape)
    assert torch.equal(got_k, exp_k) and torch.equal(got_v, exp_v)
    # nothing outside the appended slots changed: count the entries that differ from before
    changed = (case["k_cache"] != k_cache_before).any(-1).any(-1).sum().item()
    assert changed <= 3 * n_new


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("page_size,rotary_dim,interleaved", [(None, 32, True), (16, 16, False), (None, 0, True)])
def test_flash_attn_with_kvcache_low_precision(dtype, page_size, rotary_dim, interleaved):
    case, exp_k, exp_v = make_cache_case(nq=2, n_new=2, page_size=page_size, rotary_dim=rotary_dim, leftpad=True,
                                         dtype=dtype, nmax=120, seed=3)
    out = flash_attn_with_kvcache(**case, causal=True, rotary_interleaved=interleaved)
    cache_reference(case, exp_k, exp_v, causal=True, window=(-1, -1), interleaved=interleaved)  # appends to exp_*
    got_k, got_v = written_cache(case, exp_k.shape)
    torch.testing.assert_close(got_k, exp_k)  # rotated in fp32 vs fp64, each rounded once to dtype
    assert torch.equal(got_v, exp_v)
    # Attention judged on the cache as written: truth in float64, plain PyTorch in dtype.
    q_ro = case["q"]
    if rotary_dim:
        q_ro = ref_rotary(q_ro, case["rotary_cos"], case["rotary_sin"],
                          case["cache_seqlens"].long()[:, None] + torch.arange(2), interleaved)
    lp = case["cache_leftpad"].long()
    for s in range(3):
        keys = slice(lp[s], case["cache_seqlens"][s] + 2)
        truth, _ = ref_attention(q_ro[s:s + 1].double(), got_k[s:s + 1, keys].double(), got_v[s:s + 1, keys].double(),
                                 causal=True)
        naive, _ = ref_attention(q_ro[s:s + 1], got_k[s:s + 1, keys], got_v[s:s + 1, keys], causal=True, upcast=False)
        within_rule(out[s:s + 1], truth, naive, dtype)


def test_kvcache_int_seqlens_and_full_cache():
    case, exp_k, exp_v = make_cache_case(n_new=0, nq=2)
    q, kc, vc = case["q"], case["k_cache"], case["v_cache"]
    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=37, causal=True)
    truth, _ = ref_attention(q, kc[:, :37], vc[:, :37], causal=True)
    assert err(out, truth) < 1e-12
    out = flash_attn_with_kvcache(q, kc, vc)  # cache_seqlens=None: the whole cache, not causal
    assert err(out, ref_attention(q, kc, vc)[0]) < 1e-12


def test_kvcache_leftpad_on_a_cache_in_head_major_memory():
    """A (B, Nmax, Hkv, D) view of (B, Hkv, Nmax, D) memory: leftpad's one-token pages need a copy
    to read from; the append must still land in the caller's tensor."""
    case, exp_k, exp_v = make_cache_case(nq=2, n_new=2, leftpad=True, hkv=2)
    case["k_cache"] = case["k_cache"].transpose(1, 2).contiguous().transpose(1, 2)
    case["v_cache"] = case["v_cache"].transpose(1, 2).contiguous().transpose(1, 2)
    out = flash_attn_with_kvcache(**case, causal=True)
    truth, _ = cache_reference(case, exp_k, exp_v, causal=True, window=(-1, -1), interleaved=True)
    assert err(out, truth) < 1e-12
    got_k, got_v = written_cache(case, exp_k.shape)
    assert torch.equal(got_k, exp_k) and torch.equal(got_v, exp_v)


def test_kvcache_reads_views_of_the_callers_cache(monkeypatch):
    seen = []
    real = fa2lab.decode_attention

    def spy(q, k_cache, v_cache, **kw):
        seen.append((k_cache.untyped_storage().data_ptr(), kw["num_splits"]))
        return real(q, k_cache, v_cache, **kw)

    monkeypatch.setattr(fa2lab, "decode_attention", spy)
    for opts in (dict(), dict(batch_idx=True), dict(leftpad=True), dict(page_size=16), dict(page_size=16, leftpad=True)):
        case, _, _ = make_cache_case(**opts)
        flash_attn_with_kvcache(**case, causal=True)
        assert seen[-1] == (case["k_cache"].untyped_storage().data_ptr(), None), opts  # num_splits 0: automatic
    flash_attn_with_kvcache(**case, num_splits=3)
    assert seen[-1][1] == 3


def test_kvcache_refuses_before_writing():
    case, _, _ = make_cache_case(n_new=3)
    before = case["k_cache"].clone()
    bad = dict(case, cache_seqlens=torch.tensor([0, 5, 78], dtype=torch.int32))  # 78 + 3 > 80
    with pytest.raises(ValueError, match="allocate a longer cache"):
        flash_attn_with_kvcache(**bad)
    with pytest.raises(ValueError, match="num_splits"):
        flash_attn_with_kvcache(**case, num_splits=-1)
    with pytest.raises(ValueError, match="int32"):
        flash_attn_with_kvcache(**dict(case, cache_seqlens=case["cache_seqlens"].long()))
    rot, _, _ = make_cache_case(n_new=0, rotary_dim=16)
    with pytest.raises(ValueError, match="pass k and v"):
        flash_attn_with_kvcache(**rot)
    paged, _, _ = make_cache_case(n_new=1, page_size=16)
    with pytest.raises(ValueError, match="cache_batch_idx"):
        flash_attn_with_kvcache(**paged, cache_batch_idx=torch.zeros(3, dtype=torch.int32))
    assert torch.equal(case["k_cache"], before)


# Variants: passed on to fa2lab under flash-attn's keyword once fa2lab has them.
def _needs(fn, option):
    return pytest.mark.skipif(not accepts(fn, option), reason=f"fa2lab.{fn.__name__} has no {option!r} option yet "
                                                             f"(fa2lab's attention-variants work)")


def _missing(fn, option):
    return pytest.mark.skipif(accepts(fn, option), reason=f"fa2lab.{fn.__name__} has {option!r}")


@_needs(fa2lab.attention, "softcap")
def test_softcap_against_reference():
    q, k, v = rand(2, 50, 4, 32, seed=1, scale=3.0), rand(2, 70, 2, 32, seed=2), rand(2, 70, 2, 32, seed=3)
    out = flash_attn_func(q, k, v, causal=True, softcap=2.5)
    assert err(out, ref_attention(q, k, v, causal=True, softcap=2.5)[0]) < 1e-12


@_needs(fa2lab.attention, "alibi_slopes")
@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi_against_reference(per_batch):
    q, k, v = rand(2, 50, 4, 32, seed=1), rand(2, 70, 2, 32, seed=2), rand(2, 70, 2, 32, seed=3)
    slopes = torch.rand(2, 4, generator=torch.Generator().manual_seed(0)) * 0.3
    slopes = slopes if per_batch else slopes[0]
    for causal in (False, True):
        out = flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes)
        assert err(out, ref_attention(q, k, v, causal=causal, alibi_slopes=slopes)[0]) < 1e-12


@_needs(fa2lab.varlen_attention, "alibi_slopes")
def test_varlen_alibi_and_softcap_against_reference():
    lens_q, lens_k = [3, 40, 1], [10, 40, 5]
    q, k, v = rand(sum(lens_q), 4, 32, seed=1), rand(sum(lens_k), 2, 32, seed=2), rand(sum(lens_k), 2, 32, seed=3)
    slopes = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    out = flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), 40, 40, causal=True, alibi_slopes=slopes,
                                 softcap=1.5)
    for s, (a, b, c, e) in enumerate(zip(cu(lens_q), cu(lens_q)[1:], cu(lens_k), cu(lens_k)[1:])):
        truth, _ = ref_attention(q[a:b][None], k[c:e][None], v[c:e][None], causal=True, alibi_slopes=slopes[s:s + 1],
                                 softcap=1.5)
        assert err(out[a:b], truth[0]) < 1e-12


@_needs(fa2lab.decode_attention, "alibi_slopes")
def test_kvcache_alibi_and_softcap_against_reference():
    case, exp_k, exp_v = make_cache_case(nq=2, n_new=1, leftpad=True)
    slopes = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    out = flash_attn_with_kvcache(**case, causal=True, alibi_slopes=slopes, softcap=1.5)
    lp, seqlens = case["cache_leftpad"].long(), case["cache_seqlens"].long()
    cache_reference(case, exp_k, exp_v, causal=True, window=(-1, -1), interleaved=True)  # appends to exp_*
    for s in range(3):
        keys = slice(lp[s], seqlens[s] + 1)
        truth, _ = ref_attention(case["q"][s:s + 1], exp_k[s:s + 1, keys], exp_v[s:s + 1, keys], causal=True,
                                 alibi_slopes=slopes[s:s + 1], softcap=1.5)
        assert err(out[s:s + 1], truth) < 1e-12


@_needs(fa2lab.attention, "dropout_p")
def test_dropout_is_unbiased_and_returns_no_probability_matrix():
    q, k, v = rand(1, 8, 2, 16, seed=1), rand(1, 12, 2, 16, seed=2), rand(1, 12, 2, 16, seed=3)
    plain = flash_attn_func(q, k, v)
    torch.manual_seed(0)
    runs = torch.stack([flash_attn_func(q, k, v, dropout_p=0.3) for _ in range(400)])
    assert not torch.equal(runs[0], plain) and not torch.equal(runs[0], runs[1])
    spread = runs.std(0) / math.sqrt(len(runs))
    assert ((runs.mean(0) - plain).abs() <= 5 * spread + 1e-6).all()
    assert flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True)[2] is None


@pytest.mark.parametrize("option,value", [("softcap", 2.0), ("alibi_slopes", torch.ones(2)), ("dropout_p", 0.1)])
def test_options_fa2lab_lacks_raise_not_implemented(option, value):
    if accepts(fa2lab.attention, option):
        pytest.skip(f"fa2lab.attention has {option!r}: the pass-through tests above run instead")
    q, k, v = rand(1, 8, 2, 16), rand(1, 8, 2, 16), rand(1, 8, 2, 16)
    with pytest.raises(NotImplementedError, match=option):
        flash_attn_func(q, k, v, **{option: value})


def test_kvcache_option_fa2lab_lacks_raises_before_writing():
    if accepts(fa2lab.decode_attention, "softcap"):
        pytest.skip("fa2lab.decode_attention has 'softcap'")
    case, _, _ = make_cache_case(n_new=1)
    before = case["k_cache"].clone()
    with pytest.raises(NotImplementedError, match="softcap"):
        flash_attn_with_kvcache(**case, softcap=3.0)
    assert torch.equal(case["k_cache"], before)


@pytest.mark.parametrize("backend", ["tiled", "reference", "sdpa"] + (["triton"] if HAS_TRITON else []))
def test_every_backend_through_the_dispatch_point(backend):
    q, k, v = rand(1, 33, 4, 40, seed=1), rand(1, 47, 2, 40, seed=2), rand(1, 47, 2, 40, seed=3)
    dt = torch.float32
    with use_backend(backend):
        out = flash_attn_func(q.to(dt), k.to(dt), v.to(dt), causal=backend != "sdpa")
    truth, _ = ref_attention(q, k, v, causal=backend != "sdpa")
    assert out.is_contiguous() and err(out, truth) < 1e-5
    if backend in ("tiled", "reference", "triton"):
        case, exp_k, exp_v = make_cache_case(nq=2, n_new=2, page_size=16, dtype=dt, nmax=48)
        with use_backend(backend):
            out = flash_attn_with_kvcache(**case, causal=True)
        truth, _ = cache_reference(case, exp_k.double(), exp_v.double(), causal=True, window=(-1, -1), interleaved=True)
        assert err(out, truth) < 1e-5
    with use_backend("nonsense"), pytest.raises(ValueError, match="nonsense"):
        flash_attn_func(q, k, v)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_forward_writes_the_flash_attn_layout():
    """A (B, N, H, D) input gets its output in (B, N, H, D) memory: the compat layer's transpose back is free."""
    from fa2lab.kernels.fwd import flash_fwd_triton

    q, k, v = (t.float() for t in (rand(1, 20, 2, 32), rand(1, 20, 2, 32), rand(1, 20, 2, 32)))
    out, _ = flash_fwd_triton(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.2, left=-1, right=0)
    assert out.transpose(1, 2).is_contiguous()
    assert err(out.transpose(1, 2), ref_attention(q, k, v, causal=True, scale=0.2)[0]) < 1e-5


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(), reason="interpreter check (triton, no CUDA)")
@pytest.mark.parametrize("host", [False, True])
def test_hopper_forward_writes_the_flash_attn_layout(host):
    """The sm_90 kernels (checked under the interpreter) write a (B, N, H, D) input's output in
    (B, N, H, D) memory too, through on-device and host descriptors."""
    from fa2lab.kernels.hopper_fwd import hopper_fwd

    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, **(dict(HOST_DESC=True, PERSISTENT=True) if host else {}))
    q, k, v = (t.half() for t in (rand(1, 20, 2, 32, seed=1), rand(1, 27, 1, 32, seed=2), rand(1, 27, 1, 32, seed=3)))
    out, _ = hopper_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.2, left=-1, right=0,
                        config=cfg)
    assert out.transpose(1, 2).is_contiguous()
    truth, _ = ref_attention(q, k, v, causal=True, scale=0.2)
    naive, _ = ref_attention(q, k, v, causal=True, scale=0.2, upcast=False)
    within_rule(out.transpose(1, 2), truth, naive, torch.float16)


@pytest.fixture
def no_flash_attn():
    if importlib.util.find_spec("flash_attn") is not None and "flash_attn" not in sys.modules:
        pytest.skip("the real flash-attn is installed here")
    saved = {n: sys.modules.pop(n) for n in ("flash_attn", "flash_attn.flash_attn_interface") if n in sys.modules}
    yield
    uninstall()
    sys.modules.update(saved)


def test_install_makes_import_flash_attn_resolve_here(no_flash_attn, caplog):
    import fa2lab.compat.flash_attn as compat

    with caplog.at_level(logging.INFO, logger="fa2lab"):
        install()
        install()  # idempotent
    import flash_attn
    from flash_attn.flash_attn_interface import flash_attn_func as f

    assert flash_attn is compat and f is flash_attn_func and flash_attn.__version__.startswith("2.8")
    assert sum("now resolves to fa2lab.compat.flash_attn" in r.message for r in caplog.records) == 1
    uninstall()
    assert "flash_attn" not in sys.modules


def test_install_refuses_when_the_real_flash_attn_is_installed(no_flash_attn, tmp_path, monkeypatch):
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("raise SystemExit('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="real flash-attn is installed"):
        install()
    assert "flash_attn" not in sys.modules
    monkeypatch.setitem(sys.modules, "flash_attn", type(sys)("flash_attn"))
    with pytest.raises(RuntimeError, match="already imported"):
        install()


def test_compat_benchmark_runs_its_three_calls(monkeypatch):
    """fa2lab.bench.compat at a tiny size on the CPU (its figures come from CUDA runs)."""
    import fa2lab.bench.compat as bench
    from fa2lab.measure.timing import median_seconds

    monkeypatch.setattr(bench, "_bench", lambda fn: median_seconds(fn, max_repeats=2, budget_s=0.01))
    row = bench.measure(64, 32, True, rounds=2, backward=True, dtype=torch.float32, tokens=128, device="cpu")
    assert set(row["seconds"]) == {"direct", "views", "compat"} and row["max_abs_diff_compat_vs_direct"] == 0.0
    assert row["b"] == 2 and row["h"] == 64 and row["compat_over_direct"] > 0


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_reaches_the_backward(monkeypatch, deterministic):
    """flash-attn's `deterministic=True` is recorded at the call and handed to the Triton backward,
    which on Hopper then keeps the two passes (fa2lab.determinism); outside the call nothing stays set."""
    import fa2lab.kernels.attention as KA
    from fa2lab.compat.flash_attn import flash_attn_func
    from fa2lab.compat.flash_attn import options as compat_options
    from fa2lab.determinism import deterministic_requested

    seen = []

    def recording_bwd(dout, dlse, q, k, v, out, lse, *, scale, left, right, deterministic=False):
        seen.append(deterministic)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    monkeypatch.setattr(KA, "_bwd_impl", lambda *a, **kw: recording_bwd)
    monkeypatch.setattr(compat_options, "current_backend", lambda: "triton")
    q, k, v = (torch.randn(1, 16, 2, 32, requires_grad=True) for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True, deterministic=deterministic)
    assert not deterministic_requested()
    out.sum().backward()
    assert seen == [deterministic]
