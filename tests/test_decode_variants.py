"""Soft-capping, ALiBi, sinks (and bias, score/mask functions) in the split-K decode, dense and
paged, against each sequence's dense float64 reference; dropout through the reference path."""

import importlib.util
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

    case = decode_case(q, DenseReader(k, v), True, (-1, -1), None, ("softcap", "bias", "sinks"))
    assert "the Triton decode kernel has no bias" in support_table("decode", [case])["triton"]
    assert torch.equal(out1, fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, dropout_p=0.5, generator=G(0)))
    with pytest.raises(ValueError, match="has no dropout"):
        fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, dropout_p=0.5, backend="tiled")
    with pytest.raises(ValueError, match="the Triton decode kernel has no bias"):
        fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, attn_bias=torch.zeros(2, 4, 1, 64), backend="triton")
    with pytest.raises(ValueError, match="does not broadcast"):
        fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, attn_bias=torch.zeros(2, 4, 1, 63))


HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNEL_VARIANTS = {
    "softcap": lambda b, hq: dict(softcap=1.3),
    "alibi": lambda b, hq: dict(alibi_slopes=torch.rand(b, hq, generator=G(1))),  # (B, Hq)
    "alibi_h": lambda b, hq: dict(alibi_slopes=torch.rand(hq, generator=G(5))),  # (Hq,): stride 0 over B
    "sinks": lambda b, hq: dict(sinks=torch.randn(hq, generator=G(2)) + 2.0),
}
ALL3 = ["softcap", "alibi", "sinks"]


def _seq_truth(q, k, v, lengths, opts, window):
    """Each sequence's dense float64 oracle on its first n keys: (out, lse) stacked over the batch."""
    outs, lses = [], []
    for bi, n in enumerate(lengths):
        seq = {key: val.double() if isinstance(val, torch.Tensor) else val for key, val in opts.items()}
        if "alibi_slopes" in seq and seq["alibi_slopes"].dim() == 2:
            seq["alibi_slopes"] = seq["alibi_slopes"][bi:bi + 1]
        o, l = attention_ref(q[bi:bi + 1].double(), k[bi:bi + 1, :, :n].double(), v[bi:bi + 1, :, :n].double(),
                             causal=True, window_size=window, return_lse=True, **seq)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("which,page,nq,splits,window,d,hq,hkv,lengths", [
    (["softcap"], None, 1, 3, (-1, -1), 40, 4, 2, [1, 97, 232]),
    (["alibi"], 16, 1, 1, (-1, -1), 40, 4, 2, [1, 97, 232]),
    (["alibi_h"], None, 2, 2, (-1, -1), 40, 4, 2, [1, 97, 232]),
    (["sinks"], 1, 1, 4, (-1, -1), 40, 4, 2, [1, 97, 232]),
    (ALL3, None, 3, 2, (50, -1), 80, 8, 2, [1, 97, 232]),
    (ALL3, 16, 2, 3, (-1, -1), 40, 4, 1, [1, 97, 232]),
    (ALL3, None, 1, 5, (-1, -1), 40, 4, 2, [1025, 600]),
])
def test_triton_decode_variants_match_each_sequence_dense(which, page, nq, splits, window, d, hq, hkv, lengths):
    """Soft-capping, ALiBi and sinks in the Triton split-K (under the interpreter on a CPU), planned
    and unplanned, dense and paged, out and lse, against the float64 oracle of each sequence."""
    g = G(7)
    b, nmax = len(lengths), max(lengths)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(b, hq, nq, d, generator=g)
    k, v = torch.randn(b, hkv, nmax, d, generator=g), torch.randn(b, hkv, nmax, d, generator=g)
    opts = {}
    for w in which:
        opts.update(KERNEL_VARIANTS[w](b, hq))
    truth, lse_t = _seq_truth(q, k, v, lengths, opts, window)
    cache = dict(k_cache=k, v_cache=v) if page is None else dict(zip(("k_cache", "v_cache", "block_table"),
                                                                     _paged(k, v, page)))
    cache = {key: t.to(dev) for key, t in cache.items()}
    opts = {key: val.to(dev) if isinstance(val, torch.Tensor) else val for key, val in opts.items()}
    q, seqlens = q.to(dev), torch.tensor(lengths, dtype=torch.int32, device=dev)
    out, lse = fa2lab.decode_attention(q, cache_seqlens=seqlens, num_splits=splits, window_size=window,
                                       return_lse=True, backend="triton", **cache, **opts)
    plan = fa2lab.decode_plan(q, cache_seqlens=seqlens, num_splits=splits, window_size=window, backend="triton",
                              **cache, **opts)
    assert plan.backend == "triton" and plan.num_splits == splits
    planned, lse_p = fa2lab.decode_attention(q, cache_seqlens=seqlens, plan=plan, return_lse=True, **cache)
    assert torch.equal(planned, out) and torch.equal(lse_p, lse)
    assert max_err(out.cpu(), truth) < 1e-5
    assert torch.equal(lse.cpu().isinf(), lse_t.isinf()) and max_err(finite_lse(lse.cpu()), finite_lse(lse_t)) < 1e-5


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_planned_variants_take_each_layers_sinks_and_slopes():
    """One plan for every layer: a planned call may bring its own slopes and sinks (same shapes);
    the plan fixes which variants are on and the softcap value."""
    g = G(8)
    b, hq, hkv, n, d = 2, 4, 2, 97, 16
    q, k, v = torch.randn(b, hq, 1, d, generator=g), torch.randn(b, hkv, n, d, generator=g), torch.randn(
        b, hkv, n, d, generator=g)
    seqlens = torch.tensor([97, 40], dtype=torch.int32)
    plan = fa2lab.decode_plan(q, k, v, cache_seqlens=seqlens, sinks=torch.zeros(hq), alibi_slopes=torch.zeros(hq),
                              softcap=2.0, backend="triton")
    other = dict(sinks=torch.randn(hq, generator=g), alibi_slopes=torch.rand(hq, generator=g))
    got = fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, plan=plan, **other)
    want = fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, softcap=2.0, backend="triton", **other)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="softcap=2.0"):
        fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, plan=plan, softcap=3.0)
    plain = fa2lab.decode_plan(q, k, v, cache_seqlens=seqlens, backend="triton")
    with pytest.raises(ValueError, match="made without sinks"):
        fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, plan=plain, sinks=torch.zeros(hq))
    with pytest.raises(ValueError, match="shape \\(Hq,\\)"):
        fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, plan=plan, sinks=torch.zeros(hq + 1))
    with pytest.raises(ValueError, match="not attn_bias"):
        fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, plan=plan, attn_bias=torch.zeros(1, 1, 1, n))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_decode_variants_bf16_within_torch_rule():
    g = G(9)
    b, hq, hkv, nq, d, lengths = 2, 8, 2, 1, 80, [232, 97]
    q, k, v = torch.randn(b, hq, nq, d, generator=g), torch.randn(b, hkv, 232, d, generator=g), torch.randn(
        b, hkv, 232, d, generator=g)
    opts = dict(softcap=1.5, alibi_slopes=torch.rand(hq, generator=g), sinks=torch.randn(hq, generator=g))
    truth, _ = _seq_truth(q, k, v, lengths, opts, (-1, -1))
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    out = fa2lab.decode_attention(qb, kb, vb, cache_seqlens=torch.tensor(lengths, dtype=torch.int32), num_splits=3,
                                  backend="triton", **opts)
    naive = torch.cat([attention_ref(qb[i:i + 1], kb[i:i + 1, :, :n], vb[i:i + 1, :, :n], causal=True, upcast=False,
                                     **{**opts, "sinks": opts["sinks"]}) for i, n in enumerate(lengths)])
    assert max_err(out, truth) <= 2 * max_err(naive, truth) + torch.finfo(torch.bfloat16).eps
