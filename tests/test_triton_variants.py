"""The Triton kernels' variants (softcap, ALiBi, bias, sinks, dropout) against the float64 oracle,
under the interpreter on a CPU (small awkward shapes); full size in test_triton_variants_gpu.py."""

import importlib.util
import logging

import pytest
import torch
from helpers import assert_within_torch_error, finite_lse, make_qkv, max_err

import fa2lab
from fa2lab.reference import attention_ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
G = lambda seed: torch.Generator(device=DEVICE).manual_seed(seed)  # noqa: E731


def _opts(which, b, hq, nq, nk):
    g = torch.Generator().manual_seed(9)
    table = dict(softcap=dict(softcap=1.5), alibi=dict(alibi_slopes=torch.rand(b, hq, generator=g).to(DEVICE)),
                 bias=dict(attn_bias=torch.randn(1, hq, nq, nk, generator=g).to(DEVICE)),
                 bias_keys=dict(attn_bias=torch.randn(b, 1, 1, nk, generator=g).to(DEVICE)),
                 sinks=dict(sinks=torch.randn(hq, generator=g).to(DEVICE).requires_grad_()),
                 dropout=dict(dropout_p=0.3))
    out = {}
    for w in which:
        out.update(table[w])
    return out


def _run(fn, q, k, v, opts, **kw):
    out, lse = fn(q, k, v, return_lse=True, **opts, **kw)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    dlse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    loss = (out.double() * do).sum() + (finite_lse(lse.double()) * dlse).sum()
    leaves = [q, k, v] + ([opts["sinks"]] if "sinks" in opts else [])
    return out, lse, torch.autograd.grad(loss, leaves)


# (which, causal, window); shape B=1, Hq=4, Hkv=2, Nq=37, Nk=70, D=40: GQA, Nq != Nk, ragged tiles
CASES = [(["softcap"], True, (-1, -1)), (["alibi"], False, (5, 9)), (["bias"], True, (-1, -1)),
         (["bias_keys"], False, (-1, -1)), (["sinks"], True, (8, -1)), (["dropout"], True, (-1, -1)),
         (["softcap", "alibi", "bias_keys", "sinks", "dropout"], False, (5, 9))]


@pytest.mark.parametrize("which,causal,window", CASES)
def test_fp32_variants_match_float64_reference(which, causal, window):
    b, hq, hkv, nq, nk, d = 1, 4, 2, 37, 70, 40
    q, k, v = (t.float().to(DEVICE).requires_grad_() for t in make_qkv(b, hq, hkv, nq, nk, d, seed=2))
    opts = _opts(which, b, hq, nq, nk)
    kw = dict(causal=causal, window_size=window)
    ref_opts = dict(opts)
    if "dropout_p" in opts:  # the kernels' Philox mask, replayed through the oracle
        ref_opts["dropout_mask"] = fa2lab.dropout_mask(q, k, dropout_p=0.3, generator=G(5), backend="triton")
        opts = dict(opts, generator=G(5))
    out, lse, grads = _run(lambda *a, **o: fa2lab.attention(*a, backend="triton", **o), q, k, v, opts, **kw)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out_r, lse_r, grads_r = _run(attention_ref, *leaves, ref_opts, **kw)
    assert max_err(out, out_r) < 2e-5 and torch.equal(torch.isinf(lse), torch.isinf(lse_r))
    assert max_err(finite_lse(lse), finite_lse(lse_r)) < 2e-5
    assert all(max_err(g, g_r) < 5e-5 for g, g_r in zip(grads, grads_r))


def test_dropout_is_bit_identical_under_one_generator_state():
    q, k, v = (t.to(DEVICE).requires_grad_() for t in make_qkv(1, 2, 2, 33, 45, 32, dtype=torch.float32))
    runs = []
    for seed in (4, 4, 5):
        out = fa2lab.attention(q, k, v, causal=True, dropout_p=0.5, generator=G(seed), backend="triton")
        runs.append((out, torch.autograd.grad(out.square().sum(), (q, k, v))))
    assert torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert not torch.equal(runs[0][0], runs[2][0])
    mask = fa2lab.dropout_mask(q, k, dropout_p=0.5, generator=G(4), backend="triton")
    assert abs(mask.float().mean().item() - 0.5) < 0.05  # 2970 draws: 5 sigma is 0.046


def test_bf16_variants_within_torch_rule():
    q, k, v = (t.to(DEVICE) for t in make_qkv(1, 4, 2, 70, 97, 40, seed=3))
    g = torch.Generator().manual_seed(0)
    opts = dict(softcap=4.0, alibi_slopes=torch.rand(4, generator=g).to(DEVICE),
                sinks=torch.randn(4, generator=g).to(DEVICE), attn_bias=torch.randn(1, 1, 70, 97, generator=g).to(DEVICE))
    fn = lambda *a, **kw: fa2lab.attention(*a, backend="triton", **kw)  # noqa: E731
    assert_within_torch_error(fn, q, k, v, torch.bfloat16, causal=True, **opts)


def test_functions_and_bias_grad_route_to_tiled_with_a_reason(caplog):
    q, k, v = (t.to(DEVICE) for t in make_qkv(1, 2, 2, 8, 8, 16, dtype=torch.float32))
    with pytest.raises(ValueError, match="Triton kernels do not run mask_mod"):
        fa2lab.attention(q, k, v, mask_mod=lambda b, h, i, j: i >= j, backend="triton")
    bias = torch.zeros(8, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="bias_grad"):
        fa2lab.attention(q, k, v, attn_bias=bias, backend="triton")
    from fa2lab.backends import Case, choose

    case = Case.of(q, k, v, True, (-1, -1), False,
                   variants=fa2lab.variants.check_variants(q, k, score_mod=lambda s, *i: s).active)
    choice = choose("dense", case)
    name, reason = choice.name, choice.reason
    assert name in ("tiled", "reference") and "score_mod" in reason
