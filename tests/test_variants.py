"""Attention variants (softcap, ALiBi, bias, sinks, dropout, score_mod / mask_mod, block masks,
attention_probs) on the reference and tiled backends, against float64 and against the formulas."""

import logging
import math

import pytest
import torch
from helpers import assert_within_torch_error, finite_lse, make_qkv, max_err

import fa2lab
from fa2lab import TileTracer, tiled_attention
from fa2lab.reference import attention_ref

G = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731


def _options(b, hq, nq, nk, which, seed=0):
    g = G(100 + seed)
    opts = {
        "softcap": dict(softcap=1.5),
        "alibi": dict(alibi_slopes=torch.rand(b, hq, generator=g) * 0.5),
        "bias": dict(attn_bias=torch.randn(1, hq, nq, nk, generator=g, dtype=torch.float64).requires_grad_()),
        "bias_keys": dict(attn_bias=torch.randn(b, 1, 1, nk, generator=g, dtype=torch.float64).requires_grad_()),
        "sinks": dict(sinks=torch.randn(hq, generator=g, dtype=torch.float64).requires_grad_()),
        "score_mod": dict(score_mod=lambda s, b_, h, i, j: s * (1 + 0.1 * h) - 0.01 * (i - j).abs()),
        "mask_mod": dict(mask_mod=lambda b_, h, i, j: ((i // 7 + j // 5) % 3 != 0) | (j == 0)),
        "dropout": dict(dropout_p=0.25),
    }
    out = {}
    for name in which:
        out.update(opts[name])
    return out


def _grads(fn, q, k, v, opts, generator_seed=None, **kw):
    if "dropout_p" in opts:
        opts = dict(opts, generator=G(generator_seed or 7))
    out, lse = fn(q, k, v, return_lse=True, **opts, **kw)
    do = torch.randn(out.shape, generator=G(3), dtype=torch.float64)
    dlse = torch.randn(lse.shape, generator=G(4), dtype=torch.float64)
    leaves = [q, k, v] + [opts[n] for n in ("attn_bias", "sinks") if n in opts]
    loss = (out.double() * do).sum() + (finite_lse(lse.double()) * dlse).sum()
    return out, lse, torch.autograd.grad(loss, leaves)


# (B, Hq, Hkv, Nq, Nk, D, causal, window, Br, Bc): lengths 1, 97, 232, 1025; Nq != Nk; GQA; D 40, 80
SHAPES = [
    (1, 4, 2, 97, 232, 40, True, (-1, -1), 32, 64),
    (2, 2, 1, 232, 97, 80, False, (16, 8), 64, 32),
    (1, 2, 2, 1, 1025, 40, True, (-1, -1), 16, 256),
    (1, 2, 1, 33, 17, 40, True, (4, -1), 16, 16),  # Nq > Nk: rows that see no key
]
SINGLE = ["softcap", "alibi", "bias", "bias_keys", "sinks", "score_mod", "mask_mod", "dropout"]


@pytest.mark.parametrize("which", [[w] for w in SINGLE] + [SINGLE[:5] + ["mask_mod", "dropout"]])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]])
def test_tiled_matches_float64_reference(which, shape):
    b, hq, hkv, nq, nk, d, causal, window, bq, bk = shape
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, requires_grad=True)
    opts = _options(b, hq, nq, nk, [w for w in which if not (w == "bias" and "bias_keys" in which)])
    kw = dict(causal=causal, window_size=window)
    out, lse, grads = _grads(tiled_attention, q, k, v, opts, block_q=bq, block_k=bk, **kw)
    out_r, lse_r, grads_r = _grads(attention_ref, q, k, v, opts, **kw)
    assert max_err(out, out_r) < 1e-12 and torch.equal(torch.isinf(lse), torch.isinf(lse_r))
    assert max_err(finite_lse(lse), finite_lse(lse_r)) < 1e-12
    for g, g_r in zip(grads, grads_r):
        assert g.shape == g_r.shape and max_err(g, g_r) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("which", [[w] for w in SINGLE] + [SINGLE[:5] + ["score_mod", "dropout"]])
@pytest.mark.parametrize("shape", SHAPES)
def test_tiled_matches_float64_reference_grid(which, shape):
    test_tiled_matches_float64_reference(which, shape)


def test_through_the_api_and_varlen():
    q, k, v = make_qkv(2, 4, 2, 40, 50, 40, requires_grad=True)
    opts = _options(2, 4, 40, 50, ["softcap", "alibi", "bias", "sinks", "mask_mod"])
    for backend in ("auto", "tiled"):
        out = fa2lab.attention(q, k, v, causal=True, backend=backend, **opts)
        assert max_err(out, attention_ref(q, k, v, causal=True, **opts)) < 1e-12
    # varlen: sequence s is the dense problem on its slice; its bias is the top-left corner of row s
    lens_q, lens_k = [3, 0, 7], [5, 4, 9]
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    qv, kv_, vv = make_qkv(1, 4, 2, sum(lens_q), sum(lens_k), 16)
    qv, kv_, vv = (t[0].transpose(0, 1) for t in (qv, kv_, vv))  # (total, H, D)
    bias = torch.randn(3, 4, 7, 9, dtype=torch.float64, generator=G(1))
    slopes, sinks = torch.rand(3, 4, generator=G(2)), torch.randn(4, dtype=torch.float64, generator=G(3))
    mm = lambda b_, h, i, j: (j + b_) % 4 != 1  # noqa: E731
    out = fa2lab.varlen_attention(qv, kv_, vv, cu(lens_q), cu(lens_k), causal=True, attn_bias=bias,
                                  alibi_slopes=slopes, sinks=sinks, softcap=2.0, mask_mod=mm)
    ofs_q, ofs_k = cu(lens_q).tolist(), cu(lens_k).tolist()
    for s in range(3):
        if lens_q[s] == 0:
            continue
        dense = lambda x, a, z: x[a:z].transpose(0, 1)[None]  # noqa: E731
        ref = attention_ref(dense(qv, ofs_q[s], ofs_q[s + 1]), dense(kv_, ofs_k[s], ofs_k[s + 1]),
                            dense(vv, ofs_k[s], ofs_k[s + 1]), causal=True, softcap=2.0,
                            attn_bias=bias[s:s + 1, :, :lens_q[s], :lens_k[s]], alibi_slopes=slopes[s:s + 1],
                            sinks=sinks, mask_mod=lambda b_, h, i, j, s=s: mm(b_ + s, h, i, j))
        assert max_err(out[ofs_q[s]:ofs_q[s + 1]], ref[0].transpose(0, 1)) < 1e-12


def test_reference_semantics_by_hand():
    """The oracle against the formulas written out (one head, no GQA, explicit loops)."""
    b, hq, nq, nk, d = 1, 2, 5, 7, 8
    q, k, v = make_qkv(b, hq, hq, nq, nk, d, seed=5)
    scale, cap = d ** -0.5, 0.7
    slopes, sinks = torch.tensor([0.3, 0.05]), torch.tensor([0.5, -1.0], dtype=torch.float64)
    bias = torch.randn(nq, nk, dtype=torch.float64, generator=G(8))
    out, lse = attention_ref(q, k, v, causal=True, softcap=cap, alibi_slopes=slopes, attn_bias=bias, sinks=sinks,
                             return_lse=True)
    for h in range(hq):
        for i in range(nq):
            logits = []
            for j in range(i + nk - nq + 1):  # causal, bottom-right
                s = scale * float(q[0, h, i] @ k[0, h, j])
                s = cap * math.tanh(s / cap) - float(slopes[h]) * abs(i + nk - nq - j) + float(bias[i, j])
                logits.append(s)
            denom = sum(math.exp(x) for x in logits) + math.exp(float(sinks[h]))
            assert abs(float(lse[0, h, i]) - math.log(denom)) < 1e-12
            o = sum(math.exp(x) / denom * v[0, h, j] for j, x in enumerate(logits))
            assert max_err(out[0, h, i], o) < 1e-12


def test_sinks_rows_without_keys_and_mass():
    q, k, v = make_qkv(1, 2, 2, 9, 4, 16)
    sinks = torch.tensor([0.25, -2.0], dtype=torch.float64)
    for fn in (tiled_attention, attention_ref):
        out, lse = fn(q, k, v, causal=True, sinks=sinks, return_lse=True)
        assert (out[:, :, :5] == 0).all() and torch.equal(lse[0, :, :5], sinks[:, None].expand(2, 5))
    p = fa2lab.attention_probs(q, k, causal=True, sinks=sinks)  # rows sum to 1 - the sink's share
    assert max_err(p.sum(-1), 1 - torch.exp(sinks.view(1, 2, 1) - lse)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_torch_rule(dtype):
    q, k, v = make_qkv(1, 4, 2, 97, 232, 40, seed=3)
    opts = dict(softcap=5.0, alibi_slopes=torch.rand(4, generator=G(0)), sinks=torch.randn(4, generator=G(1)),
                attn_bias=torch.randn(97, 232, generator=G(2)).to(dtype))
    fn = lambda *a, **kw: tiled_attention(*a, block_q=64, block_k=64, **kw)  # noqa: E731
    assert_within_torch_error(fn, q, k, v, dtype, causal=True, **opts)


def test_dropout_replays_debug_mask_and_is_deterministic():
    q, k, v = make_qkv(2, 4, 2, 37, 53, 16, requires_grad=True)
    mask = fa2lab.dropout_mask(q, k, dropout_p=0.3, generator=G(11))
    assert mask.shape == (2, 4, 37, 53) and mask.dtype == torch.bool
    runs = []
    for _ in range(2):
        out = tiled_attention(q, k, v, causal=True, dropout_p=0.3, generator=G(11), block_q=16, block_k=16)
        runs.append((out, torch.autograd.grad(out.sin().sum(), (q, k, v))))
    assert torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    replay = attention_ref(q, k, v, causal=True, dropout_p=0.3, dropout_mask=mask)
    assert max_err(runs[0][0], replay) < 1e-12
    g_ref = torch.autograd.grad(replay.sin().sum(), (q, k, v))
    assert all(max_err(a, b) < 1e-11 for a, b in zip(runs[0][1], g_ref))
    # A generator moves on: the next call draws another mask.
    g = G(11)
    first = tiled_attention(q, k, v, dropout_p=0.3, generator=g)
    assert not torch.equal(first, tiled_attention(q, k, v, dropout_p=0.3, generator=g))


def test_dropout_statistics():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16, seed=2)
    p = 0.4
    mask = fa2lab.dropout_mask(q, k, dropout_p=p, generator=G(0))
    kept = mask.double().mean().item()
    n = mask.numel()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma
    plain = attention_ref(q, k, v)
    g = G(1)
    mean = sum(tiled_attention(q, k, v, dropout_p=p, generator=g) for _ in range(200)) / 200
    # E[out] = out without dropout; the spread of one output is ~ |v| sqrt(p / (1-p) * sum P^2)
    assert max_err(mean, plain) < 0.1 and (mean - plain).abs().mean() < 0.02


def test_mask_mod_skips_tiles_and_block_mask_agrees():
    q, k, v = make_qkv(1, 2, 2, 128, 128, 16, requires_grad=True)
    doc = torch.arange(128) // 40  # document masking: three documents and a tail
    mm = lambda b, h, i, j: doc[i] == doc[j]  # noqa: E731
    t1, t2 = TileTracer(), TileTracer()
    out = tiled_attention(q, k, v, causal=True, mask_mod=mm, block_q=16, block_k=16, tracer=t1)
    bm = fa2lab.create_block_mask(mm, None, None, 128, 128, BLOCK_SIZE=16)
    out_b = tiled_attention(q, k, v, causal=True, block_mask=bm, tracer=t2)
    ref = attention_ref(q, k, v, causal=True, mask_mod=mm)
    assert max_err(out, ref) < 1e-12 and max_err(out_b, ref) < 1e-12
    c1 = t1.counts()
    assert c1["skipped"] > 36 and c1 == t2.counts()  # 36 = what causal alone skips of 8 x 8 tiles
    assert bm.grid()[7][0] == "skipped" and bm.grid()[0][0] == "full" and 0 < bm.sparsity() < 1
    g = torch.autograd.grad(out_b.sum(), (q, k, v))
    assert all(max_err(a, b) < 1e-11 for a, b in zip(g, torch.autograd.grad(ref.sum(), (q, k, v))))
    with pytest.raises(ValueError, match="block_mask describes 16 x 16"):
        tiled_attention(q, k, v, block_mask=bm, block_q=32)
    with pytest.raises(ValueError, match="Nq=128, Nk=128"):
        fa2lab.attention(q[:, :, :5], k, v, block_mask=bm)


def test_attention_probs_rows_lse_and_bound():
    q, k, v = make_qkv(1, 4, 2, 97, 232, 40)
    opts = dict(causal=True, softcap=3.0, alibi_slopes=torch.rand(4, generator=G(0)),
                mask_mod=lambda b, h, i, j: (j % 11) != 3)
    out, lse = fa2lab.attention(q, k, v, return_lse=True, **opts)
    rows = [0, 5, 96]
    p = fa2lab.attention_probs(q, k, rows=rows, lse=lse, **opts)
    p_all = fa2lab.attention_probs(q, k, **opts)  # lse computed in a first pass
    assert p.shape == (1, 4, 3, 232) and p_all.shape == (1, 4, 97, 232)
    assert max_err(p, p_all[:, :, rows]) < 1e-12 and max_err(p_all.sum(-1), torch.ones(1, 4, 97)) < 1e-12
    v_rep = v.repeat_interleave(2, dim=1)
    assert max_err(p_all @ v_rep, out) < 1e-12
    with pytest.raises(ValueError, match="GiB"):
        big = torch.zeros(1, 1, 1, 8).expand(64, 32, 4096, 8)  # 128 GiB of fp32 probabilities
        fa2lab.attention_probs(big, big)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, Nq\)"):
        fa2lab.attention_probs(q, k, rows=[97])


def test_validation_names_values_and_auto_logs(caplog):
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16)
    bad = [(dict(softcap=-1.0), "softcap"), (dict(alibi_slopes=torch.ones(3)), r"\(Hq,\) = \(4,\)"),
           (dict(attn_bias=torch.ones(2, 8, 8)), "does not broadcast"), (dict(sinks=torch.ones(4, 1)), "sinks"),
           (dict(dropout_p=1.0), "dropout_p"), (dict(score_mod=3), "score_mod"),
           (dict(alibi_slopes=torch.ones(4, dtype=torch.int32)), "float32")]
    for opts, match in bad:
        with pytest.raises(ValueError, match=match):
            fa2lab.attention(q, k, v, **opts)
    with pytest.raises(ValueError, match="mask_mod must return a bool"):
        fa2lab.attention(q, k, v, mask_mod=lambda b, h, i, j: i - j)
    with pytest.raises(ValueError, match="backend 'sdpa' cannot run this dense case: torch SDPA has none"):
        fa2lab.attention(q, k, v, softcap=2.0, backend="sdpa")
    with caplog.at_level(logging.INFO, logger="fa2lab"):
        fa2lab.attention(q, k, v, sinks=torch.zeros(4), alibi_slopes=torch.zeros(4))
    assert "backend=tiled" in caplog.text and "alibi, sinks" in caplog.text


def test_variant_figures_draw_what_the_package_computes():
    from fa2lab.viz import variants as vv

    q, k, _ = make_qkv(1, 2, 2, 12, 20, 8)
    overview = vv.variants_overview(q, k, 11, softcap=1.0, slope=0.5, sink=1.0)
    assert len(overview.data) == 6
    rows = vv.row_probabilities(q, k, 11, causal=True, sinks=torch.ones(2, dtype=torch.float64))
    assert 0 < rows["sink_mass"] < 1 and abs(sum(rows["variant"]) + rows["sink_mass"] - 1) < 1e-12
    assert "absorbs" in vv.row_probabilities_figure(rows, "row 11").layout.title.text
    capped = vv.softcap_figure(torch.linspace(-10, 10, 50), 2.0)
    assert max(capped.data[1].y) < 2.0
    assert len(vv.alibi_figure(q, k, 11, [0.0, 1.0]).data) == 2
    mask = fa2lab.dropout_mask(q, k, dropout_p=0.5, generator=G(0))
    assert "kept" in vv.dropout_mask_figure(mask, 0.5).layout.title.text
    bm = fa2lab.create_block_mask(lambda b, h, i, j: j <= i, None, None, 12, 20, BLOCK_SIZE=4)
    assert "skipped" in vv.mask_tiles_figure(bm).layout.title.text
