"""Soft-capping, ALiBi, sinks (and bias, score/mask functions) in the split-K decode, dense and
paged, against each sequence's dense float64 reference; dropout through the reference path."""

import logging

import pytest
import torch
from helpers import finite_lse, max_err

import fa2lab
from fa2lab.reference import attention_ref

G = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731


def _problem(b=3, hq=4, hkv=2, nq=1, nmax=600, d=40, seed=0):
    g = G(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, nmax, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, nmax, d, generator=g, dtype=torch.float64)
    return q, k, v, torch.tensor([1, min(97, nmax), nmax][-b:], dtype=torch.int32)


def _paged(k, v, page):
    b, hkv, nmax, d = k.shape
    per = -(-nmax // page)
    table = torch.randperm(b * per, generator=G(3)).view(b, per).to(torch.int32)
    kp = torch.full((b * per, hkv, page, d), float("nan"), dtype=k.dtype)
    vp = kp.clone()
    for bi in range(b):
        for pos in range(nmax):
            kp[table[bi, pos // page], :, pos % page] = k[bi, :, pos]
            vp[table[bi, pos // page], :, pos % page] = v[bi, :, pos]
    return kp, vp, table


OPTS = {
    "softcap": lambda b, hq, nq, n: dict(softcap=1.2),
    "alibi": lambda b, hq, nq, n: dict(alibi_slopes=torch.rand(b, hq, generator=G(1))),
    "sinks": lambda b, hq, nq, n: dict(sinks=torch.randn(hq, generator=G(2), dtype=torch.float64)),
    "bias": lambda b, hq, nq, n: dict(attn_bias=torch.randn(b, 1, nq, n, generator=G(4), dtype=torch.float64)),
    "mods": lambda b, hq, nq, n: dict(score_mod=lambda s, b_, h, i, j: s + 0.1 * h, mask_mod=lambda b_, h, i, j: j % 5 != 2),
}


@pytest.mark.parametrize("which", [["softcap"], ["alibi"], ["sinks"], ["softcap", "alibi", "sinks", "bias", "mods"]])
@pytest.mark.parametrize("page,nq,splits", [(None, 1, 3), (16, 4, 1), (1, 2, 5)])
def test_splitk_variants_match_each_sequence_dense(which, page, nq, splits):
    q, k, v, seqlens = _problem(nq=nq, nmax=240 if page == 1 else 600)
    b, hq, nmax = q.shape[0], q.shape[1], k.shape[2]
    cache = dict(k_cache=k, v_cache=v) if page is None else dict(zip(("k_cache", "v_cache", "block_table"),
                                                                     _paged(k, v, page)))
    capacity = nmax if page is None else cache["block_table"].shape[1] * page  # the bias spans the capacity
    opts = {}
    for w in which:
        opts.update(OPTS[w](b, hq, nq, capacity))
    out, lse = fa2lab.decode_attention(q, cache_seqlens=seqlens, num_splits=splits, return_lse=True, backend="tiled",
                                       **cache, **opts)
    out_ref, lse_ref = fa2lab.decode_attention(q, cache_seqlens=seqlens, return_lse=True, backend="reference",
                                               **cache, **opts)
    for bi, n in enumerate(seqlens.tolist()):  # sequence b is the dense problem on its first n keys
        seq = dict(opts)
        if "alibi_slopes" in seq:
            seq["alibi_slopes"] = seq["alibi_slopes"][bi:bi + 1]
        if "attn_bias" in seq:
            seq["attn_bias"] = seq["attn_bias"][bi:bi + 1, :, :, :n]
        if "mask_mod" in seq:
            seq["mask_mod"] = lambda b_, h, i, j, m=seq["mask_mod"], bi=bi: m(b_ + bi, h, i, j)
            seq["score_mod"] = lambda s, b_, h, i, j, m=seq["score_mod"], bi=bi: m(s, b_ + bi, h, i, j)
        o, l = attention_ref(q[bi:bi + 1], k[bi:bi + 1, :, :n], v[bi:bi + 1, :, :n], causal=True, return_lse=True,
                             **seq)
        for got, got_l in ((out, lse), (out_ref, lse_ref)):
            assert max_err(got[bi:bi + 1], o) < 1e-12 and torch.equal(got_l[bi:bi + 1].isinf(), l.isinf())
            assert max_err(finite_lse(got_l[bi:bi + 1]), finite_lse(l)) < 1e-12


def test_decode_routes_variants_and_dropout_with_reasons(caplog):
    q, k, v, seqlens = _problem(b=2, nmax=64)
    with caplog.at_level(logging.INFO, logger="fa2lab"):
        fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, sinks=torch.zeros(4, dtype=torch.float64))
        out1 = fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, dropout_p=0.5, generator=G(0))
    assert "the split-K decode has no dropout" in caplog.text and "backend=reference" in caplog.text
    from fa2lab.backends import support_table
    from fa2lab.decode.api import decode_case
    from fa2lab.decode.readers import DenseReader

    case = decode_case(q, DenseReader(k, v), True, (-1, -1), None, ("softcap", "sinks"))
    assert "the Triton decode kernel has no softcap, sinks" in support_table("decode", [case])["triton"]
    assert torch.equal(out1, fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, dropout_p=0.5, generator=G(0)))
    with pytest.raises(ValueError, match="has no dropout"):
        fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, dropout_p=0.5, backend="tiled")
    with pytest.raises(ValueError, match="the Triton decode kernel has no softcap"):
        fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, softcap=3.0, backend="triton")
    with pytest.raises(ValueError, match="does not broadcast"):
        fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, attn_bias=torch.zeros(2, 4, 1, 63))
