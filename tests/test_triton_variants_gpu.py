"""Full-size checks of the Triton kernels' variants on a GPU (`pytest -m gpu`); skipped without CUDA."""

import pytest
import torch
from helpers import assert_within_torch_error, make_qkv

import fa2lab

pytestmark = pytest.mark.gpu


def _opts(name, hq, nq, nk):
    g = torch.Generator().manual_seed(0)
    return {"softcap": dict(softcap=5.0), "alibi": dict(alibi_slopes=torch.rand(hq, generator=g).cuda()),
            "sinks": dict(sinks=torch.randn(hq, generator=g).cuda()),
            "bias": dict(attn_bias=torch.randn(2, 1, nq, nk, generator=g).cuda()),
            "all": dict(softcap=5.0, alibi_slopes=torch.rand(2, hq, generator=g).cuda(),
                        sinks=torch.randn(hq, generator=g).cuda(), attn_bias=torch.randn(1, hq, 1, nk, generator=g).cuda())}[name]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["softcap", "alibi", "sinks", "bias", "all"])
@pytest.mark.parametrize("hq,hkv,nq,nk,d,causal,window", [(16, 4, 1025, 2048, 128, True, (-1, -1)),
                                                          (8, 8, 1000, 700, 80, False, (128, 64))])
def test_triton_variants_full_size_within_torch_rule(dtype, name, hq, hkv, nq, nk, d, causal, window):
    q, k, v = (t.cuda() for t in make_qkv(2, hq, hkv, nq, nk, d, seed=7))
    fn = lambda *a, **kw: fa2lab.attention(*a, backend="triton", **kw)  # noqa: E731
    assert_within_torch_error(fn, q, k, v, dtype, causal=causal, window_size=window, **_opts(name, hq, nq, nk))


def test_triton_dropout_full_size_replay_determinism_and_keep_rate():
    q, k, v = (t.cuda().to(torch.bfloat16).requires_grad_() for t in make_qkv(2, 8, 2, 1024, 1024, 128, seed=3))
    gen = lambda: torch.Generator(device="cuda").manual_seed(11)  # noqa: E731
    runs = []
    for _ in range(2):
        out = fa2lab.attention(q, k, v, causal=True, dropout_p=0.2, generator=gen(), backend="triton")
        runs.append((out, torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    assert torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    mask = fa2lab.dropout_mask(q, k, dropout_p=0.2, generator=gen(), backend="triton")
    assert abs(mask.float().mean().item() - 0.8) < 1e-3  # 16.8M draws: sigma 1e-4
    from fa2lab.reference import attention_ref

    replay = attention_ref(q, k, v, causal=True, dropout_p=0.2, dropout_mask=mask)
    assert (runs[0][0].float() - replay.float()).abs().max().item() < 3e-2
