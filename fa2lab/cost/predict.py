"""Roofline predictions for one FA2 forward launch, one FA2 backward (one pass or two) and one split-K
decode, with the tiles and the split count a profile implies (fa2lab.cost.tiles) on FA2's exact tile
schedule and byte count."""

from __future__ import annotations

from fa2lab.cost.roofline import Roofline, roofline
from fa2lab.cost.tiles import decode_splits, tile_config
from fa2lab.cost.traffic import (fa2_backward_bytes, fa2_backward_two_pass_bytes, fa2_forward_bytes,
                                 split_k_decode_bytes)
from fa2lab.hardware.profile import HardwareProfile, dtype_bytes
from fa2lab.tiled.schedule import tile_schedule


def fa2_forward(profile: HardwareProfile, b: int, hq: int, nq: int, nk: int, d: int, dtype="float16", *,
                causal: bool = False, window_size=(-1, -1), hkv: int | None = None, block_q: int | None = None,
                block_k: int | None = None, cache_reuse: bool = True) -> Roofline:
    """One FA2 forward kernel launch with the profile's tiles (or the given ones).

    The FA paper counts every K_j/V_j load as off-chip traffic. On a real GPU the query tiles of
    one head run at about the same time and re-read K/V from L2: with `cache_reuse` (default), when
    the K/V of the heads in flight fit the last-level cache, K and V cost one read per head.
    """
    if block_q is None or block_k is None:
        cfg = tile_config(profile, d, dtype, causal, batch_heads=b * hq, seq_len=nq)
        block_q, block_k = cfg.block_q, cfg.block_k
    elem = dtype_bytes(dtype)
    sched = tile_schedule(nq, nk, block_q, block_k, causal, window_size)
    elems = b * hq * sched.computed_elements  # scores computed, masked ones of partial tiles included
    nbytes = fa2_forward_bytes(sched, b, hq, d, elem=elem, hkv=hkv).total
    heads_in_flight = -(-profile.units // sched.q_tiles)  # a head's query tiles run side by side
    if cache_reuse and heads_in_flight * nk * 2 * d * elem <= profile.llc_bytes:
        reread = b * hq * (sched.kv_rows - nk) * 2 * d * elem  # loads after the first come from L2
        nbytes -= max(0, reread)
    return roofline(profile, 4.0 * d * elems, nbytes, dtype, exps=elems, overhead=profile.step_overhead_s)


def fa2_backward(profile: HardwareProfile, b: int, hq: int, nq: int, nk: int, d: int, dtype="float16", *,
                 causal: bool = False, window_size=(-1, -1), block_q: int = 64, block_k: int = 128,
                 passes: int = 1, cache_reuse: bool = True) -> Roofline:
    """One FA2 backward over the same tile schedule as the forward. Per computed score, one pass
    (FA2's Algorithm 2, FA3; dQ added across key blocks) runs 5 matmuls (S, dP, dV, dK, dQ) and one
    exp; two passes (a dK/dV kernel, then a dQ kernel that recomputes S and dP: no cross-block adds)
    run 7 and two. Bytes: `fa2_backward_bytes` for one pass (FA2's count: each tile reads and writes
    its dQ_i rows in fp32 off-chip; where those adds stay in L2, as Hopper's reduce-adds mostly do, a
    kernel can beat this memory roof), `fa2_backward_two_pass_bytes` for two. With `cache_reuse`
    (default), as in `fa2_forward`: where what a head's programs re-read (the dK/dV pass: Q_i, dO_i
    and, in one pass, the fp32 dQ rows; the dQ pass: K_j, V_j) fits the last-level cache for the heads
    in flight, it costs one off-chip pass per head."""
    if passes not in (1, 2):
        raise ValueError(f"passes must be 1 (dQ added across key blocks) or 2 (a separate dQ kernel), got {passes}")
    sched = tile_schedule(nq, nk, block_q, block_k, causal, window_size)
    elems = b * hq * sched.computed_elements
    elem = dtype_bytes(dtype)
    count = fa2_backward_bytes if passes == 1 else fa2_backward_two_pass_bytes
    nbytes = count(sched, b, hq, d, elem=elem).total
    if cache_reuse:
        heads = b * hq
        per_q_row = 2 * d * elem + (2 * 4 * d if passes == 1 else 0)  # Q_i, dO_i (+ dQ_i fp32 read and write)
        if -(-profile.units // sched.k_tiles) * nq * per_q_row <= profile.llc_bytes:  # the dK/dV pass
            nbytes -= heads * max(0, sched.q_rows - nq) * per_q_row
        if passes == 2 and -(-profile.units // sched.q_tiles) * nk * 2 * d * elem <= profile.llc_bytes:  # dQ pass
            nbytes -= heads * max(0, sched.kv_rows - nk) * 2 * d * elem
    matmuls = 5 if passes == 1 else 7
    return roofline(profile, 2.0 * d * elems * matmuls, nbytes, dtype, exps=elems * passes,
                    overhead=passes * profile.step_overhead_s)


def decode(profile: HardwareProfile, b: int, hq: int, hkv: int, cache_len: int, d: int, dtype="float16", *,
           splits: int | None = None) -> Roofline:
    """Decode one token per sequence against `cache_len` cached keys, split-K as the profile picks."""
    if splits is None:
        splits = decode_splits(profile, b, hkv, cache_len)
    nbytes = split_k_decode_bytes(b, hq, hkv, cache_len, d, splits=splits, elem=dtype_bytes(dtype)).total
    elems = b * hq * cache_len
    launches = 2 if splits > 1 else 1  # split kernel + merge kernel
    # matmul-vector products: tensor cores do not help a single query row
    return roofline(profile, 4.0 * d * elems, nbytes, dtype, exps=elems,
                    overhead=launches * profile.step_overhead_s, tensor_cores=False)
