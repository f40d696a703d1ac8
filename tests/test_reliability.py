"""Reliability: no silent wrong answers (integer inputs, silent casts, wrapped int64 lengths), and
nothing lost when a cache append or a decode step fails midway."""

from __future__ import annotations

import pytest
import torch

from fa2lab import merge_states, merge_states_stack
from fa2lab.kvcache import (DecodeSession, LowRankKVCache, PagedKVCache, QuantizedKVCache, SlidingWindowKVCache,
                            StaticKVCache)
from fa2lab.kvcache.base import check_append
from fa2lab.reference import attention_ref

B, HKV, HQ, D = 2, 2, 4, 8


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def snapshot(obj) -> dict:
    return {k: v.clone() for k, v in vars(obj).items() if isinstance(v, torch.Tensor)}


def assert_same(before: dict, obj) -> None:
    for name, t in before.items():
        assert torch.equal(t, getattr(obj, name)), f"{name} changed"


def make(kind, dtype=torch.float32):
    if kind == "static":
        return StaticKVCache(B, HKV, 16, D, dtype=dtype)
    if kind == "window":
        return SlidingWindowKVCache(B, HKV, 4, D, max_new_tokens=2, dtype=dtype)
    if kind == "int8":
        return QuantizedKVCache(B, HKV, 16, D, dtype=dtype)
    cache = LowRankKVCache(B, HKV, 16, D, rank=D, dtype=dtype)
    cache.fit(rand(B, HKV, 8, D, seed=9), rand(B, HKV, 8, D, seed=10))
    return cache


KINDS = ["static", "window", "int8", "lowrank"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qdtype", [torch.int32, torch.int64, torch.int8, torch.bool])
def test_every_cache_refuses_an_integer_query(kind, qdtype):
    cache = make(kind)
    cache.append(rand(B, HKV, 2, D, seed=1), rand(B, HKV, 2, D, seed=2))
    q = (rand(B, HQ, 1, D, seed=3) * 4).to(qdtype)
    with pytest.raises(ValueError, match=f"expected q to be float16, bfloat16, float32 or float64, got {qdtype}"):
        cache.attend(q)


def test_paged_cache_and_session_refuse_integer_inputs():
    cache = PagedKVCache(4, 4, HKV, D, dtype=torch.float32)
    cache.add_sequence(0)
    cache.append(0, rand(HKV, 3, D, seed=1), rand(HKV, 3, D, seed=2))
    with pytest.raises(ValueError, match="expected q to be float16"):
        cache.attend(torch.ones(1, HQ, 1, D, dtype=torch.int32), [0])
    s = DecodeSession(B, HQ, HKV, 8, D, dtype=torch.float32).init()
    good = (rand(B, HQ, 1, D), rand(B, HKV, 1, D), rand(B, HKV, 1, D))
    for i, name in enumerate("qkv"):
        bad = list(good)
        bad[i] = torch.ones_like(good[i], dtype=torch.int64)
        with pytest.raises(ValueError, match=f"expected {name} to be float16"):
            s.load_qkv(*bad)
    assert s.state == "ready"


@pytest.mark.parametrize("kind", [*KINDS, "paged"])
@pytest.mark.parametrize("given", [torch.float32, torch.float64, torch.bfloat16])
def test_one_dtype_policy_for_every_cache(kind, given):
    """K/V in another dtype than the cache's are refused, naming the cast (no silent overflow:
    1e5 in float32 is inf in float16)."""
    k, v = rand(B, HKV, 2, D, seed=1, dtype=given) * 1e5, rand(B, HKV, 2, D, seed=2, dtype=given)
    if kind == "paged":
        cache = PagedKVCache(4, 4, HKV, D, dtype=torch.float16)
        cache.add_sequence(0)
        before = snapshot(cache)
        with pytest.raises(ValueError, match=rf"expected k in the cache's dtype torch.float16, got {given}; "
                                             r"convert it with k.to\(torch.float16\)"):
            cache.append(0, k[0], v[0])
        assert cache.lengths[0] == 0 and len(cache.free_pages) == 4
    else:
        cache = make(kind, torch.float16)
        before = snapshot(cache)
        with pytest.raises(ValueError, match=rf"expected k in the cache's dtype torch.float16, got {given}"):
            cache.append(k, v)
    assert_same(before, cache)


@pytest.mark.parametrize("cls", [StaticKVCache, PagedKVCache, SlidingWindowKVCache, QuantizedKVCache])
def test_caches_refuse_an_integer_storage_dtype(cls):
    with pytest.raises(ValueError, match=r"dtype to be one of torch.float16.*got torch.int32"):
        cls(2, 2, 4, 8, dtype=torch.int32)


def test_session_refuses_a_cast_too():
    s = DecodeSession(B, HQ, HKV, 8, D, dtype=torch.float16).init()
    with pytest.raises(ValueError, match=r"expected k in the session's dtype torch.float16, got torch.float32"):
        s.load_qkv(rand(B, HQ, 1, D).half(), rand(B, HKV, 1, D), rand(B, HKV, 1, D).half())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ldtype", [torch.int64, torch.int32])
def test_lengths_beyond_int32_do_not_wrap(kind, ldtype):
    cache = make(kind)
    before = snapshot(cache)
    big = 2**32 + 1 if ldtype == torch.int64 else 2**31 - 1  # int64 2**32 + 1 wrapped to 1 before
    with pytest.raises(ValueError, match="expected lengths in"):
        cache.append(rand(B, HKV, 2, D), rand(B, HKV, 2, D), lengths=torch.tensor([big, 1], dtype=ldtype))
    assert_same(before, cache)


def test_packed_offsets_beyond_int32_are_refused():
    from fa2lab.models.functional import packed_attention

    q = rand(3, 2, 8)
    cu = torch.tensor([0, 2**32 + 3], dtype=torch.int64)  # .to(int32) would read [0, 3]
    with pytest.raises(ValueError, match=r"cu_seqlens_q to fit in int32"):
        packed_attention(q, q, q, cu, cu)
    with pytest.raises(ValueError, match=r"integer tensor"):
        packed_attention(q, q, q, cu.float(), cu)


@pytest.mark.parametrize("which", range(4))
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_merge_states_refuses_integer_tensors(which, dtype):
    parts = [rand(2, 3, 4, seed=1), rand(2, 3, seed=2), rand(2, 3, 4, seed=3), rand(2, 3, seed=4)]
    parts[which] = (parts[which] * 3).to(dtype)
    with pytest.raises(ValueError, match="to be float16, bfloat16, float32 or float64"):
        merge_states(*parts)
    with pytest.raises(ValueError, match="to be float16"):
        merge_states_stack(torch.ones(2, 3, 4, dtype=torch.int32), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="expected out_a to be a floating"):
        merge_states([1.0], parts[1], parts[2], parts[3])


@pytest.mark.parametrize("dim", [3, -4, 1.0, True])
def test_merge_states_stack_refuses_a_bad_axis(dim):
    with pytest.raises(ValueError, match="expected dim to be an axis"):
        merge_states_stack(rand(2, 3, 5, 4), rand(2, 3, 5), dim=dim)


def test_check_append_lives_in_base_and_is_the_only_policy():
    from fa2lab.kvcache import lowrank, paged, quantized, static, window

    for mod in (static, paged, window, quantized, lowrank):
        assert mod.check_append is check_append, mod.__name__


# --- failure midway ---------------------------------------------------------------------------------------------

class Boom(Exception):
    pass


class FailAt:
    """Make the n-th tensor write (__setitem__, in-place add or copy_) raise, once."""

    def __init__(self, monkeypatch, n, exc=Boom):
        self.n, self.count, self.exc = n, 0, exc
        for name in ("__setitem__", "__iadd__", "add_", "copy_", "index_put_"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        def write(t, *args, **kwargs):
            self.count += 1
            if self.count == self.n:
                raise self.exc(f"write {self.n}")
            return original(t, *args, **kwargs)
        return write


def window_state(cache):
    """What a reader sees: every sequence's kept tokens in order."""
    r = cache.reader()
    n = int(cache.seqlens().max())
    k, v = r.read(0, n, torch.float64)
    return [(k[b, :, :int(cache.seqlens()[b])].clone(), v[b, :, :int(cache.seqlens()[b])].clone())
            for b in range(cache.batch)]


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_window_append_failing_at_any_write_leaves_every_sequence_as_it_was(monkeypatch, exc):
    ks, vs = rand(3, HKV, 12, D, seed=1, dtype=torch.float64), rand(3, HKV, 12, D, seed=2, dtype=torch.float64)
    steps = [(slice(0, 5), None), (slice(5, 7), torch.tensor([2, 1, 0])), (slice(7, 12), torch.tensor([5, 3, 4]))]

    def fresh(upto):
        cache = SlidingWindowKVCache(3, HKV, 3, D, max_new_tokens=2, dtype=torch.float64)
        for sl, lengths in steps[:upto]:
            cache.append(ks[:, :, sl], vs[:, :, sl], lengths)
        return cache

    for step in range(len(steps)):
        sl, lengths = steps[step]
        n = 1
        while True:
            cache = fresh(step)
            before, seen = snapshot(cache), window_state(cache)
            with monkeypatch.context() as m:
                FailAt(m, n, exc)
                try:
                    cache.append(ks[:, :, sl], vs[:, :, sl], lengths)
                    failed = False
                except (Boom, KeyboardInterrupt):
                    failed = True
            if not failed:
                break  # n passed the number of writes: every one was tried
            assert_same(before, cache)
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(seen, window_state(cache)))
            # and the same append still works afterwards, giving what a clean cache gives
            cache.append(ks[:, :, sl], vs[:, :, sl], lengths)
            ref = fresh(step + 1)
            assert_same(snapshot(ref), cache)
            n += 1
        assert n > 3, "the injection reached no write"


def test_decode_session_options_are_checked_by_the_constructor():
    bad = [dict(num_splits=0), dict(num_splits=1.5), dict(backend="bogus"), dict(window_size=(-5, 0)),
           dict(window_size=(1.5, 0)), dict(softmax_scale=float("nan")), dict(softmax_scale="x"),
           dict(return_lse=True), dict(causal="yes"), dict(unified_max=float("inf")), dict(spilts=2),
           dict(backend="triton", unified_max=1.0), dict(backend="sdpa")]
    for options in bad:
        with pytest.raises(ValueError):
            DecodeSession(B, HQ, HKV, 8, D, dtype=torch.float32, **options)
    for shape in [(0, HQ, HKV, 8, D), (B, 3, 2, 8, D), (B, HQ, HKV, -1, D), (B, HQ, HKV, 8, 2.0)]:
        with pytest.raises(ValueError, match="expected"):
            DecodeSession(*shape, dtype=torch.float32)
    with pytest.raises(ValueError, match="expected dtype"):
        DecodeSession(B, HQ, HKV, 8, D, dtype=torch.int32)
    with pytest.raises(ValueError, match="expected a device"):
        DecodeSession(B, HQ, HKV, 8, D, device="gpu0")


def test_a_failed_decode_leaves_the_session_as_it_was_and_can_be_retried(monkeypatch):
    steps = [(rand(B, HQ, 1, D, seed=3 * t), rand(B, HKV, 1, D, seed=3 * t + 1), rand(B, HKV, 1, D, seed=3 * t + 2))
             for t in range(4)]
    clean = DecodeSession(B, HQ, HKV, 8, D, dtype=torch.float32, num_splits=2).init()
    want = []
    for step in steps:
        clean.load_qkv(*step)
        clean.decode()
        want.append(clean.get_output().clone())
    s = DecodeSession(B, HQ, HKV, 8, D, dtype=torch.float32, num_splits=2).init()
    for t, step in enumerate(steps):
        s.load_qkv(*step)
        before = s.seqlens.clone()
        calls = {"n": 0}
        attend = type(s.cache).attend

        def failing(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 1:
                raise MemoryError("injected")
            return attend(self, *a, **kw)

        with monkeypatch.context() as m:
            m.setattr(type(s.cache), "attend", failing)
            with pytest.raises(MemoryError):
                s.decode()
            assert s.state == "loaded" and torch.equal(s.seqlens, before) and s.steps == t
            s.decode()  # the same call again: one token appended, not two
        assert s.seqlens.tolist() == [t + 1] * B
        torch.testing.assert_close(s.get_output(), want[t], rtol=0, atol=0)
    # an output the reference agrees with, all the way through
    qs = torch.cat([st[0] for st in steps], 2)
    ks, vs = torch.cat([st[1] for st in steps], 2), torch.cat([st[2] for st in steps], 2)
    ref = attention_ref(qs[:, :, -1:].double(), ks.double(), vs.double(), causal=True)
    torch.testing.assert_close(want[-1].double(), ref, rtol=1e-5, atol=1e-5)


def test_a_loaded_step_can_be_replaced():
    s = DecodeSession(1, 1, 1, 4, 4, dtype=torch.float32).init()
    s.load_qkv(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
    s.load_qkv(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), 2 * torch.ones(1, 1, 1, 4))
    s.decode()
    assert torch.equal(s.get_output(), 2 * torch.ones(1, 1, 1, 4))


def test_every_guarantee_in_the_readme_names_a_test_that_exists():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    section = root.joinpath("README.md").read_text().split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    named, current = [], None
    for m in re.finditer(r"`(?:(test_\w+\.py))?::(test_\w+)`", section):
        current = m.group(1) or current
        named.append((current, m.group(2)))
    assert len(named) >= 20
    for file, test in named:
        assert f"def {test}(" in (root / "tests" / file).read_text(), f"{file}::{test} does not exist"
