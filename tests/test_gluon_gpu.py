"""The Gluon Hopper forward (kernels/gluon_fwd.py) on an sm_90 GPU (`pytest -m gpu`): the error rule
against float64 on awkward shapes, through the kernel and through the public call."""


import pytest
import torch
from helpers import assert_within_torch_error, make_qkv, max_err

import fa2lab
from fa2lab.kernels.gluon_fwd import HAVE_GLUON, gluon_fwd, gluon_supported
from fa2lab.reference import attention_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_GLUON or
                                                  torch.cuda.get_device_capability()[0] != 9,
                                                  reason="needs an sm_90 (Hopper) GPU and Triton's Gluon")]

CASES = [  # b, hq, hkv, nq, nk, d, causal, window
    (1, 2, 2, 1, 1, 128, False, (-1, -1)),
    (2, 4, 2, 97, 97, 128, True, (-1, -1)),
    (1, 4, 1, 232, 1025, 64, True, (-1, -1)),
    (1, 4, 4, 1025, 232, 128, True, (-1, -1)),  # rows 0 .. 792 see no key (bottom-right): zeros
    (2, 8, 2, 1025, 1025, 80, False, (-1, -1)),
    (1, 4, 2, 1000, 3000, 40, False, (-1, -1)),
    (2, 16, 4, 4096, 4096, 128, True, (-1, -1)),
    (1, 8, 8, 2048, 2048, 128, False, (256, 0)),
    (1, 8, 2, 1500, 1500, 64, False, (100, 300)),
    (2, 4, 2, 1025, 1025, 256, True, (-1, -1)),  # D=256: the warp-specialised tiles only
    (1, 4, 4, 97, 300, 200, False, (-1, -1)),
    (1, 8, 8, 2048, 2048, 256, False, (256, 0)),
    (4, 32, 8, 300, 700, 128, True, (-1, -1)),  # 384 tiles: a persistent program walks three, GQA 4:1
    (3, 40, 40, 513, 513, 64, False, (-1, -1)),  # 600 tiles of two lengths' last block
]


# The kernels under test: the one-partition kernel, the warp-specialised one with two consumer
# warpgroups (the table's), and with three (FA3's 192-row tile for D <= 64; a bench candidate); the
# persistent warp-specialised kernel with the table's tiles (two query buffers at D <= 128, one at
# 256), one query buffer forced, and three consumers.
_PERSISTENT = dict(WS=True, PERSISTENT=True, num_warps=4)
VARIANTS = {"one-partition": None, "warp-specialised": None,
            "three-consumers": {64: dict(BLOCK_M=192, BLOCK_N=128, STAGES=2, num_warps=4, WS=True, CONSUMERS=3)},
            "persistent": {64: dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, **_PERSISTENT),
                           128: dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, **_PERSISTENT),
                           256: dict(BLOCK_M=128, BLOCK_N=64, STAGES=2, **_PERSISTENT)},
            "persistent-one-q": {128: dict(BLOCK_M=128, BLOCK_N=64, STAGES=3, Q_STAGES=1, **_PERSISTENT)},
            "persistent-three-consumers": {64: dict(BLOCK_M=192, BLOCK_N=128, STAGES=2, CONSUMERS=3, **_PERSISTENT)}}


def _kernel(q, k, v, causal=False, window_size=(-1, -1), softmax_scale=None, variant="warp-specialised"):
    from fa2lab.kernels.common import pow2
    from fa2lab.kernels.gluon_fwd import GLUON_FWD, GLUON_FWD_ONE_PARTITION
    from fa2lab.masks import effective_window

    left, right = effective_window(causal, window_size)
    scale = softmax_scale or q.shape[-1] ** -0.5
    table = {"one-partition": GLUON_FWD_ONE_PARTITION, "warp-specialised": GLUON_FWD}.get(variant) or VARIANTS[variant]
    if pow2(q.shape[-1]) not in table:
        pytest.skip(f"no {variant} tiles for D={q.shape[-1]}")
    return gluon_fwd(q, k, v, scale=scale, left=left, right=right, config=table[pow2(q.shape[-1])])[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,window", CASES)
def test_gluon_forward_within_torch_rule(dtype, b, hq, hkv, nq, nk, d, causal, window, variant):
    q, k, v = (t.cuda() for t in make_qkv(b, hq, hkv, nq, nk, d, seed=5))
    assert gluon_supported(q.to(dtype), k.to(dtype), v.to(dtype))
    truth = attention_ref(q, k, v, causal=causal, window_size=window)
    ours = _kernel(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, window_size=window, variant=variant)
    naive = attention_ref(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, window_size=window, upcast=False)
    e_ours, e_torch = max_err(ours, truth), max_err(naive, truth)
    assert e_ours <= 2 * e_torch + 1e-3, f"forward error {e_ours:.3g} vs torch's {e_torch:.3g}"


@pytest.mark.parametrize("variant", ["warp-specialised", "persistent"])
def test_gluon_lse_and_strided_inputs_match_the_tma_kernel(variant):
    from fa2lab.kernels.hopper_fwd import hopper_fwd

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 1500, 3, 8, 128, generator=g).bfloat16().cuda()  # (B, N, 3, H, D): token stride 3*H*D
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    config = VARIANTS[variant][128] if VARIANTS[variant] else None
    out, lse = gluon_fwd(q, k, v, scale=0.088, left=-1, right=0, config=config)
    ref, ref_lse = hopper_fwd(q, k, v, scale=0.088, left=-1, right=0)
    assert max_err(out, ref) < 2e-2 and max_err(lse, ref_lse) < 1e-3


def test_persistent_kernel_with_broadcast_heads_and_batch_of_one():
    """A K/V head dimension broadcast by expand (stride 0) goes to the per-head kernel; size-1 batch and
    head dimensions (any stride) run persistent. Both equal the non-persistent kernel."""
    q, k, v = (t.cuda().bfloat16() for t in make_qkv(1, 8, 1, 700, 900, 128, seed=4))
    k8, v8 = k.expand(1, 8, 900, 128), v.expand(1, 8, 900, 128)
    kw = dict(scale=0.09, left=-1, right=0)
    for kk, vv in ((k, v), (k8, v8)):
        ours, lse = gluon_fwd(q, kk, vv, config=VARIANTS["persistent"][128], **kw)
        ref, ref_lse = gluon_fwd(q, kk, vv, config=dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, WS=True), **kw)
        assert max_err(ours, ref) < 1e-2 and max_err(lse, ref_lse) < 1e-3


def test_gluon_through_the_public_call_with_gradients(monkeypatch):
    monkeypatch.setenv("FA2LAB_HOPPER_FWD", "gluon")
    q, k, v = (t.cuda() for t in make_qkv(2, 8, 2, 1025, 1025, 128, seed=7))
    assert_within_torch_error(lambda *a, **kw: fa2lab.attention(*a, backend="triton", **kw), q, k, v,
                              torch.bfloat16, causal=True)


# The Gluon dK/dV kernel (kernels/gluon_bwd.py) through the public call: the backward row of its head
# dim replaced by the two passes with "gluon_dkdv" (as `fa2lab.bench.hopper_bwd_gpu --plan gluon`).
BWD_CASES = [  # b, hq, hkv, nq, nk, d, causal, window
    (1, 2, 2, 1, 1, 128, False, (-1, -1)),
    (2, 4, 2, 97, 97, 128, True, (-1, -1)),
    (1, 4, 1, 232, 1025, 64, True, (-1, -1)),
    (1, 4, 4, 1025, 232, 128, True, (-1, -1)),
    (2, 8, 2, 1025, 1025, 80, False, (-1, -1)),
    (1, 4, 2, 1000, 3000, 40, False, (-1, -1)),
    (1, 8, 8, 2048, 2048, 128, False, (256, 0)),
    (1, 8, 2, 1500, 1500, 64, False, (100, 300)),
]


# "gluon_dkdvq": the same kernel adding dQ too (one pass: TMA reduce-adds, or fp32 atomics), for
# 32 < D <= 128 (dQ's halves of 32 or 64 columns); other head dims run the row's two passes.
@pytest.mark.parametrize("key,tiles", [("gluon_dkdv", (64, 128, 2)), ("gluon_dkdv", (32, 128, 3)),
                                       ("gluon_dkdvq", (64, 128, 2)), ("gluon_dkdvq", (64, 128, 3)),
                                       ("gluon_dkdvq", (64, 128, 2, "atomic")),
                                       ("gluon_dkdvq", (64, 128, 2, "persistent"))],
                         ids=["64x128s2", "32x128s3", "one-pass-64x128s2", "one-pass-64x128s3", "one-pass-atomic",
                              "one-pass-persistent"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,window", BWD_CASES)
def test_gluon_dkdv_gradients_within_torch_rule(monkeypatch, key, tiles, b, hq, hkv, nq, nk, d, causal, window):
    from fa2lab.kernels import gluon_bwd, hopper_config

    bound = hopper_config._bound(d)
    monkeypatch.setitem(hopper_config.BWD, bound, dict(hopper_config.BWD_TWO_PASS[bound], **{key: tiles}))
    monkeypatch.setattr(hopper_config, "BWD_CAUSAL", {})
    monkeypatch.setattr(hopper_config, "BWD_SHORT", {})
    monkeypatch.setattr(hopper_config, "BWD_PORTABLE", set())
    calls = []
    real = gluon_bwd.gluon_dkdv
    monkeypatch.setattr(gluon_bwd, "gluon_dkdv", lambda *a, **kw: calls.append(kw.get("dq_sums") is not None)
                        or real(*a, **kw))
    q, k, v = (t.cuda() for t in make_qkv(b, hq, hkv, nq, nk, d, seed=9))
    assert_within_torch_error(lambda *a, **kw: fa2lab.attention(*a, backend="triton", **kw), q, k, v,
                              torch.bfloat16, causal=causal, window_size=window)
    if 32 < d <= 128:
        assert calls == [key == "gluon_dkdvq"], f"the backward did not reach the Gluon kernel as {key}: {calls}"
    else:
        assert not calls


# The persistent backward where programs walk several tiles (more tiles than SMs): the ring, dS and K / V
# barriers' phases carried across tiles, causal longest-first sections, GQA partials, a window, D=64.
PERSISTENT_BWD_CASES = [  # b, hq, hkv, nq, nk, d, causal, window
    (4, 16, 4, 700, 900, 128, True, (-1, -1)),
    (3, 24, 24, 513, 513, 64, False, (-1, -1)),
    (2, 32, 8, 1024, 1024, 128, False, (256, 0)),
    (8, 16, 16, 300, 300, 96, True, (-1, -1)),
]


@pytest.mark.parametrize("tiles", [(64, 128, 2, "persistent"), (64, 128, 2, "atomic", "persistent")],
                         ids=["tma", "atomic"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,window", PERSISTENT_BWD_CASES)
def test_persistent_backward_over_many_tiles_within_torch_rule(monkeypatch, tiles, b, hq, hkv, nq, nk, d, causal,
                                                               window):
    from fa2lab.kernels import gluon_bwd, hopper_config

    bound = hopper_config._bound(d)
    monkeypatch.setitem(hopper_config.BWD, bound, dict(hopper_config.BWD_TWO_PASS[bound], gluon_dkdvq=tiles))
    monkeypatch.setattr(hopper_config, "BWD_CAUSAL", {})
    monkeypatch.setattr(hopper_config, "BWD_SHORT", {})
    monkeypatch.setattr(hopper_config, "BWD_PORTABLE", set())
    launches = []
    real = gluon_bwd._gluon_dkdv_persistent_kernel
    monkeypatch.setattr(gluon_bwd, "_gluon_dkdv_persistent_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or real[grid]})())
    q, k, v = (t.cuda() for t in make_qkv(b, hq, hkv, nq, nk, d, seed=13))
    assert_within_torch_error(lambda *a, **kw: fa2lab.attention(*a, backend="triton", **kw), q, k, v,
                              torch.bfloat16, causal=causal, window_size=window)
    tiles_total = -(-nk // 128) * b * hq
    assert launches and launches[0][0] < tiles_total, (launches, tiles_total)  # programs walk several tiles


def test_direct_launch_equals_tritons_launch(monkeypatch):
    """The second call of a signature launches the compiled kernel directly (kernels/launch.py): the same
    bits as Triton's own launch, for both layouts."""
    from fa2lab.kernels import gluon_fwd as G
    from fa2lab.kernels.launch import KernelLaunch

    q, k, v = (t.cuda().to(torch.bfloat16) for t in make_qkv(1, 8, 2, 1000, 1000, 128, seed=3))
    for qq, kk, vv in ((q, k, v), tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))):
        kw = dict(scale=0.1, left=-1, right=0)
        first, lse_first = gluon_fwd(qq, kk, vv, **kw)
        direct, lse_direct = gluon_fwd(qq, kk, vv, **kw)
        assert any(any(launch._bound.values()) for launch in G._LAUNCH.values())  # bound after the first launch
        monkeypatch.setattr(KernelLaunch, "ENABLED", False)
        plain, lse_plain = gluon_fwd(qq, kk, vv, **kw)
        monkeypatch.setattr(KernelLaunch, "ENABLED", True)
        assert torch.equal(first, direct) and torch.equal(direct, plain)
        assert torch.equal(lse_first, lse_direct) and torch.equal(lse_direct, lse_plain)


# The one-pass backward for 128 < D <= 256 (kernels/gluon_bwd_wide.py, "gluon_wide"): the warpgroups splitting
# the head dim's columns (two stages of Q and one of dO, the reverse, 32-column dQ pieces) or the keys.
WIDE_CASES = [  # b, hq, hkv, nq, nk, d, causal, window
    (1, 2, 2, 1, 1, 256, False, (-1, -1)),
    (2, 4, 2, 97, 97, 256, True, (-1, -1)),
    (1, 4, 1, 232, 1025, 256, True, (-1, -1)),
    (1, 4, 4, 1025, 232, 256, True, (-1, -1)),  # rows 0 .. 792 see no key: zero gradients there
    (2, 4, 2, 1025, 1025, 200, False, (-1, -1)),  # columns past D read as zeros
    (1, 4, 2, 1000, 3000, 160, False, (-1, -1)),
    (1, 8, 8, 2048, 2048, 256, False, (256, 0)),
    (1, 8, 2, 1500, 1500, 256, False, (100, 300)),
    (2, 8, 8, 2048, 2048, 256, True, (-1, -1)),
]


@pytest.mark.parametrize("tiles", [(64, 64, 2, 1, 64), (64, 64, 1, 2, 64), (64, 64, 2, 2, 32),
                                   (64, 64, 2, 1, 64, "keys"), (64, 64, 1, 2, 64, "keys")],
                         ids=["q2do1", "q1do2", "q2do2-chunk32", "keys-q2do1", "keys-q1do2"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,window", WIDE_CASES)
def test_gluon_wide_backward_within_torch_rule(monkeypatch, tiles, b, hq, hkv, nq, nk, d, causal, window):
    from fa2lab.kernels import gluon_bwd_wide, hopper_config

    monkeypatch.setitem(hopper_config.BWD, 256, dict(hopper_config.BWD_TWO_PASS[256], gluon_wide=tiles))
    monkeypatch.setattr(hopper_config, "BWD_CAUSAL", {})  # the tiles under test for causal and short calls too
    monkeypatch.setattr(hopper_config, "BWD_SHORT", {})
    monkeypatch.setattr(hopper_config, "BWD_PORTABLE", set())
    calls = []
    real = gluon_bwd_wide.gluon_bwd_wide
    monkeypatch.setattr(gluon_bwd_wide, "gluon_bwd_wide", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = (t.cuda() for t in make_qkv(b, hq, hkv, nq, nk, d, seed=11))
    assert_within_torch_error(lambda *a, **kw: fa2lab.attention(*a, backend="triton", **kw), q, k, v,
                              torch.bfloat16, causal=causal, window_size=window)
    assert len(calls) == 1, f"the backward did not reach the wide Gluon kernel: {len(calls)} calls"


@pytest.mark.parametrize("causal", [False, True])
def test_gluon_wide_backward_fp16_and_strided_with_the_tables_rows(causal):
    """The table's own rows (BWD, BWD_CAUSAL) in fp16, q / k / v as (B, N, H, D) views (token stride H * D):
    the descriptors take the strides."""
    from fa2lab.kernels import hopper_config

    if "gluon_wide" not in hopper_config.hopper_bwd_config(256, causal=causal, seq_len=700):
        pytest.skip("the wide Gluon backward is not the table's D=256 row")
    q, k, v = (t.cuda().transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv(2, 4, 2, 700, 700, 256, seed=5))
    assert_within_torch_error(lambda *a, **kw: fa2lab.attention(*a, backend="triton", **kw), q, k, v,
                              torch.float16, causal=causal)
