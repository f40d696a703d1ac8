"""The Gluon forward's host-side choices, on the CPU (its kernels need an sm_90 GPU: test_gluon_gpu.py):
which calls the dispatcher sends to it, and the errors of its launch configuration."""

import pytest
import torch

from fa2lab.kernels import hopper_config
from fa2lab.kernels.hopper_config import (FWD_GLUON, GLUON_FWD, GLUON_FWD_MASKED, GLUON_FWD_ONE_PARTITION,
                                          GLUON_TESTED, gluon_fwd_wanted, gluon_kernel_takes)


def _qkv(d=128, dv=None, dtype=torch.bfloat16):
    q = torch.zeros(1, 2, 16, d, dtype=dtype)
    k = torch.zeros(1, 2, 16, d, dtype=dtype)
    v = torch.zeros(1, 2, 16, dv or d, dtype=dtype)
    return q, k, v


@pytest.fixture
def gluon_present(monkeypatch):
    monkeypatch.setattr(hopper_config, "_have_gluon", lambda: True)
    monkeypatch.delenv("FA2LAB_HOPPER_FWD", raising=False)


@pytest.mark.parametrize("d,dv,dtype,expected", [
    (128, None, torch.bfloat16, True), (80, None, torch.float16, True),  # bound 128: measured faster
    (64, None, torch.bfloat16, 64 in FWD_GLUON), (40, None, torch.bfloat16, 64 in FWD_GLUON),
    (256, None, torch.bfloat16, True), (200, None, torch.bfloat16, True),  # bound 256: measured faster
    (32, None, torch.bfloat16, False), (512, None, torch.bfloat16, False),  # outside its tiles
    (128, 64, torch.bfloat16, False), (128, None, torch.float32, False),  # Dv != D, fp32
])
def test_auto_sends_measured_head_dims_to_gluon(gluon_present, d, dv, dtype, expected):
    assert {128, 256} <= FWD_GLUON
    assert gluon_fwd_wanted(*_qkv(d, dv, dtype)) is expected


def test_environment_forces_either_forward(gluon_present, monkeypatch):
    monkeypatch.setenv("FA2LAB_HOPPER_FWD", "triton")
    assert not gluon_fwd_wanted(*_qkv(128))
    monkeypatch.setenv("FA2LAB_HOPPER_FWD", "gluon")
    assert gluon_fwd_wanted(*_qkv(64))
    monkeypatch.setattr(hopper_config, "GLUON_TESTED", {64, 128})
    assert not gluon_fwd_wanted(*_qkv(256))  # forcing never sends a head dim not tested on a GPU
    assert not gluon_fwd_wanted(*_qkv(128, 64))  # nor a shape the kernel cannot take


def test_kernel_takes_more_than_the_dispatcher_sends(gluon_present):
    assert gluon_kernel_takes(*_qkv(256)) and gluon_kernel_takes(*_qkv(200))  # the bench and GPU tests run it
    assert not gluon_kernel_takes(*_qkv(512)) and not gluon_kernel_takes(*_qkv(32))
    assert FWD_GLUON <= GLUON_TESTED <= set(GLUON_FWD)


def test_without_gluon_nothing_goes_there(monkeypatch):
    monkeypatch.setattr(hopper_config, "_have_gluon", lambda: False)
    monkeypatch.setenv("FA2LAB_HOPPER_FWD", "gluon")
    assert not gluon_fwd_wanted(*_qkv(128))


def test_tables_are_launchable():
    from fa2lab.kernels.gluon_fwd import _q_stages

    assert set(GLUON_FWD_MASKED) <= GLUON_TESTED
    for table in (GLUON_FWD, GLUON_FWD_MASKED, GLUON_FWD_ONE_PARTITION):
        for d, cfg in table.items():
            assert d in (64, 128, 256) and cfg["BLOCK_N"] in (32, 64, 128)
            assert cfg["BLOCK_M"] == (64 * cfg.get("CONSUMERS", 2) if cfg.get("WS") else 128)
            q_buffers = _q_stages(cfg, d)["Q_STAGES"] if cfg.get("PERSISTENT") else 1
            stages_bytes = 2 * cfg["STAGES"] * cfg["BLOCK_N"] * d * 2 + q_buffers * cfg["BLOCK_M"] * d * 2
            assert stages_bytes <= 227 * 1024, (d, cfg)  # fits Hopper's shared memory
            assert not cfg.get("WS") or cfg["num_warps"] == 4


def test_warp_specialised_config_with_other_warps_is_refused():
    from fa2lab.kernels.gluon_fwd import HAVE_GLUON, gluon_fwd

    if not HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    q, k, v = _qkv(128)
    with pytest.raises(ValueError, match="num_warps=4.*num_warps=8"):
        gluon_fwd(q, k, v, scale=0.1, left=-1, right=0, config=dict(GLUON_FWD[128], num_warps=8))


@pytest.mark.parametrize("change", [dict(CONSUMERS=4), dict(CONSUMERS=3), dict(BLOCK_M=64)])
def test_consumer_count_must_match_the_tile(change):
    from fa2lab.kernels.gluon_fwd import HAVE_GLUON, gluon_fwd

    if not HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    q, k, v = _qkv(64)  # BLOCK_M=128 is two consumers of 64 rows; three need BLOCK_M=192
    tile = dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, num_warps=4, WS=True)
    with pytest.raises(ValueError, match="64 query rows.*BLOCK_M="):
        gluon_fwd(q, k, v, scale=0.1, left=-1, right=0, config=dict(tile, **change))


def test_benchmark_table_labels_kernel_level_rows():
    from fa2lab.bench.gluon_gpu import _parse, table

    assert _parse("4096:256:1,8192:128:0:32:4") == [(4096, 256, True, 8, 8), (8192, 128, False, 32, 4)]
    rows = [dict(N=4096, D=256, causal=True, Hq=8, Hkv=8, gluon_check=dict(exact=True), gluon_direct=True,
                 triton=485.0, gluon=500.0, cudnn=579.0, flash=298.0,
                 configs=[dict(BLOCK_M=192, BLOCK_N=128, STAGES=2, num_warps=4, WS=True, CONSUMERS=3, tflops=None)]),
            dict(N=4096, D=128, causal=False, Hq=16, Hkv=16, gluon_check=dict(exact=True), gluon_direct=False,
                 triton=501.0, gluon=598.0, cudnn=616.0, flash=344.0)]
    text = table(rows)
    assert "| N=4096 D=256 causal (Gluon: kernel) | 485 | 500 | 579 | 298 | 0.86 | 1.03 | True |" in text
    assert "kernel 192x128 s2 w4 WS 3 consumers | | - |" in text
    assert "| N=4096 D=128 full | 501 | 598 | 616 | 344 | 0.97 | 1.19 | True |" in text


def test_gluon_dkdv_refuses_what_it_cannot_run():
    from fa2lab.kernels.gluon_bwd import gluon_dkdv, gluon_dkdv_takes
    from fa2lab.kernels.gluon_fwd import HAVE_GLUON

    q, k, v = _qkv(128)
    assert gluon_dkdv_takes(q, k, v) is HAVE_GLUON
    assert not gluon_dkdv_takes(*_qkv(256)) and not gluon_dkdv_takes(*_qkv(128, 64))
    assert not gluon_dkdv_takes(*_qkv(128, dtype=torch.float32))
    lse = torch.zeros(1, 2, 16)
    with pytest.raises(ValueError, match="block_n=128"):
        gluon_dkdv(q, q, k, v, lse, torch.zeros(1, 2, 16), scale=0.1, left=-1, right=0, block_n=64)
    with pytest.raises(ValueError, match="share strides"):
        gluon_dkdv(q, q, k, v, lse, torch.zeros(1, 16, 2).transpose(1, 2), scale=0.1, left=-1, right=0)
    # the one pass's dQ sums: fp32, whole query blocks of rows, pow2(D) columns, and D in (32, 128]
    for bad in (torch.zeros(1, 2, 64, 128, dtype=torch.bfloat16), torch.zeros(1, 2, 16, 128),
                torch.zeros(1, 2, 64, 96), torch.zeros(1, 2, 128, 64).transpose(2, 3)):
        with pytest.raises(ValueError, match=r"dq_sums must be a zeroed float32 \(1, 2, >= 64, 128\)"):
            gluon_dkdv(q, q, k, v, lse, lse, scale=0.1, left=-1, right=0, dq_sums=bad)
    with pytest.raises(ValueError, match="dq_reduce must be 'tma' or 'atomic', got 'bulk'"):
        gluon_dkdv(q, q, k, v, lse, lse, scale=0.1, left=-1, right=0, dq_sums=torch.zeros(1, 2, 64, 128),
                   dq_reduce="bulk")
    q32, k32, v32 = _qkv(32)
    with pytest.raises(ValueError, match="32 < D <= 128, got D=32"):
        gluon_dkdv(q32, q32, k32, v32, lse, lse, scale=0.1, left=-1, right=0, dq_sums=torch.zeros(1, 2, 64, 32))


def test_wide_backward_names_bad_arguments():
    """The wide one pass (kernels/gluon_bwd_wide.py) checks its arguments before any launch."""
    from fa2lab.kernels.gluon_bwd_wide import gluon_bwd_wide, gluon_bwd_wide_takes

    q, k, v = _qkv(256)
    lse = torch.zeros(1, 2, 16)
    sums = torch.zeros(1, 2, 64, 256)
    assert not gluon_bwd_wide_takes(*_qkv(128)) and not gluon_bwd_wide_takes(*_qkv(256, 128))
    with pytest.raises(ValueError, match="128 < D <= 256 with Dv == D, got D=128"):
        gluon_bwd_wide(*(_qkv(128)[:1] * 4), lse, lse, sums, scale=0.1, left=-1, right=0)
    with pytest.raises(ValueError, match="share strides"):
        gluon_bwd_wide(q, q, k, v, lse, torch.zeros(1, 16, 2).transpose(1, 2), sums, scale=0.1, left=-1, right=0)
    for bad in (torch.zeros(1, 2, 64, 256, dtype=torch.bfloat16), torch.zeros(1, 2, 16, 256),
                torch.zeros(1, 2, 64, 200)):
        with pytest.raises(ValueError, match=r"dq_sums must be a zeroed float32 \(1, 2, >= 64, 256\)"):
            gluon_bwd_wide(q, q, k, v, lse, lse, bad, scale=0.1, left=-1, right=0)
    with pytest.raises(ValueError, match="dq_chunk must divide half the head dim \\(128\\)"):
        gluon_bwd_wide(q, q, k, v, lse, lse, sums, scale=0.1, left=-1, right=0, dq_chunk=48)


@pytest.mark.parametrize("bias", [None, "bias"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_backward_config_with_variants_has_triton_kernels_only(monkeypatch, d, bias):
    """Variant calls never take the Gluon kernels (plain calls only), and a bias keeps two stages."""
    from types import SimpleNamespace

    from fa2lab.kernels.hopper_config import hopper_bwd_config

    monkeypatch.setitem(hopper_config.BWD, 128, dict(hopper_config.BWD[128], gluon_dkdvq=(64, 128, 2)))
    kv = SimpleNamespace(var=SimpleNamespace(attn_bias=bias, dropout_p=0.0))
    for causal in (False, True):
        cfg = hopper_bwd_config(d, causal=causal, seq_len=2048, variants=kv)
        assert not set(hopper_config.GLUON_BWD_KEYS) & set(cfg) and "dq" in cfg
        # deterministic: the two passes (the one passes add dQ in a run-dependent order)
        two = hopper_bwd_config(d, causal=causal, seq_len=2048, deterministic=True)
        assert "gluon_dkdvq" not in two and "gluon_wide" not in two
        assert all(len(t) >= 4 for t in cfg.values())
        if bias:
            assert all(t[3] <= 2 for t in cfg.values())
    plain = hopper_bwd_config(d, causal=False, seq_len=4096)
    assert ("gluon_dkdv" in plain) == (d == 128)
    # plain D=128 calls take the one pass (dQ by TMA reduce-adds), its dK/dV-only kernel the fallback;
    # D=256 the wide one pass; D=64 the two passes
    assert (plain.get("gluon_dkdvq"), plain.get("gluon_dkdv")) == (((64, 128, 2), (64, 128, 2)) if d == 128
                                                                  else (None, None))
    assert plain.get("gluon_wide") == ((64, 64, 2, 1, 64, "keys") if d == 256 else None)
    # causal D=256: two dO stages (BWD_CAUSAL); deterministic or windowed calls do not take it
    causal = hopper_bwd_config(d, causal=True, seq_len=2048)
    assert causal.get("gluon_wide") == ((64, 64, 1, 2, 64, "keys") if d == 256 else None)
    # short MHA calls at D=128: the persistent one pass (BWD_SHORT); GQA and longer calls the per-tile one
    short = (64, 128, 2, "persistent") if d == 128 else None
    assert hopper_bwd_config(d, causal=True, seq_len=2048).get("gluon_dkdvq") == short
    assert hopper_bwd_config(d, causal=False, seq_len=1, group=1).get("gluon_dkdvq") == short
    assert hopper_bwd_config(d, causal=True, seq_len=2048, group=4).get("gluon_dkdvq") == plain.get("gluon_dkdvq")
    assert hopper_bwd_config(d, causal=True, seq_len=2049).get("gluon_dkdvq") == plain.get("gluon_dkdvq")
    assert "persistent" not in str(hopper_bwd_config(d, causal=True, seq_len=1024, deterministic=True))


def test_persistent_launch_choices():
    from fa2lab.kernels import gluon_fwd as G

    if not G.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    tile = dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, WS=True, PERSISTENT=True)
    kind, cfg = G._launch_config(tile)
    assert kind == "persistent" and cfg["CONSUMERS"] == 2 and "PERSISTENT" not in cfg
    # two query buffers where they fit beside the K / V ring, one at D=256's 128x64 tile
    assert G._q_stages(cfg, 128)["Q_STAGES"] == 2 and G._q_stages(cfg, 64)["Q_STAGES"] == 2
    assert G._q_stages(dict(cfg, BLOCK_N=64), 256)["Q_STAGES"] == 1
    assert G._q_stages(dict(cfg, Q_STAGES=1), 128)["Q_STAGES"] == 1  # an explicit choice stays
    with pytest.raises(ValueError, match="WS=True"):
        G._launch_config(dict(tile, WS=False))
    with pytest.raises(ValueError, match="PERSISTENT=True"):
        G._launch_config(dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, WS=True, Q_STAGES=2))
    with pytest.raises(ValueError, match="Q_STAGES must be 1 or 2, got 3"):
        G._launch_config(dict(tile, Q_STAGES=3))


def test_masked_calls_take_their_own_tile(monkeypatch):
    """Causal and window calls at a head dim with a GLUON_FWD_MASKED tile launch that tile; full calls
    and head dims without one launch GLUON_FWD's (the launch itself is recorded, not run)."""
    from fa2lab.kernels import gluon_fwd as G

    if not G.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    launched, options = [], []

    class Recorder:  # stands in for a KernelLaunch: records what would launch
        def __init__(self, kind):
            self.kind = kind

        def launch(self, grid, tensors, scalars, constexprs, static):
            hash(static)  # a valid signature part
            options.append(constexprs)
            launched.append((self.kind, constexprs["BLOCK_M"], constexprs.get("CONSUMERS")))

    monkeypatch.setattr(G, "_LAUNCH", {kind: Recorder(kind) for kind in ("ws", "one", "persistent")})
    monkeypatch.setattr(G, "_sm_count", lambda t: 132)
    monkeypatch.setattr("fa2lab.kernels.hopper_fwd.ensure_allocator", lambda: None)
    for d, left, right in [(64, -1, -1), (64, -1, 0), (64, 100, 0), (128, -1, 0), (128, -1, -1)]:
        q, k, v = _qkv(d)
        launched.clear()
        G.gluon_fwd(q, k, v, scale=0.1, left=left, right=right)
        masked = left >= 0 or right >= 0
        tile = (GLUON_FWD_MASKED.get(d) if masked else None) or GLUON_FWD[d]
        assert launched == [("persistent" if tile.get("PERSISTENT") else "ws", tile["BLOCK_M"],
                             tile.get("CONSUMERS", 2))], (d, left, right)
    assert GLUON_FWD_MASKED[64]["BLOCK_M"] != GLUON_FWD[64]["BLOCK_M"]  # the case above tells them apart
    # a repeated call reuses its plan; a table entry changed in place (a benchmark's sweep) makes a new one
    q, k, v = _qkv(128)
    G.gluon_fwd(q, k, v, scale=0.1, left=-1, right=0)
    plans = len(G._PLANS)
    G.gluon_fwd(q, k, v, scale=0.1, left=-1, right=0)
    assert len(G._PLANS) == plans
    monkeypatch.setitem(GLUON_FWD, 128, dict(GLUON_FWD[128], BLOCK_N=64, STAGES=3))
    launched.clear()
    G.gluon_fwd(q, k, v, scale=0.1, left=-1, right=0)
    assert len(G._PLANS) == plans + 1 and (options[-1]["BLOCK_N"], options[-1]["STAGES"]) == (64, 3)


def test_persistent_sections_and_box_strides():
    from fa2lab.kernels import gluon_fwd as G

    # causal order: heads grouped so that a section's K and V take about L2_SECTION_BYTES
    per_head = 2 * 1024 * 128 * 2  # K and V of one head, N=1024, D=128, bf16
    assert G._section(16, 16, 1024, 128, 2) == G.L2_SECTION_BYTES // per_head
    assert G._section(32, 8, 1024, 128, 2) == 4 * G._section(16, 16, 1024, 128, 2)  # GQA 4:1 shares K and V
    assert G._section(1, 1, 1 << 24, 256, 2) == 1  # one head larger than the section: one at a time
    # size-1 dimensions get a valid stride; a broadcast dimension of size > 1 is refused
    t = torch.zeros(1, 1, 10, 64)[:, :, :, :]
    assert G._box_strides(t) == (640, 640, 64)
    wide = torch.zeros(2, 3, 10, 64)
    assert G._box_strides(wide) == wide.stride()[:3] and G._box_strides_ok(wide)
    assert not G._box_strides_ok(torch.zeros(2, 1, 10, 64).expand(2, 3, 10, 64))
    assert G._box_strides_ok(torch.zeros(1, 10, 64).expand(1, 1, 10, 64)[None][0])
