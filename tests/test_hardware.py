"""Hardware profiles: sources for every number, tiles that fit, detection, YAML loading."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from fa2lab.cost.tiles import REG_BASE, decode_splits, tile_config
from fa2lab.hardware import HardwareProfile, detect, dtype_bytes, get_profile, list_profiles, load_profile
from fa2lab.hardware.detect import cpu_caches

NAMES = ["gtx1080", "t4", "a100", "rtx4090", "h100", "h200", "i5-10210u", "cpu-generic"]
# Hardware numbers that must say where they come from.
SOURCED = ["units", "clock_hz", "smem_per_block", "smem_per_unit", "l1_bytes", "llc_bytes", "mem_bw",
           "peak_flops_simd", "exp_per_s", "step_overhead_s", "registers_per_unit", "vector_width"]


def test_builtin_names():
    assert list_profiles() == NAMES
    assert get_profile("H100").name == "h100"


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown hardware profile 'v100'.*gtx1080.*cpu-generic"):
        get_profile("v100")


def test_every_field_has_a_why():
    for f in dataclasses.fields(HardwareProfile):
        assert f.metadata.get("why"), f"field {f.name} has no 'why'"


@pytest.mark.parametrize("name", NAMES)
def test_every_number_has_a_source(name):
    p = get_profile(name)
    missing = [f for f in SOURCED if f not in p.sources]
    assert not missing, f"{name}: no source for {missing}"
    if not p.is_gpu:
        assert all(f in p.sources for f in ("score_s", "row_s", "mask_s", "spill_factor", "fault_s_per_byte"))
    if p.is_gpu:
        assert p.compute_capability and "compute_capability" in p.sources
        assert p.peak_flops == {} or "peak_flops" in p.sources


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("causal", [False, True])
def test_tiles_fit_on_chip(name, d, dtype, causal):
    p = get_profile(name)
    cfg = tile_config(p, d, dtype, causal)
    assert cfg.derivation and "Bc = ceil(M / 4d)" in cfg.derivation[0]
    if p.is_gpu:
        elem = dtype_bytes(dtype)
        smem = elem * (cfg.block_q * d + cfg.num_stages * 2 * cfg.block_k * d)  # Q_i + stages x (K_j, V_j)
        assert smem == cfg.onchip_bytes <= p.smem_per_block
        regs = math.ceil(cfg.block_q * (d + cfg.block_k) / (32 * cfg.num_warps)) + REG_BASE
        assert regs == cfg.regs_per_thread <= p.max_regs_per_thread
        assert cfg.blocks_per_unit >= 1
        assert regs * 32 * cfg.num_warps <= p.registers_per_unit
    else:
        t, per_core = cfg.block_q, math.ceil(cfg.heads_per_step / p.units)
        assert cfg.onchip_bytes == per_core * 4 * (t * t + 4 * t * d)  # S + Q_i, K_j, V_j, acc in fp32
        assert cfg.onchip_bytes <= max(p.smem_per_block, p.llc_bytes // p.units), cfg.describe()
        if cfg.onchip_bytes > p.smem_per_block:
            assert p.spill_factor > 1 and "spills L2" in cfg.describe()


def test_paper_starting_point_matches_the_design_notes():
    # The notes' "tile 64 for an i5-10210U" is the FA paper's Br = min(Bc, d) for a 256 KB L2, d=64.
    line = tile_config(get_profile("i5-10210u"), 64, "float32").derivation[0]
    assert "ceil(65536 / 256) = 256; Br = min(Bc, d) = 64" in line
    # A100, fp16, d=128: M = 163 KB / 2 B = 83456 elements -> Bc = 163, Br = 128.
    assert "ceil(83456 / 512) = 163; Br = min(Bc, d) = 128" in tile_config(get_profile("a100"), 128).derivation[0]


def test_gpu_tiles_known_cases():
    # FA2's own A100 kernel for d=64 is 128 x 128 with 4 warps; the notes' GTX 10-series tile is 128.
    a100 = tile_config(get_profile("a100"), 64, "float16")
    assert (a100.block_q, a100.block_k, a100.num_warps) == (128, 128, 4)
    pascal = tile_config(get_profile("gtx1080"), 64, "float16")
    assert (pascal.block_q, pascal.block_k, pascal.num_stages) == (128, 128, 1)  # 48 KB exactly
    assert pascal.onchip_bytes == 48 * 1024
    # Hopper: two warpgroups for 128 rows, and Bc <= d, as the H200 tile sweep measured
    # (BENCHMARKS.md, python -m fa2lab.bench.tiles_gpu).
    for name in ("h100", "h200"):
        for d, bc in ((64, 64), (128, 128)):
            cfg = tile_config(get_profile(name), d, "bfloat16")
            assert (cfg.block_q, cfg.block_k, cfg.num_warps, cfg.num_stages) == (128, bc, 8, 3)


def test_cpu_tiles_follow_cache_heads_and_length():
    p = get_profile("cpu-generic")
    one = tile_config(p, 64, "float32", batch_heads=p.units)
    many = tile_config(p, 64, "float32", batch_heads=16 * p.units)
    assert many.block_q <= one.block_q  # more heads per core: smaller tiles stay in L2
    bigger_l2 = dataclasses.replace(p, smem_per_block=4 * p.smem_per_block, smem_per_unit=4 * p.smem_per_unit)
    assert tile_config(bigger_l2, 64, "float32", batch_heads=16 * p.units).block_q >= many.block_q
    short = tile_config(p, 64, "float32", causal=True, seq_len=100, batch_heads=p.units)
    assert short.block_q <= 128  # never a tile beyond the sequence
    # Without per-step and per-row costs nothing pays for big tiles, and causal waste favours small ones.
    free = dataclasses.replace(p, step_overhead_s=0.0, row_s=0.0)
    assert tile_config(free, 64, "float32", causal=True, seq_len=4096).block_q == 16


def test_tile_config_rejects_bad_input():
    with pytest.raises(ValueError, match="head_dim"):
        tile_config(get_profile("h100"), 0)
    with pytest.raises(ValueError, match="unsupported dtype"):
        tile_config(get_profile("h100"), 64, "int8")


def test_decode_splits_hand_computed():
    h100 = get_profile("h100")
    # The Triton kernel on a GPU: 2 programs per SM in flight, >= 2 tiles of 64 keys per split.
    # 2 * 132 // 8 = 33 would give 512 tiles 16 a split: 32 splits take them all, the 33rd none.
    assert decode_splits(h100, 1, 8, 32768) == 32
    assert decode_splits(h100, 1, 8, 131072) == 33  # 2048 tiles, 63 a split: the 33rd gets 32
    assert decode_splits(h100, 64, 8, 4096) == 1  # ceil(264 / 512)
    assert decode_splits(h100, 1, 8, 256) == 2  # only 256 // 128 = 2 splits of 2 tiles
    # The PyTorch split-K on a CPU: FA2's rule, 8 work items already fill 4 cores.
    assert decode_splits(get_profile("cpu-generic"), 1, 8, 100_000) == 1
    assert decode_splits(h100, 1, 8, 32768, backend="tiled") == 15  # FA2's rule over 64 tiles of 512


@pytest.mark.parametrize("backend", ["tiled", "triton"])
def test_the_cost_model_predicts_the_split_count_decode_runs(monkeypatch, backend):
    import fa2lab.decode.api as decode_api
    import fa2lab.kernels.decode as kernel_decode
    from fa2lab.decode import decode_attention

    profile = get_profile("h100")
    seen = []
    monkeypatch.setattr(decode_api, "default_num_units", lambda device: profile.units)
    for module, name in ((decode_api, "splitk_decode"), (kernel_decode, "decode_triton")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, **kw: seen.append(kw["num_splits"]) or real(*a, **kw))
    q, kc = torch.randn(1, 8, 1, 16), torch.randn(1, 2, 3000, 16)
    decode_attention(q, kc, kc, backend=backend)
    assert seen == [decode_splits(profile, 1, 2, 3000, backend=backend)]
    from fa2lab.decode.splits import KERNEL_BLOCK_N, MAX_SPLITS

    assert kernel_decode.DECODE_BLOCK_N == KERNEL_BLOCK_N and kernel_decode.MAX_SPLITS == MAX_SPLITS


def test_flops_fallbacks():
    gtx = get_profile("gtx1080")
    assert gtx.flops("float16") == gtx.peak_flops_simd["float32"]  # fp16 at 1/64: upcast wins
    assert get_profile("h100").flops("bfloat16") == 989.4e12
    assert get_profile("h100").flops("bfloat16", tensor_cores=False) == 133.8e12


def test_detect_this_machine():
    p = detect()
    assert p.kind in ("cpu", "gpu")
    if p.kind == "cpu":
        assert p.units == os.cpu_count()
        caches = cpu_caches()
        if 2 in caches:
            assert p.smem_per_block == caches[2]["size"] // caches[2]["shared_cpus"]
        tile_config(p, 64, "float32")  # a detected profile derives tiles like a built-in one


def test_cpu_caches_from_fake_sysfs(tmp_path):
    for i, (level, kind, size, shared) in enumerate([(1, "Data", "48K", "0"), (1, "Instruction", "32K", "0"),
                                                     (2, "Unified", "2048K", "0-1"), (3, "Unified", "105M", "0-7")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
            (d / name).write_text(f"{value}\n")
    caches = cpu_caches(tmp_path)
    assert caches == {1: {"size": 48 * 1024, "shared_cpus": 1}, 2: {"size": 2 * 2**20, "shared_cpus": 2},
                      3: {"size": 105 * 2**20, "shared_cpus": 8}}


def test_load_profile_from_yaml(tmp_path):
    path = tmp_path / "a100_40.yaml"
    path.write_text("base: a100\nname: a100-40gb\nmem_bw: 1.555 * TB\nsmem_per_block: 163 * KiB\n"
                    "sources: {mem_bw: 'A100 40GB datasheet'}\n")
    p = load_profile(path)
    assert p.name == "a100-40gb" and p.mem_bw == 1.555e12 and p.smem_per_block == 163 * 1024
    assert p.sources["mem_bw"] == "A100 40GB datasheet" and p.units == 108
    full = tmp_path / "tiny.yaml"
    full.write_text("name: tiny\nkind: cpu\narch: toy\ncompute_capability: null\nunits: 1\nclock_hz: 1.0e9\n"
                    "smem_per_block: 64 * KiB\nsmem_per_unit: 64 * KiB\nl1_bytes: 32768\nllc_bytes: 1048576\n"
                    "registers_per_unit: 128\nmax_regs_per_thread: 0\nmax_threads_per_unit: 1\nvector_width: 8\n"
                    "mem_bw: 10 * GB\npeak_flops_simd: {float32: 32 * G}\n")
    tiny = load_profile(full)
    assert tiny.peak_flops_simd == {"float32": 32e9} and tile_config(tiny, 64, "float32").block_q >= 16


def test_load_profile_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: a100\nmem_bandwidth: 1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['mem_bandwidth'\]"):
        load_profile(bad)
    partial = tmp_path / "partial.yaml"
    partial.write_text("name: x\nkind: gpu\n")
    with pytest.raises(ValueError, match="missing fields"):
        load_profile(partial)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("base: t4\nkind: tpu\n")
    with pytest.raises(ValueError, match="kind must be 'cpu' or 'gpu'"):
        load_profile(wrong)


def test_tile_choice_moved_to_cost_with_deprecated_aliases():
    import fa2lab.hardware as hardware

    p = get_profile("a100")
    with pytest.warns(DeprecationWarning, match="moved to fa2lab.cost.tile_config"):
        assert hardware.tile_config(p, 64) == tile_config(p, 64)
    with pytest.warns(DeprecationWarning, match="HardwareProfile.decode_splits"):
        assert p.decode_splits(1, 8, 4096) == decode_splits(p, 1, 8, 4096)
    with pytest.warns(DeprecationWarning, match="TileConfig.block_m is now block_q"):
        assert tile_config(p, 64).block_m == tile_config(p, 64).block_q
