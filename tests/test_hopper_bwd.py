"""The Hopper backward's one-pass kernel (dQ added atomically) and its variants, on the CPU under
Triton's interpreter (descriptors and atomics run there; the TMA reduce-add does not: GPU only,
tests/test_hopper_gpu.py). Against the float64 oracle with fa2lab's 3x gradient rule; the forward
runs on the portable kernel, so these also check that a portable forward and a Hopper backward
share the lse and the dropout mask exactly. fp16: see tests/test_hopper.py."""

import importlib.util

import pytest
import torch
from helpers import assert_within_torch_error, make_qkv, max_err

from fa2lab.measure.exactness import GRAD_FACTOR, exact_floor
from fa2lab.reference import attention_ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
                                reason="interpreter checks (triton installed, no CUDA)")

SEED = 1234
ONE_PASS = dict(dkdvq=(16, 16, 4, 1))
ONE_PASS_SPLIT = dict(dv=(16, 32, 4, 1), dkq=(16, 16, 4, 1, True))  # head dim 256's shape: swapped operands
TWO_PASS = dict(dkdv=(16, 16, 4, 1), dq=(16, 16, 4, 1))


class _PortableFwdHopperBwd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, left, right, kvars, cfg):
        from fa2lab.kernels.fwd import flash_fwd_triton

        out, lse = flash_fwd_triton(q, k, v, scale=q.shape[-1] ** -0.5, left=left, right=right, variants=kvars)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (left, right, kvars, cfg)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from fa2lab.kernels.hopper_bwd import hopper_bwd

        q, k, v, out, lse = ctx.saved_tensors
        left, right, kvars, cfg = ctx.args
        grads = hopper_bwd(dout.contiguous(), dlse, q, k, v, out, lse, scale=q.shape[-1] ** -0.5, left=left,
                           right=right, config=cfg, variants=kvars)
        if kvars is None:
            return *grads, None, None, None, None, None
        return *grads, None, None, None, None


def _fn(cfg):
    """attention_ref's signature: the portable forward, the Hopper backward with `cfg`. dropout_mask
    is the oracle's; the kernels regenerate theirs from SEED."""
    def run(q, k, v, *, causal=False, window_size=(-1, -1), return_lse=False, dropout_mask=None, **opts):
        from fa2lab.kernels.variants import KernelVariants
        from fa2lab.variants.options import check_variants

        left, right = window_size
        if causal:
            right = 0 if right < 0 else min(right, 0)
        var = check_variants(q, k, **opts)
        kvars = KernelVariants(var, q, SEED, q.shape[-1] ** -0.5) if var.any else None
        out, lse = _PortableFwdHopperBwd.apply(q, k, v, var.sinks, left, right, kvars, cfg)
        return (out, lse) if return_lse else out
    return run


def _opts(which, b, hq, nq, nk):
    g = torch.Generator().manual_seed(9)
    table = dict(softcap=dict(softcap=2.0), alibi=dict(alibi_slopes=torch.rand(b, hq, generator=g)),
                 bias=dict(attn_bias=torch.randn(1, hq, nq, nk, generator=g)), sinks=dict(sinks=torch.randn(hq, generator=g)),
                 dropout=dict(dropout_p=0.25))
    out = {}
    for w in which:
        out.update(table[w])
    if "dropout_p" in out:
        from fa2lab.kernels.variants import triton_keep_mask

        out["dropout_mask"] = triton_keep_mask(SEED, b, hq, nq, nk, out["dropout_p"], "cpu")
    return out


@pytest.mark.parametrize("cfg,case", [
    (ONE_PASS, (1, 4, 2, 97, 232, 40, True, (-1, -1))),  # Nq < Nk, GQA, odd head dim
    (ONE_PASS, (2, 2, 2, 70, 45, 64, False, (-1, -1))),  # Nq > Nk: a partial last key block, masked throughout
    (ONE_PASS, (1, 4, 1, 100, 100, 80, True, (16, -1))),  # sliding window, MQA
    (ONE_PASS, (1, 2, 2, 17, 9, 32, True, (-1, -1))),  # rows that see no key
    (ONE_PASS, (1, 2, 1, 1, 50, 128, True, (-1, -1))),  # a single query
    (ONE_PASS_SPLIT, (1, 1, 1, 33, 47, 256, False, (5, 7))),  # the largest head dim, two-sided window
    (ONE_PASS_SPLIT, (1, 4, 2, 40, 75, 40, True, (-1, -1))),
])
def test_one_pass_backward_within_torch_rule(cfg, case):
    b, hq, hkv, nq, nk, d, causal, window = case
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=5)
    assert_within_torch_error(_fn(cfg), q, k, v, torch.float16, causal=causal, window_size=window)


@pytest.mark.parametrize("cfg,which,causal,window", [
    (ONE_PASS, ["softcap", "alibi", "bias", "sinks"], True, (-1, -1)),
    (TWO_PASS, ["softcap", "alibi", "bias", "sinks"], False, (20, 9)),
    (TWO_PASS, ["dropout", "softcap"], True, (-1, -1)),  # dropout takes the two passes (bit-reproducible)
    (ONE_PASS, ["dropout", "alibi"], False, (-1, -1)),
])
def test_hopper_backward_variants_within_torch_rule(cfg, which, causal, window):
    b, hq, hkv, nq, nk, d = 1, 4, 2, 97, 232, 40  # GQA, Nq != Nk, ragged tiles, odd head dim
    if "dropout" in which:  # one Philox draw per score: slow in the interpreter
        nq, nk = 37, 70
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=2)
    assert_within_torch_error(_fn(cfg), q, k, v, torch.float16, causal=causal, window_size=window,
                              **_opts(which, b, hq, nq, nk))


def test_hopper_backward_sinks_gradient_within_torch_rule():
    b, hq, hkv, nq, nk, d = 1, 4, 2, 37, 70, 40
    q64, k64, v64 = make_qkv(b, hq, hkv, nq, nk, d, seed=3)
    sinks64 = torch.randn(hq, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    do = torch.randn(b, hq, nq, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def sink_grad(fn, dtype, sdtype):
        sinks = sinks64.to(sdtype).requires_grad_()
        out = fn(*(t.to(dtype) for t in (q64, k64, v64)), causal=True, sinks=sinks, alibi_slopes=torch.ones(hq) / 4)
        return torch.autograd.grad((out.double() * do).sum(), sinks)[0]

    truth = sink_grad(attention_ref, torch.float64, torch.float64)
    ours = sink_grad(_fn(ONE_PASS), torch.float16, torch.float32)
    naive = sink_grad(lambda *a, **kw: attention_ref(*a, upcast=False, **kw), torch.float16, torch.float32)
    e_ours, e_torch = max_err(ours, truth), max_err(naive, truth)
    assert e_ours <= GRAD_FACTOR * e_torch + exact_floor(torch.float16), (e_ours, e_torch)


def test_backward_config_takes_two_passes_where_order_must_not_vary():
    from fa2lab.kernels.hopper_config import BWD_TWO_PASS, hopper_bwd_config
    from fa2lab.kernels.variants import KernelVariants
    from fa2lab.variants.options import check_variants

    q, k, _ = make_qkv(1, 2, 2, 8, 8, 64, dtype=torch.float16)
    for d in (64, 128, 256):
        bound = 64 if d <= 64 else 128 if d <= 128 else 256
        assert hopper_bwd_config(d, causal=False, seq_len=4096, deterministic=True) == BWD_TWO_PASS[bound]
        drop = KernelVariants(check_variants(q, k, dropout_p=0.1), q, 0, 0.125)
        assert hopper_bwd_config(d, causal=True, seq_len=4096, variants=drop) == BWD_TWO_PASS[bound]
    bias = KernelVariants(check_variants(q, k, attn_bias=torch.zeros(8, 8)), q, 0, 0.125)
    assert all(t[3] <= 2 for t in hopper_bwd_config(64, causal=False, seq_len=8, variants=bias).values()
               if isinstance(t, tuple))
