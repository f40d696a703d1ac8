"""Floating-point operations of attention: the conventional formula and exact counts.

Forward: two matmuls per visible (query, key) pair, QK^T (2*D FLOPs) and PV (2*Dv FLOPs):

    flops_fwd = 2 * B * Hq * pairs * (D + Dv)      = 4*B*Hq*Nq*Nk*D without a mask, D == Dv
    flops_bwd = 2.5 * flops_fwd                     5 matmuls instead of 2 (FA2 paper, section 4.1)

`formula_flops` is the convention of the FA papers and of ANCHORS.md (halved for causal when
Nq == Nk, which counts N^2/2 pairs where the exact count is N(N+1)/2). `exact_flops` counts the
visible pairs of any causal/window mask; `executed_flops` counts what a tiled kernel computes,
whole partial tiles included; `varlen_flops` sums per sequence.
"""

from __future__ import annotations

from fa2lab.tiled.schedule import tile_schedule, visible_pairs

BWD_FACTOR = 2.5


def _mode_factor(mode: str) -> float:
    factors = {"fwd": 1.0, "bwd": BWD_FACTOR, "fwd+bwd": 1.0 + BWD_FACTOR}
    if mode not in factors:
        raise ValueError(f"expected mode in {sorted(factors)}, got {mode!r}")
    return factors[mode]


def formula_flops(b: int, hq: int, nq: int, nk: int, d: int, *, causal: bool = False, mode: str = "fwd") -> float:
    """4*B*Hq*Nq*Nk*D, halved for causal when Nq == Nk (the FA papers' convention)."""
    flops = 4.0 * b * hq * nq * nk * d  # 2 matmuls of 2*Nq*Nk*D
    if causal and nq == nk:
        flops /= 2
    return flops * _mode_factor(mode)


def exact_flops(b: int, hq: int, nq: int, nk: int, d: int, dv: int | None = None, *, causal: bool = False,
                window_size: tuple[int, int] = (-1, -1), mode: str = "fwd") -> float:
    """Matmul FLOPs over the visible pairs only."""
    pairs = visible_pairs(nq, nk, causal, window_size)
    return 2.0 * b * hq * pairs * (d + (dv or d)) * _mode_factor(mode)


def executed_flops(b: int, hq: int, nq: int, nk: int, d: int, dv: int | None = None, *, block_q: int,
                   block_k: int, causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                   mode: str = "fwd") -> float:
    """Matmul FLOPs of every computed tile, masked elements of partial tiles included."""
    sched = tile_schedule(nq, nk, block_q, block_k, causal, window_size)
    return 2.0 * b * hq * sched.computed_elements * (d + (dv or d)) * _mode_factor(mode)


def varlen_flops(seqlens_q: list[int], seqlens_k: list[int], hq: int, d: int, dv: int | None = None, *,
                 causal: bool = False, window_size: tuple[int, int] = (-1, -1), mode: str = "fwd") -> float:
    """A packed batch of sequences: the sum of each sequence's exact count."""
    if len(seqlens_q) != len(seqlens_k):
        raise ValueError(f"expected as many query as key lengths, got {len(seqlens_q)} and {len(seqlens_k)}")
    return sum(exact_flops(1, hq, nq, nk, d, dv, causal=causal, window_size=window_size, mode=mode)
               for nq, nk in zip(seqlens_q, seqlens_k) if nq and nk)
