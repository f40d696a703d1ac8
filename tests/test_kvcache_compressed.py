"""Sliding-window, int8 and low-rank KV caches: each against float64 attention on what it stands
for, their memory, and error paths that leave the cache byte for byte as it was."""

import math

import pytest
import torch

from fa2lab.bench.kvmemory import cache_tradeoffs, decaying_spectrum_tokens, format_table
from fa2lab.decode import decode_attention
from fa2lab.kvcache.lowrank import LowRankKVCache
from fa2lab.kvcache.quantized import QuantizedKVCache, dequantize, quantize
from fa2lab.kvcache.static import StaticKVCache
from fa2lab.kvcache.window import SlidingWindowKVCache
from fa2lab.reference import attention_ref

F64 = torch.float64


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def snapshot(cache) -> dict:
    """Every tensor the cache holds, as raw bytes."""
    return {name: t.detach().clone().reshape(-1).view(torch.uint8)
            for name, t in vars(cache).items() if isinstance(t, torch.Tensor)}


def assert_same_bytes(before: dict, cache) -> None:
    after = snapshot(cache)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed after a failed call"


# Sliding window ---------------------------------------------------------------------------------

@pytest.mark.parametrize("window, max_new, steps, num_splits", [
    # (window, max_new_tokens, [(n, lengths per sequence)], num_splits): ragged prefill, then steps
    # of 1 and of several tokens; the second case's ring (C = 522) spans two 512-key tiles.
    (37, 4, [(50, [50, 3, 0])] + [(1, [1, 1, 1])] * 30 + [(4, [4, 2, 4])] * 9, (1,)),
    (520, 3, [(97, [97, 60, 97])] * 12 + [(3, [3, 1, 2])] * 5 + [(1, [1, 1, 1])] * 3, (1, 2)),
])
def test_window_equals_full_cache_with_window(window, max_new, steps, num_splits):
    b, hq, hkv, d = 3, 4, 2, 8
    total = sum(n for n, _ in steps)
    win = SlidingWindowKVCache(b, hkv, window, d, max_new_tokens=max_new, dtype=F64)
    full = StaticKVCache(b, hkv, total, d, dtype=F64)
    checks = 0
    for i, (n, lengths) in enumerate(steps):
        k, v = randn(b, hkv, n, d, seed=2 * i), randn(b, hkv, n, d, seed=2 * i + 1)
        lengths = torch.tensor(lengths, dtype=torch.int32)
        win.append(k, v, lengths)
        full.append(k, v, lengths)
        if i % 7 and i != len(steps) - 1:
            continue
        checks += 1
        seen = full.lengths.long()
        assert torch.equal(win.seqlens(), seen.clamp(max=win.capacity).to(torch.int32))
        k_all, _ = win.reader().read(0, win.capacity, F64)  # (B, Hkv, C, D), oldest first
        for s in range(b):
            kept = min(int(seen[s]), win.capacity)
            assert torch.equal(k_all[s, :, :kept], full.k[s, :, int(seen[s]) - kept:int(seen[s])])
        for nq in sorted({1, max_new}):
            q = randn(b, hq, nq, d, seed=1000 + i)
            for splits in num_splits:
                ours = win.attend(q, num_splits=splits)
                truth = decode_attention(q, full.k, full.v, cache_seqlens=full.lengths, causal=True,
                                         window_size=(window - 1, 0), backend="reference")
                torch.testing.assert_close(ours, truth, rtol=0, atol=1e-12)
    assert checks >= 3 and int(full.lengths.max()) > 2 * win.capacity  # the ring wrapped, more than once


def test_window_memory_is_bounded_and_attend_refuses_what_it_cannot_see():
    b, hkv, w, d = 2, 2, 16, 8
    cache = SlidingWindowKVCache(b, hkv, w, d, max_new_tokens=2, dtype=torch.float32)
    empty = cache.memory_bytes()
    assert empty == 2 * b * hkv * (w + 1) * d * 4  # K and V, C = w + 2 - 1 slots
    for i in range(10):
        cache.append(randn(b, hkv, 13, d, seed=i).float(), randn(b, hkv, 13, d, seed=50 + i).float())
    assert cache.memory_bytes() == empty and int(cache.total[0]) == 130
    q = randn(b, 4, 3, d, seed=0).float()
    with pytest.raises(ValueError, match=r"max_new_tokens=2.*Nq=3"):
        cache.attend(q)
    with pytest.raises(ValueError, match=r"left in \[0, 15\].*got 16"):
        cache.attend(q[:, :, :1], window_size=(16, 0))
    with pytest.raises(ValueError, match=r"got -1"):
        cache.attend(q[:, :, :1], window_size=(-1, 0))


# int8 -------------------------------------------------------------------------------------------

def test_quantized_per_request_error_bounded_by_the_int8_step():
    b, hq, hkv, d, n = 3, 8, 2, 64, 300
    k, v = randn(b, hkv, n, d, seed=1, scale=2.0), randn(b, hkv, n, d, seed=2)  # peaked attention
    q = randn(b, hq, 1, d, seed=3)
    lens = [300, 97, 1]
    cache = QuantizedKVCache(b, hkv, n, d, dtype=F64)
    cache.append(k[:, :, :200], v[:, :, :200], torch.tensor([200, 97, 1]))
    cache.append(k[:, :, 200:], v[:, :, 200:], torch.tensor([100, 0, 0]))
    out = cache.attend(q)

    k_q, s_k = quantize(k)  # what the cache must hold: (B, Hkv, n, D) int8, (B, Hkv, n, 1) float32
    v_q, s_v = quantize(v)
    k_hat, v_hat = dequantize(k_q, s_k, F64), dequantize(v_q, s_v, F64)
    # Per element, off by at most half a step of its own token (float64 round-off aside).
    for x, x_hat, step in ((k, k_hat, s_k), (v, v_hat, s_v)):
        assert bool(((x_hat - x).abs() <= step * (0.5 + 1e-9)).all())
    reader_k, reader_v = cache.reader().read(0, n, F64)
    assert torch.equal(reader_k[0], k_hat[0]) and torch.equal(reader_v[0], v_hat[0])

    scale = d ** -0.5
    for s, m in enumerate(lens):  # each request against a single-request float64 reference
        sl = (slice(s, s + 1), slice(None), slice(0, m))
        # The decode is exact on what is stored: attention on the dequantised K/V.
        torch.testing.assert_close(out[s:s + 1], attention_ref(q[s:s + 1], k_hat[sl], v_hat[sl], causal=True),
                                   rtol=0, atol=1e-12)
        err = (out[s:s + 1] - attention_ref(q[s:s + 1], k[sl], v[sl], causal=True)).abs().max().item()
        step_v, step_k = s_v[sl].max().item(), s_k[sl].max().item()
        # Rigorous: V's error is a convex combination of errors <= step_v / 2; K's moves each logit
        # by at most eps = scale * |q|_1 * step_k / 2, which moves the softmax weights by a factor
        # within exp(+-2 eps).
        eps = scale * q[s].abs().sum(-1).max().item() * step_k / 2
        assert err <= step_v / 2 + math.expm1(2 * eps) * v[sl].abs().max().item()
        # Asserted tight bound, one int8 step of V: rounding errors have random signs, so K's term
        # is ~ scale * |q|_2 * step_k / sqrt(12) per logit, well under V's worst case here.
        assert err <= step_v, (s, err, step_v)
    # One key: softmax weight exactly 1, so the output is that key's v_hat (B=2 has length 1).
    assert torch.equal(out[2], v_hat[2, :, :1].repeat_interleave(hq // hkv, 0))


def test_quantized_memory_ratio_against_fp16_static():
    b, hkv, n = 2, 4, 64
    for d in (64, 80, 128):
        q8 = QuantizedKVCache(b, hkv, n, d)
        fp16 = StaticKVCache(b, hkv, n, d, dtype=torch.float16)
        assert q8.memory_bytes() / fp16.memory_bytes() == (d + 4) / (2 * d)  # int8 + float32 scale vs 2 bytes
        assert q8.bytes_per_token() == hkv * 2 * (d + 4)


def test_quantize_handles_zero_and_extreme_tokens():
    x = torch.zeros(2, 1, 3, 8, dtype=torch.float16)
    x[0, 0, 1] = 65504.0  # float16 max: fine with a float32 scale
    x[0, 0, 2, 0] = -1e-7  # subnormal in float16
    x_q, s = quantize(x)
    assert int(x_q.abs().max()) == 127 and float(s[0, 0, 0]) == 0.0 and bool((x_q[0, 0, 0] == 0).all())
    assert torch.equal(dequantize(x_q, s, torch.float32)[0, 0, 1], x[0, 0, 1].float())
    assert math.isclose(float(dequantize(x_q, s, torch.float32)[0, 0, 2, 0]), float(x[0, 0, 2, 0]), rel_tol=1e-6)


# Low rank ---------------------------------------------------------------------------------------

def test_lowrank_full_rank_is_exact_and_error_falls_with_rank():
    b, hq, hkv, d, n, calib = 2, 4, 2, 32, 400, 128
    # A decaying spectrum (singular values 0.85^i, 0.9^i, plus noise): a rank-r basis keeps most
    # but not all of each token, more as r grows.
    k = decaying_spectrum_tokens(b, hkv, n, d, decay=0.85, noise=1e-3, seed=10)
    v = decaying_spectrum_tokens(b, hkv, n, d, decay=0.9, noise=1e-3, seed=20)
    q = randn(b, hq, 2, d, seed=30, scale=2.0)
    truth = attention_ref(q, k, v, causal=True)
    errors = []
    for rank in (2, 6, 16, d):
        cache = LowRankKVCache(b, hkv, n, d, rank, dtype=F64)
        cache.fit(k[:, :, :calib], v[:, :, :calib])  # the prompt as calibration prefix
        cache.append(k[:, :, :250], v[:, :, :250])
        cache.append(k[:, :, 250:], v[:, :, 250:])
        errors.append((cache.attend(q) - truth).abs().max().item())
        assert cache.bytes_per_token() == hkv * 2 * rank * 8  # vs hkv * 2 * d * 8 for a float64 static cache
        assert cache.memory_bytes() == b * n * cache.bytes_per_token() + 2 * hkv * d * rank * 8
    assert errors[-1] < 1e-12, errors  # rank = D: an orthonormal basis, projection and back is exact
    assert all(a > b_ for a, b_ in zip(errors, errors[1:])) and errors[2] < errors[0] / 2, errors


def test_lowrank_fit_rules():
    b, hkv, d = 2, 2, 8
    cache = LowRankKVCache(b, hkv, 16, d, 4, dtype=torch.float32)
    k = randn(b, hkv, 3, d, seed=0).float()
    with pytest.raises(ValueError, match=r"call fit\(k_calib, v_calib\)"):
        cache.append(k, k)
    with pytest.raises(ValueError, match=r"at least rank=4 calibration tokens.*got 1\*3"):
        cache.fit(k[:1], k[:1])
    cache.fit(k[:, :, :2], k)  # B' = 2 sequences of 2 tokens: 4 per head, enough
    cache.append(k, k)
    with pytest.raises(ValueError, match=r"6 tokens stored.*reset\(\)"):
        cache.fit(k, k)
    with pytest.raises(ValueError, match=r"rank in \[1, min\(head_dim, head_dim_v\)\] = \[1, 8\], got 9"):
        LowRankKVCache(b, hkv, 16, d, 9)
    cache.reset()
    cache.fit(k, k)  # allowed again once empty


# Error paths: clear messages, nothing written --------------------------------------------------

B, HKV, D, CAP = 2, 2, 8, 10


def _filled(kind):
    if kind == "window":
        cache = SlidingWindowKVCache(B, HKV, 6, D, max_new_tokens=2, dtype=torch.float32)
    elif kind == "quantized":
        cache = QuantizedKVCache(B, HKV, CAP, D, dtype=torch.float32)
    else:
        cache = LowRankKVCache(B, HKV, CAP, D, 3, dtype=torch.float32)
        cache.fit(randn(1, HKV, 8, D, seed=5), randn(1, HKV, 8, D, seed=6))
    cache.append(randn(B, HKV, 8, D, seed=7).float(), randn(B, HKV, 8, D, seed=8).float(), torch.tensor([8, 5]))
    return cache


def _tok(n, d=D, heads=HKV, batch=B, dtype=torch.float32, seed=9):
    return randn(batch, heads, n, d, seed=seed).to(dtype)


BAD_APPENDS = [
    # (name, kinds it applies to, args, message pattern)
    ("past capacity", ("quantized", "lowrank"), lambda: (_tok(3), _tok(3)), r"sequence 0 would grow to 11 tokens, "
     r"past max_len=10 \(it holds 8, this step adds 3\); allocate a larger cache"),
    ("wrong D", "all", lambda: (_tok(1, d=D + 1), _tok(1)),
     r"expected k of shape \(B=2, Hkv=2, n, D=8\), got \(2, 2, 1, 9\)"),
    ("wrong Hkv", "all", lambda: (_tok(1), _tok(1, heads=1)), r"expected v of shape \(B=2, Hkv=2"),
    ("wrong batch", "all", lambda: (_tok(1, batch=3), _tok(1, batch=3)), r"expected k of shape \(B=2"),
    ("3-d k", "all", lambda: (_tok(1)[0], _tok(1)), r"got \(2, 1, 8\)"),
    ("k and v counts", "all", lambda: (_tok(2), _tok(1)), r"same number of tokens, got 2 and 1"),
    ("wrong dtype", "all", lambda: (_tok(1, dtype=F64), _tok(1, dtype=F64)),
     r"cache's dtype torch.float32, got torch.float64; convert it with k.to\(torch.float32\)"),
    ("int k", "all", lambda: (_tok(1).long(), _tok(1)), r"got torch.int64"),
    ("lengths past n", "all", lambda: (_tok(2), _tok(2), torch.tensor([1, 3])), r"lengths in \[0, n=2\].*\[1, 3\]"),
    ("negative lengths", "all", lambda: (_tok(2), _tok(2), torch.tensor([-1, 0])), r"lengths in \[0, n=2\]"),
    ("float lengths", "all", lambda: (_tok(2), _tok(2), torch.tensor([1.0, 1.0])), r"integer tensor of shape \(2,\)"),
    ("lengths shape", "all", lambda: (_tok(2), _tok(2), torch.tensor([1, 1, 1])), r"integer tensor of shape \(2,\)"),
    ("non-finite", ("quantized",), lambda: (_tok(2).index_fill(2, torch.tensor([1]), float("inf")), _tok(2)),
     r"expected finite k"),
]


@pytest.mark.parametrize("kind, make_args, pattern", [
    pytest.param(kind, make_args, pattern, id=f"{kind}-{name}")
    for name, kinds, make_args, pattern in BAD_APPENDS
    for kind in ("window", "quantized", "lowrank") if kinds == "all" or kind in kinds
])
def test_failed_append_leaves_cache_byte_identical(kind, make_args, pattern):
    cache = _filled(kind)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=pattern):
        cache.append(*make_args())
    assert_same_bytes(before, cache)
    cache.append(_tok(1), _tok(1), torch.tensor([0, 1]))  # still usable: the same call, valid, goes through
    assert int(cache.seqlens()[1]) == 6


def test_failed_fit_leaves_lowrank_cache_byte_identical():
    cache = LowRankKVCache(B, HKV, CAP, D, 3, dtype=torch.float32)
    cache.fit(randn(1, HKV, 8, D, seed=5), randn(1, HKV, 8, D, seed=6))
    before = snapshot(cache)
    bad = [
        ((randn(1, HKV, 8, D + 1, seed=1), randn(1, HKV, 8, D, seed=2)), r"k_calib of shape \(B=2 or 1, Hkv=2, n, 8\)"),
        ((randn(3, HKV, 8, D, seed=1), randn(3, HKV, 8, D, seed=2)), r"got \(3, 2, 8, 8\)"),
        ((randn(1, HKV, 8, D, seed=1), randn(1, HKV, 8, D, seed=2).long()), r"v_calib to be floating point"),
        ((randn(1, HKV, 8, D, seed=1) * float("nan"), randn(1, HKV, 8, D, seed=2)), r"finite k_calib"),
    ]
    for args, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            cache.fit(*args)
        assert_same_bytes(before, cache)


# Benchmark ---------------------------------------------------------------------------------------

def test_cache_tradeoffs_rows_on_a_small_case():
    d, n = 32, 128
    rows = cache_tradeoffs(batch=1, heads_q=4, heads_kv=2, head_dim=d, cache_len=n, ranks=(8, d), window=32,
                           calib_len=64)
    by = {(r.cache, r.setting.split(",")[0]): r for r in rows}
    assert [r.cache for r in rows] == ["static", "window", "int8", "lowrank", "lowrank"]
    assert by["static", "16-bit"].memory_vs_fp16 == 1.0 and by["window", "W=32"].memory_vs_fp16 == 32 / n
    assert by["int8", "8-bit + fp32 scale"].memory_vs_fp16 == (d + 4) / (2 * d)
    assert by["lowrank", "r=8"].bytes_per_token == 2 * 2 * 8 * 2  # Hkv * (K, V) * r * fp16
    static_err = by["static", "16-bit"].rel_err
    # Full rank is fp16 storage again (up to the basis round trip); rank 8 of 32 loses much more.
    assert by["lowrank", f"r={d}"].rel_err < 3 * static_err < by["lowrank", "r=8"].rel_err
    assert static_err < by["int8", "8-bit + fp32 scale"].rel_err < 0.05
    assert len(format_table(rows).splitlines()) == 2 + len(rows)
