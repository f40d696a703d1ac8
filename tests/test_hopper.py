"""The Hopper kernels' logic on the CPU: Triton's interpreter models tensor descriptors, so the
same kernels that run on an sm_90 GPU (test_hopper_gpu.py) are checked here on awkward shapes
against the float64 oracle with fa2lab's error rule. fp16: the interpreter's bf16 tl.dot is wrong
(fa2lab.kernels.common.ieee_dot), and the Hopper kernels use tensor-core dots only."""

import importlib.util

import pytest
import torch
from helpers import assert_within_torch_error, make_qkv

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
                                reason="interpreter checks (triton installed, no CUDA)")

FWD = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
BWD = dict(dkdv=(16, 16, 4, 1), dq=(16, 16, 4, 1))
# The other shapes each kernel takes: host descriptors with a persistent launch; split dV / dK
# kernels with the swapped operand order (head dim 256's configuration).
FWD_HOST = dict(FWD, HOST_DESC=True, PERSISTENT=True)
BWD_SPLIT = dict(dv=(16, 32, 4, 1), dk=(16, 16, 4, 1, True), dq=(32, 16, 4, 1))
# Lazy rescaling (skip acc * alpha when no row max grew) and the query-block-major tile order.
FWD_LAZY = dict(FWD, LAZY_RESCALE=True, M_MAJOR=True, PERSISTENT=True)
FWD_PIPE = dict(FWD, PIPELINE_QK=True, HOST_DESC=True)  # next tile's QK^T before this tile's softmax


class _Hopper(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, left, right, fwd_cfg, bwd_cfg):
        from fa2lab.kernels.hopper_fwd import hopper_fwd

        out, lse = hopper_fwd(q, k, v, scale=q.shape[-1] ** -0.5, left=left, right=right, config=fwd_cfg)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (left, right, bwd_cfg)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from fa2lab.kernels.hopper_bwd import hopper_bwd

        q, k, v, out, lse = ctx.saved_tensors
        left, right, cfg = ctx.args
        dq, dk, dv = hopper_bwd(dout.contiguous(), dlse, q, k, v, out, lse, scale=q.shape[-1] ** -0.5, left=left,
                                right=right, config=cfg)
        return dq, dk, dv, None, None, None, None


def _fn(fwd_cfg, bwd_cfg):
    def run(q, k, v, *, causal=False, window_size=(-1, -1), return_lse=False):
        left, right = window_size
        if causal:
            right = 0 if right < 0 else min(right, 0)
        out, lse = _Hopper.apply(q, k, v, left, right, fwd_cfg, bwd_cfg)
        return (out, lse) if return_lse else out
    return run


CASES = [
    (1, 4, 2, 97, 232, 40, True, (-1, -1)),  # Nq < Nk, GQA, odd head dim
    (2, 2, 2, 70, 45, 64, False, (-1, -1)),  # Nq > Nk, not causal
    (1, 4, 1, 100, 100, 80, True, (16, -1)),  # sliding window, MQA
    (1, 2, 2, 17, 9, 32, True, (-1, -1)),  # rows that see no key
    (1, 2, 1, 1, 50, 128, True, (-1, -1)),  # a single query
    (1, 1, 1, 33, 47, 256, False, (5, 7)),  # the largest head dim, two-sided window
]


VARIANTS = ([("device", c) for c in CASES] + [("host+split", CASES[i]) for i in (0, 2, 3, 5)]
            + [("lazy", CASES[i]) for i in (0, 2)] + [("pipe", CASES[i]) for i in (0, 1, 5)])


@pytest.mark.parametrize("variant,case", VARIANTS)
def test_hopper_kernels_within_torch_rule(variant, case):
    b, hq, hkv, nq, nk, d, causal, window = case
    fn = dict(device=_fn(FWD, BWD), lazy=_fn(FWD_LAZY, BWD), pipe=_fn(FWD_PIPE, BWD)).get(variant) or _fn(FWD_HOST, BWD_SPLIT)
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, seed=5)
    assert_within_torch_error(fn, q, k, v, torch.float16, causal=causal, window_size=window)


def test_hopper_varlen_matches_dense_per_sequence():
    from fa2lab.kernels.hopper_fwd import hopper_fwd, hopper_fwd_varlen

    lens_q, lens_k = [5, 0, 1, 40, 33], [5, 3, 0, 40, 50]
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens_q), 4, 40, generator=g).half()
    k = torch.randn(sum(lens_k), 2, 40, generator=g).half()
    v = torch.randn(sum(lens_k), 2, 40, generator=g).half()
    cq, ck = cu(lens_q), cu(lens_k)
    out, lse = hopper_fwd_varlen(q, k, v, cq, ck, max(lens_q), scale=40 ** -0.5, left=-1, right=0, config=FWD)
    for s in range(len(lens_q)):
        qs, ks, vs = q[cq[s]:cq[s + 1]], k[ck[s]:ck[s + 1]], v[ck[s]:ck[s + 1]]
        if len(qs) == 0:
            continue
        if len(ks) == 0:
            assert (out[cq[s]:cq[s + 1]] == 0).all() and torch.isinf(lse[:, cq[s]:cq[s + 1]]).all()
            continue
        o1, l1 = hopper_fwd(*(t.transpose(0, 1)[None] for t in (qs, ks, vs)), scale=40 ** -0.5, left=-1, right=0,
                            config=FWD)
        assert torch.equal(out[cq[s]:cq[s + 1]], o1[0].transpose(0, 1))
        assert torch.equal(lse[:, cq[s]:cq[s + 1]], l1[0])


def test_dispatch_keeps_the_portable_path_off_hopper():
    from fa2lab.kernels.hopper_config import hopper_eligible, tma_ok

    q, k, v = (t.half() for t in make_qkv(1, 2, 2, 64, 64, 64))
    assert not hopper_eligible(q, k, v)  # CPU tensors / the interpreter: the portable kernels run
    assert tma_ok(q, 2) and not tma_ok(q.transpose(2, 3), 2)  # head dim must be unit stride
    odd = torch.empty(1, 2, 64, 65, dtype=torch.half)[..., :64]  # token stride 65 * 2 bytes: unaligned
    assert not tma_ok(odd, 2)


def test_sm90_profiles_carry_the_hopper_configs():
    from fa2lab.hardware import get_profile
    from fa2lab.kernels.hopper_config import BWD as TABLE
    from fa2lab.kernels.hopper_config import BWD_CAUSAL, BWD_SHORT, SHORT_BWD_UPTO
    from fa2lab.kernels.hopper_config import FWD_GLUON, GLUON_FWD

    for name in ("h100", "h200"):
        p = get_profile(name)
        assert p.kernel_configs["bwd"] == TABLE and set(p.kernel_configs["fwd"]) == {64, 128, 256}
        assert p.kernel_configs["bwd_causal"] == BWD_CAUSAL and "wide-bwd-20261204" in p.sources["kernel_configs"]
        assert p.kernel_configs["bwd_short"] == dict(BWD_SHORT, upto=SHORT_BWD_UPTO)
        assert "2026-12-02" in p.sources["kernel_configs"]
        assert p.kernel_configs["fwd_gluon"] == {d: GLUON_FWD[d] for d in FWD_GLUON}
        assert "gluon-20261203-125524.json" in p.sources["kernel_configs"]


def test_cost_model_rows_for_the_h200_run():
    import json
    from pathlib import Path

    from fa2lab.bench.hopper_sweep import roofline_rows

    path = Path(__file__).parents[1] / "experiments/results/gpu-20261202-045930.json"
    rows = roofline_rows(json.loads(path.read_text()))
    assert len(rows) == 12  # every forward shape of issue 15's table
    assert all(r["measured_over_predicted"] >= 1.0 for r in rows)  # a roofline is a lower bound


class _HopperVariants(torch.autograd.Function):
    """The Hopper forward with variants and the portable backward: the pair a variant call on an sm_90
    GPU runs until the Hopper backward takes variants (the backward regenerates the forward's mask)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, left, right, kvars, fwd_cfg):
        from fa2lab.kernels.hopper_fwd import hopper_fwd

        out, lse = hopper_fwd(q, k, v, scale=q.shape[-1] ** -0.5, left=left, right=right, config=fwd_cfg,
                              variants=kvars)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (left, right, kvars)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from fa2lab.kernels.bwd import flash_bwd_triton

        q, k, v, out, lse = ctx.saved_tensors
        left, right, kvars = ctx.args
        dq, dk, dv, dsinks = flash_bwd_triton(dout.contiguous(), dlse, q, k, v, out, lse, scale=q.shape[-1] ** -0.5,
                                              left=left, right=right, variants=kvars)
        return dq, dk, dv, dsinks, None, None, None, None


def _variant_fn(fwd_cfg, seed=0):
    from fa2lab.kernels.variants import KernelVariants
    from fa2lab.variants import check_variants

    def run(q, k, v, *, causal=False, window_size=(-1, -1), return_lse=False, dropout_mask=None, **opts):
        left, right = window_size
        if causal:
            right = 0 if right < 0 else min(right, 0)
        var = check_variants(q, k, **opts)
        kvars = KernelVariants(var, q, seed, q.shape[-1] ** -0.5)
        out, lse = _HopperVariants.apply(q, k, v, var.sinks, left, right, kvars, fwd_cfg)
        return (out, lse) if return_lse else out
    return run


def _variant_opts(which, b, hq, nq, nk):
    g = torch.Generator().manual_seed(9)
    table = dict(softcap=dict(softcap=1.5), alibi=dict(alibi_slopes=torch.rand(b, hq, generator=g)),
                 bias=dict(attn_bias=torch.randn(1, hq, nq, nk, generator=g)),
                 bias_keys=dict(attn_bias=torch.randn(b, 1, 1, nk, generator=g)),
                 sinks=dict(sinks=torch.randn(hq, generator=g)))
    out = {}
    for w in which:
        out.update(table[w])
    return out


# (which, causal, window, config); B=1, Hq=4, Hkv=2, Nq=37, Nk=70, D=40 (ALiBi's rows: Nq=70, Nk=37 too)
VARIANT_CASES = [
    (["softcap"], True, (-1, -1), FWD), (["alibi"], False, (-1, -1), FWD), (["alibi"], True, (-1, -1), FWD_HOST),
    (["alibi"], False, (5, 9), FWD), (["bias"], True, (-1, -1), FWD), (["bias_keys"], False, (-1, -1), FWD_HOST),
    (["sinks"], True, (8, -1), FWD), (["softcap", "alibi", "bias", "sinks"], False, (-1, -1), FWD_HOST),
]


@pytest.mark.parametrize("which,causal,window,cfg", VARIANT_CASES)
@pytest.mark.parametrize("nq,nk", [(37, 70), (70, 37)])
def test_hopper_forward_variants_within_torch_rule(which, causal, window, cfg, nq, nk):
    if nq > nk and "alibi" not in which:
        pytest.skip("Nq > Nk only for ALiBi (its side split depends on the diagonal's offset)")
    q, k, v = make_qkv(1, 4, 2, nq, nk, 40, seed=2)
    assert_within_torch_error(_variant_fn(cfg), q, k, v, torch.float16, causal=causal, window_size=window,
                              **_variant_opts(which, 1, 4, nq, nk))


def test_hopper_dropout_replays_the_shared_mask():
    """The Hopper forward draws the mask one Philox call per four keys (`_dropout_keep_tile`); the
    portable backward and the debug mask draw it entry by entry: the three must agree bit for bit."""
    from fa2lab.kernels.variants import triton_keep_mask
    from fa2lab.reference import attention_ref

    q64, k64, v64 = make_qkv(1, 4, 2, 37, 70, 40, seed=4)
    seed, p = 123456789012345, 0.3
    mask = triton_keep_mask(seed, 1, 4, 37, 70, p, "cpu")
    assert abs(mask.float().mean().item() - (1 - p)) < 0.05
    leaves = [t.half().requires_grad_() for t in (q64, k64, v64)]
    out, lse = _variant_fn(FWD, seed)(*leaves, causal=True, return_lse=True, dropout_p=p)
    ref = [t.detach().requires_grad_() for t in (q64, k64, v64)]
    out_r = attention_ref(*ref, causal=True, dropout_p=p, dropout_mask=mask)
    assert (out.double() - out_r).abs().max().item() < 5e-3
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for a, r in zip(torch.autograd.grad(out, leaves, do.half()), torch.autograd.grad(out_r, ref, do)):
        assert (a.double() - r).abs().max().item() < 2e-2


def test_bench_prints_issue_15_table_from_a_run():
    import json
    from pathlib import Path

    from fa2lab.bench.gpu import hopper_table

    rows = json.loads((Path(__file__).parents[1] / "experiments/results/gpu-20261202-045930.json").read_text())["rows"]
    lines = hopper_table(rows).splitlines()
    assert len(lines) == 2 + 12 and "fa2lab / cuDNN fwd" in lines[0] and "fa2lab / cuDNN bwd" in lines[0]
    row = next(line for line in lines if line.startswith("| N=4096 D=128 full |"))
    assert row.split(" | ")[1] == "499" and row.split(" | ")[7] == "0.84"  # fa2lab 499, cuDNN 595: BENCHMARKS.md
