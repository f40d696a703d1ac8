"""Static and paged KV caches and the decode session: results, life cycle, and failed calls
that leave every byte of the cache as it was."""

import pytest
import torch
from helpers import max_err

from fa2lab import decode_attention
from fa2lab.kvcache import DecodeSession, PagedKVCache, StaticKVCache
from fa2lab.reference import attention_ref


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _snapshot(cache):
    return {name: t.clone() for name, t in vars(cache).items() if isinstance(t, torch.Tensor)}


def _same(snapshot, cache):
    return all(torch.equal(t, getattr(cache, name)) or (t.isnan() == getattr(cache, name).isnan()).all()
               for name, t in snapshot.items())


def test_static_cache_ragged_appends_match_reference():
    cache = StaticKVCache(3, 2, 64, 16, dtype=torch.float64)
    ks, vs = _rand(3, 2, 40, 16, seed=1), _rand(3, 2, 40, 16, seed=2)
    cache.append(ks[:, :, :10], vs[:, :, :10], lengths=torch.tensor([10, 3, 0]))
    cache.append(ks[:, :, 10:11], vs[:, :, 10:11])  # one decode step for everyone
    assert cache.seqlens().tolist() == [11, 4, 1]
    q = _rand(3, 4, 1, 16, seed=3)
    out = cache.attend(q, num_splits=2)
    for b, idx in enumerate([list(range(11)), [0, 1, 2, 10], [10]]):
        ref = attention_ref(q[b:b + 1], ks[b:b + 1, :, idx], vs[b:b + 1, :, idx], causal=True)
        assert max_err(out[b:b + 1], ref) < 1e-12


def test_static_cache_overflow_changes_nothing():
    cache = StaticKVCache(2, 1, 8, 4, dtype=torch.float32)
    cache.append(torch.ones(2, 1, 6, 4), torch.ones(2, 1, 6, 4), lengths=torch.tensor([6, 2]))
    before = _snapshot(cache)
    with pytest.raises(ValueError, match="sequence 0 would grow to 9 tokens, past max_len=8"):
        cache.append(torch.full((2, 1, 3, 4), 7.0), torch.full((2, 1, 3, 4), 7.0))
    with pytest.raises(ValueError, match=r"expected k of shape \(B=2, Hkv=1, n, D=4\)"):
        cache.append(torch.ones(2, 1, 1, 5), torch.ones(2, 1, 1, 4))
    assert _same(before, cache)


def test_paged_cache_grows_frees_and_reuses_pages():
    cache = PagedKVCache(num_pages=6, page_size=4, heads_kv=2, head_dim=8, dtype=torch.float64)
    data = {s: (_rand(2, n, 8, seed=i), _rand(2, n, 8, seed=i + 10)) for i, (s, n) in enumerate((("a", 9), ("b", 5)))}
    for s in data:
        cache.add_sequence(s)
    for t in range(9):  # grow token by token, interleaved
        for s, (k, v) in data.items():
            if t < k.shape[1]:
                cache.append(s, k[:, t:t + 1], v[:, t:t + 1])
    assert cache.used_pages() == 3 + 2 and cache.lengths == {"a": 9, "b": 5}
    q = _rand(2, 4, 1, 8, seed=99)
    out = cache.attend(q, ["a", "b"])
    for i, s in enumerate(["a", "b"]):
        k, v = data[s]
        assert max_err(out[i:i + 1], attention_ref(q[i:i + 1], k[None], v[None], causal=True)) < 1e-12
    pages_a = list(cache.pages["a"])
    cache.free("a")
    assert cache.used_pages() == 2
    cache.add_sequence("c")
    cache.append("c", *(_rand(2, 12, 8, seed=5),) * 2)
    assert sorted(cache.pages["c"]) == sorted(pages_a)  # freed pages are handed out again
    out_b = cache.attend(q[1:], ["b"])
    assert max_err(out_b, out[1:]) < 1e-12  # b is untouched by a's and c's page traffic


def test_paged_cache_exhausted_pool_and_unknown_ids_change_nothing():
    cache = PagedKVCache(num_pages=3, page_size=2, heads_kv=1, head_dim=4, dtype=torch.float32)
    cache.add_sequence(0)
    cache.append(0, torch.ones(1, 3, 4), torch.ones(1, 3, 4))
    before, free_before, pages_before = _snapshot(cache), list(cache.free_pages), {0: list(cache.pages[0])}
    with pytest.raises(RuntimeError, match="page pool exhausted: sequence 0 needs 2 more pages"):
        cache.append(0, torch.ones(1, 4, 4), torch.ones(1, 4, 4))
    with pytest.raises(KeyError, match="unknown sequence 7"):
        cache.append(7, torch.ones(1, 1, 4), torch.ones(1, 1, 4))
    with pytest.raises(ValueError, match="already exists"):
        cache.add_sequence(0)
    assert _same(before, cache) and cache.free_pages == free_before and cache.pages == pages_before
    assert cache.lengths == {0: 3}


def test_paged_cache_agrees_with_decode_attention_on_its_table():
    cache = PagedKVCache(num_pages=40, page_size=16, heads_kv=2, head_dim=8, dtype=torch.float64)
    for s, n in enumerate([1, 54, 97]):
        cache.add_sequence(s)
        cache.append(s, _rand(2, n, 8, seed=s), _rand(2, n, 8, seed=s + 5))
    table, seqlens = cache.block_table([0, 1, 2])
    q = _rand(3, 8, 4, 8, seed=7)
    a = cache.attend(q, [0, 1, 2], num_splits=3)
    b = decode_attention(q, cache.k_pages, cache.v_pages, cache_seqlens=seqlens, block_table=table,
                         backend="reference")
    assert max_err(a, b) < 1e-12


def test_decode_session_life_cycle():
    s = DecodeSession(2, 4, 2, max_len=8, head_dim=16, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"load_qkv\(\) called in state 'created'; expected one of init\(\)"):
        s.load_qkv(torch.randn(2, 4, 1, 16), torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
    s.init()
    ks, vs, qs = _rand(2, 2, 8, 16, seed=1).float(), _rand(2, 2, 8, 16, seed=2).float(), _rand(2, 4, 8, 16, seed=3).float()
    buffer = None
    for t in range(3):
        s.load_qkv(qs[:, :, t:t + 1], ks[:, :, t:t + 1], vs[:, :, t:t + 1])
        with pytest.raises(RuntimeError, match="expected one of decode"):
            s.get_output()
        s.decode()
        out = s.get_output()
        buffer = buffer if buffer is not None else out
        assert out.data_ptr() == buffer.data_ptr() and out.dtype == torch.float32  # persistent buffer
        assert s.seqlens.tolist() == [t + 1, t + 1]  # decode advanced the length
        ref = attention_ref(qs[:, :, t:t + 1], ks[:, :, :t + 1], vs[:, :, :t + 1], causal=True)
        assert max_err(out, ref) < 1e-5
    k_ptr = s.cache.k.data_ptr()
    s.reset()
    assert s.seqlens.tolist() == [0, 0] and s.cache.k.data_ptr() == k_ptr  # buffers kept
    s.close()
    with pytest.raises(RuntimeError, match="the session is closed"):
        s.init()


def test_decode_session_full_cache_keeps_state():
    s = DecodeSession(1, 1, 1, max_len=1, head_dim=4, dtype=torch.float32).init()
    step = (torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))
    s.load_qkv(*step)
    s.decode()
    s.get_output()
    s.load_qkv(*step)
    with pytest.raises(ValueError, match="past max_len=1"):
        s.decode()
    assert s.state == "loaded" and s.seqlens.tolist() == [1]
