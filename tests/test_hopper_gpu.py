"""The Hopper kernels at full size on an sm_90 GPU (`pytest -m gpu`): dispatch, error rule, strides, varlen."""

import pytest
import torch
from helpers import assert_within_torch_error, make_qkv, max_err

import fa2lab
from fa2lab.determinism import deterministic_backward
from fa2lab.kernels.hopper_config import hopper_eligible

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or
                                                  torch.cuda.get_device_capability()[0] != 9,
                                                  reason="needs an sm_90 (Hopper) GPU")]


def _fn(*a, **kw):
    return fa2lab.attention(*a, backend="triton", **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,window", [
    (2, 16, 16, 4096, 4096, 128, False, (-1, -1)),
    (2, 32, 8, 4097, 4097, 128, True, (-1, -1)),
    (1, 8, 1, 1000, 3000, 256, True, (-1, -1)),
    (2, 8, 2, 3000, 1000, 64, True, (-1, -1)),
    (1, 16, 4, 2048, 2048, 80, False, (256, 0)),
])
def test_hopper_full_size_within_torch_rule(dtype, b, hq, hkv, nq, nk, d, causal, window):
    q, k, v = (t.cuda() for t in make_qkv(b, hq, hkv, nq, nk, d, seed=3))
    assert hopper_eligible(q.to(dtype), k.to(dtype), v.to(dtype))
    assert_within_torch_error(_fn, q, k, v, dtype, causal=causal, window_size=window)


def test_hopper_strided_inputs_match_contiguous():
    # (B, N, H, D) storage viewed as (B, H, N, D): token stride H*D, as a fused QKV projection gives.
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 1500, 3, 8, 128, generator=g).bfloat16().cuda()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert hopper_eligible(q, k, v) and not q.is_contiguous()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    dense = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    # bit-equal gradients need the deterministic backward: the one pass adds dQ in a run-dependent order
    with deterministic_backward():
        out, lse = _fn(*leaves, causal=True, return_lse=True)
        ref, ref_lse = _fn(*dense, causal=True, return_lse=True)
    do = torch.randn_like(out)
    assert max_err(out, ref) == 0 and max_err(lse, ref_lse) == 0
    for a, r in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, dense, do)):
        assert max_err(a, r) == 0


def test_hopper_varlen_matches_each_sequence():
    lens = [1, 97, 1025, 2000]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens), 8, 128, generator=g).bfloat16().cuda()
    k = torch.randn(sum(lens), 2, 128, generator=g).bfloat16().cuda()
    v = torch.randn(sum(lens), 2, 128, generator=g).bfloat16().cuda()
    out = fa2lab.varlen_attention(q, k, v, cu, cu, causal=True, backend="triton")
    for s, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one = fa2lab.attention(*(t[a:e].transpose(0, 1)[None] for t in (q, k, v)), causal=True, backend="triton")
        assert max_err(out[a:e], one[0].transpose(0, 1)) < 1e-2, s


def test_portable_path_still_runs_on_hopper():
    q, k, v = (t.cuda().bfloat16() for t in make_qkv(1, 4, 4, 333, 333, 128, seed=1))
    from fa2lab.kernels.fwd import flash_fwd_triton
    from fa2lab.kernels.hopper_fwd import hopper_fwd

    a, la = flash_fwd_triton(q, k, v, scale=128 ** -0.5, left=-1, right=0)
    b, lb = hopper_fwd(q, k, v, scale=128 ** -0.5, left=-1, right=0)
    assert max_err(a, b) < 2e-2 and max_err(la, lb) < 1e-3


def _variant_opts(name, b, hq, nq, nk):
    g = torch.Generator().manual_seed(0)
    return {"softcap": dict(softcap=30.0), "alibi": dict(alibi_slopes=torch.rand(b, hq, generator=g).cuda()),
            "sinks": dict(sinks=torch.randn(hq, generator=g).cuda()),
            "bias": dict(attn_bias=torch.randn(b, hq, nq, nk, generator=g).cuda()),
            "all": dict(softcap=10.0, alibi_slopes=torch.rand(hq, generator=g).cuda(),
                        sinks=torch.randn(hq, generator=g).cuda(),
                        attn_bias=torch.randn(1, 1, nq, nk, generator=g).cuda())}[name]


@pytest.mark.parametrize("name", ["softcap", "alibi", "sinks", "bias", "all"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal", [(2, 16, 16, 2048, 2048, 128, False),
                                                     (2, 8, 2, 3000, 1000, 64, False),
                                                     (1, 8, 1, 1000, 3000, 256, True)])
def test_hopper_forward_variants_full_size_within_torch_rule(name, b, hq, hkv, nq, nk, d, causal):
    """A variant call on sm_90 runs the Hopper forward (and the portable backward, which regenerates
    its logits): forward within 2x, gradients within 3x of PyTorch's own bf16 error."""
    from fa2lab.kernels.attention import _fwd_impl

    q, k, v = (t.cuda() for t in make_qkv(b, hq, hkv, nq, nk, d, seed=5))
    assert _fwd_impl(q.bfloat16(), k.bfloat16(), v.bfloat16(), False)[1]  # the Hopper forward runs
    assert_within_torch_error(_fn, q, k, v, torch.bfloat16, causal=causal, **_variant_opts(name, b, hq, nq, nk))


def test_hopper_dropout_full_size_matches_the_replayed_mask():
    """The Hopper forward draws one Philox call per four keys; the debug mask draws entry by entry."""
    from fa2lab.reference import attention_ref

    q, k, v = (t.cuda().bfloat16() for t in make_qkv(2, 8, 2, 2048, 2048, 128, seed=3))
    gen = lambda: torch.Generator(device="cuda").manual_seed(11)  # noqa: E731
    out = fa2lab.attention(q, k, v, causal=False, dropout_p=0.15, generator=gen(), backend="triton")
    mask = fa2lab.dropout_mask(q, k, dropout_p=0.15, generator=gen(), backend="triton")
    assert abs(mask.float().mean().item() - 0.85) < 1e-3  # 67M draws: sigma 4e-5
    truth = attention_ref(q.double(), k.double(), v.double(), dropout_p=0.15, dropout_mask=mask)
    naive = attention_ref(q, k, v, upcast=False, dropout_p=0.15, dropout_mask=mask)
    assert max_err(out, truth) <= 2 * max_err(naive, truth) + 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_ring_blocks_run_the_hopper_kernels_within_the_rule(causal, monkeypatch):
    """A simulated ring of 8 (threads, exact hops) sends its blocks through the kernels that
    fa2lab.attention picks (a Hopper forward on sm_90: the Triton TMA kernel or, for the head dims
    hopper_config.FWD_GLUON names, the Gluon one): out within 2x, gradients within 3x of one device's
    error against float64, dK/dV travelling in fp32."""
    import fa2lab.kernels.gluon_fwd as gluon_fwd_module
    import fa2lab.kernels.hopper_fwd as hopper_fwd_module
    from fa2lab.bench.ring_check import simulate_check

    calls = []
    for module, name in ((hopper_fwd_module, "hopper_fwd"), (gluon_fwd_module, "gluon_fwd")):
        plain = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _plain=plain, _name=name, **kw: calls.append(_name)
                            or _plain(*a, **kw))
    rows = simulate_check(8, 4096, causal, "cuda", torch.bfloat16, travel_dtypes=(torch.float32,))
    assert calls, "the ring's blocks did not reach a Hopper forward"
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
