"""Bytes moved between off-chip memory (HBM, DRAM) and on-chip memory, per algorithm.

Counts are exact for the schedule they are given (`fa2lab.tiled.schedule`), per whole call, with
`elem` bytes per element of Q/K/V/O and 4-byte float32 statistics (m, l, LSE, Delta) and partials.
Caches are ignored: every load the algorithm issues counts, as in the FA paper's analysis.

    naive   S = QK^T written, read; P written, read (Standard Attention, FA paper Algorithm 0):
            per head  elem * (Nq*D + Nk*D + 4*Nq*Nk + Nk*Dv + Nq*Dv)
    FA1     outer loop over K/V tiles; Q_i, O_i, l_i, m_i read and O_i, l_i, m_i written once
            per computed tile (FA paper, Algorithm 1)
    FA2     outer loop over Q tiles; Q_i read and O_i, LSE_i written once, K_j/V_j read once per
            computed tile (FA2 paper, Algorithm 1)
    FA2 bwd K_j, V_j read and dK_j, dV_j written once; Q_i, dO_i, LSE_i, Delta_i read and dQ_i
            (float32) read + written per computed tile (FA2 paper, Algorithm 2)
    split-K decode: K and V read once; each split writes a partial O and LSE (float32) that a
            second pass reads back (Flash-Decoding)

FA paper Theorem 2: FlashAttention makes Theta(N^2 d^2 / M) HBM accesses for SRAM size M
(d <= M <= N d). `theorem2_bytes` gives that term with constant 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fa2lab.tiled.schedule import Schedule

STAT = 4  # bytes of a float32 statistic (m, l, LSE, Delta) or partial-output element


@dataclass(frozen=True)
class Traffic:
    """Bytes read and written, with the terms that make them up (name -> bytes)."""

    read: int
    written: int
    terms: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.read + self.written


def _traffic(reads: dict, writes: dict) -> Traffic:
    terms = {f"read {k}": int(v) for k, v in reads.items()} | {f"write {k}": int(v) for k, v in writes.items()}
    return Traffic(int(sum(reads.values())), int(sum(writes.values())), terms)


def naive_bytes(b: int, hq: int, nq: int, nk: int, d: int, dv: int | None = None, *, elem: int = 2) -> Traffic:
    """Standard attention, every (Nq, Nk) matrix through memory (per query head: K/V expanded for GQA)."""
    dv = dv or d
    heads = b * hq
    return _traffic(
        {"Q, K": heads * elem * (nq + nk) * d, "S": heads * elem * nq * nk, "P": heads * elem * nq * nk,
         "V": heads * elem * nk * dv},
        {"S": heads * elem * nq * nk, "P": heads * elem * nq * nk, "O": heads * elem * nq * dv})


def fa1_bytes(sched: Schedule, b: int, hq: int, d: int, dv: int | None = None, *, elem: int = 2) -> Traffic:
    """FA1 forward: K/V once; Q_i, O_i, l_i, m_i in and O_i, l_i, m_i out for every computed tile."""
    dv = dv or d
    heads = b * hq
    return _traffic(
        {"K, V": heads * elem * sched.nk * (d + dv), "Q_i": heads * elem * sched.q_rows * d,
         "O_i": heads * elem * sched.q_rows * dv, "l_i, m_i": heads * 2 * STAT * sched.q_rows},
        {"O_i": heads * elem * sched.q_rows * dv, "l_i, m_i": heads * 2 * STAT * sched.q_rows})


def fa2_forward_bytes(sched: Schedule, b: int, hq: int, d: int, dv: int | None = None, *, elem: int = 2,
                      hkv: int | None = None, pack_gqa: bool = False) -> Traffic:
    """FA2 forward. With `pack_gqa`, the G = Hq/Hkv heads of a group share each K/V tile load."""
    dv = dv or d
    heads = b * hq
    kv_heads = b * (hkv or hq) if pack_gqa else heads
    return _traffic(
        {"Q": heads * elem * sched.nq * d, "K_j, V_j": kv_heads * elem * sched.kv_rows * (d + dv)},
        {"O": heads * elem * sched.nq * dv, "LSE": heads * STAT * sched.nq})


def fa2_backward_bytes(sched: Schedule, b: int, hq: int, d: int, dv: int | None = None, *,
                       elem: int = 2) -> Traffic:
    """FA2 backward including the Delta = rowsum(dO * O) preprocessing and the dQ conversion."""
    dv = dv or d
    heads, nq, nk, rows = b * hq, sched.nq, sched.nk, sched.q_rows
    return _traffic(
        {"O, dO (Delta)": heads * elem * nq * dv * 2, "K_j, V_j": heads * elem * nk * (d + dv),
         "Q_i, dO_i": heads * elem * rows * (d + dv), "LSE_i, Delta_i": heads * 2 * STAT * rows,
         "dQ_i (fp32)": heads * STAT * rows * d, "dQ (convert)": heads * STAT * nq * d},
        {"Delta": heads * STAT * nq, "dK_j, dV_j": heads * elem * nk * (d + dv),
         "dQ_i (fp32)": heads * STAT * rows * d, "dQ": heads * elem * nq * d})


def fa2_backward_two_pass_bytes(sched: Schedule, b: int, hq: int, d: int, dv: int | None = None, *,
                                elem: int = 2) -> Traffic:
    """The backward in two passes (no cross-block adds): a dK/dV pass that streams Q_i, dO_i past each
    key block, then a dQ pass that streams K_j, V_j past each query block, each writing its gradients
    once; Delta's preprocessing as in `fa2_backward_bytes`."""
    dv = dv or d
    heads, nq, nk, rows = b * hq, sched.nq, sched.nk, sched.q_rows
    return _traffic(
        {"O, dO (Delta)": heads * elem * nq * dv * 2, "K_j, V_j (dK/dV pass)": heads * elem * nk * (d + dv),
         "Q_i, dO_i (dK/dV pass)": heads * elem * rows * (d + dv), "LSE_i, Delta_i": heads * 2 * STAT * rows,
         "Q, dO, LSE, Delta (dQ pass)": heads * (elem * nq * (d + dv) + 2 * STAT * nq),
         "K_j, V_j (dQ pass)": heads * elem * sched.kv_rows * (d + dv)},
        {"Delta": heads * STAT * nq, "dK_j, dV_j": heads * elem * nk * (d + dv), "dQ": heads * elem * nq * d})


def split_k_decode_bytes(b: int, hq: int, hkv: int, cache_len: int, d: int, dv: int | None = None, *,
                         splits: int = 1, elem: int = 2) -> Traffic:
    """One query token per sequence against `cache_len` keys; query heads packed per KV head."""
    dv = dv or d
    if splits < 1 or splits > cache_len:
        raise ValueError(f"expected 1 <= splits <= cache_len ({cache_len}), got {splits}")
    reads = {"K, V": b * hkv * elem * cache_len * (d + dv), "q": b * hq * elem * d * splits}
    writes = {"O": b * hq * elem * dv}
    if splits > 1:
        partial = b * hq * splits * (dv + 1) * STAT  # partial O and LSE per split, float32
        writes["partial O, LSE"] = partial
        reads["partial O, LSE (merge)"] = partial
    return _traffic(reads, writes)


def theorem2_bytes(b: int, hq: int, n: int, d: int, m_bytes: int, *, elem: int = 2) -> float:
    """FA paper Theorem 2, Theta(N^2 d^2 / M) accesses (constant 1), in bytes; M in bytes of SRAM."""
    m = m_bytes / elem
    if not d <= m <= n * d:
        raise ValueError(f"Theorem 2 holds for d <= M <= N*d elements; got d={d}, M={m:.0f}, N*d={n * d}")
    return b * hq * elem * n * n * d * d / m


def fa_paper_tiles(m_bytes: int, d: int, elem: int = 2) -> tuple[int, int]:
    """(Br, Bc) of FA Algorithm 1 line 1 for an SRAM of m_bytes: Bc = ceil(M/4d), Br = min(Bc, d)."""
    bc = math.ceil(m_bytes / elem / (4 * d))
    return min(bc, d), bc
