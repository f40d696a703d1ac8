"""How many splits a decode runs: one function, `num_splits(backend, ...)`, for every decode path
(fa2lab.decode_attention, the KV-cache session) and for the cost model (fa2lab.cost.decode_splits),
so that a prediction uses the split count that decode actually runs. Each implementation keeps the
rule that suits its tiles: the PyTorch split-K FlashAttention-2's wave-efficiency rule over tiles
of 512 keys (`auto_num_splits`), the Triton kernel enough programs per SM over tiles of 64 keys.
Tests: tests/test_decode.py, tests/test_hardware.py.
"""

from __future__ import annotations

from fa2lab.decode.splitk import auto_num_splits

KERNEL_BLOCK_N = 64  # keys per tile of the Triton decode kernel (fa2lab.kernels.decode.DECODE_BLOCK_N; a test checks)
# Programs per SM the kernel's splits aim at: the best geometric mean over the dense cases of
# `python -m fa2lab.bench.decode_gpu --tune` on the H200 (2026-12-02, BENCHMARKS.md; kernel-only).
KERNEL_PROGRAMS_PER_SM = 2
MAX_SPLITS = 128  # the kernel's fused merge holds (splits x Dv) fp32 values of one row in registers (kernels.decode.MAX_SPLITS; a test checks)


def kernel_num_splits(work_items: int, cache_len: int, num_sms: int, block_n: int = KERNEL_BLOCK_N,
                      programs_per_sm: int | None = None) -> int:
    """Decode is memory-bound: a GPU reaches its bandwidth only with several programs per SM in
    flight, so split until work_items (B*Hkv*row tiles) * splits fills `programs_per_sm` per SM,
    but never past one wave (rounded down: 5 splits of B*Hkv = 64 would launch 320 programs for 264
    places, a second wave of 56 whole chunks), keeping >= 2 tiles a split and none empty. cache_len:
    the capacity (a plan never reads the lengths)."""
    per_sm = KERNEL_PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm
    want = max(1, per_sm * num_sms // max(1, work_items))
    splits = max(1, min(want, cache_len // (2 * block_n), MAX_SPLITS))
    # The kernel gives each split ceil(tiles / splits) tiles: drop the splits that would be left
    # with none at full capacity (33 splits of 512 tiles use 32; the 33rd only costs the merge).
    tiles = max(1, -(-cache_len // block_n))
    return -(-tiles // -(-tiles // splits))


def num_splits(backend: str, work_items: int, cache_len: int, num_units: int) -> int:
    """The split count `backend` ("triton" or the PyTorch "tiled") runs for B*Hkv = `work_items`
    against `cache_len` keys on `num_units` SMs (GPU) or threads (CPU)."""
    if backend == "triton":
        return kernel_num_splits(work_items, cache_len, num_units)
    return auto_num_splits(work_items, cache_len, num_units)


__all__ = ["KERNEL_BLOCK_N", "KERNEL_PROGRAMS_PER_SM", "MAX_SPLITS", "auto_num_splits", "kernel_num_splits", "num_splits"]
