"""Split-K decode in Triton (Flash-Decoding): partial kernel + merge kernel.

Partial: one program per (batch x K/V head, split). The G query heads of the K/V head and the Nq
new tokens are packed as the rows of one tile (row r: query r // G of head hk*G + r % G), so each
K/V byte is read once per split for the whole group. K/V come from a dense cache or, through a
block table, from pages of any size. Each program writes its partial output (fp32) and LSE.
Merge: one program per (batch, query head, query row) combines the splits by their LSEs.

Readable twin: fa2lab/decode/splitk.py (and merge.py). Tests: tests/test_decode.py, tests/test_triton_gpu.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fa2lab.kernels.common import LOG2E, LOG2E_K, dot, ieee_dot, online_softmax_step, pow2


@triton.jit
def _decode_partial_kernel(
    Q, K, V, SEQLENS, BT, OP, LP,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbt_b,
    sop_s, sop_b, sop_h, sop_m, sop_d, slp_s, slp_b, slp_h, slp_m,
    HKV, Nq, G, qk_scale, LEFT, RIGHT, KEYS_PER_SPLIT,
    D: tl.constexpr, D_V: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    L = tl.load(SEQLENS + b)
    r = tl.arange(0, BLOCK_M)
    row_ok = r < G * Nq
    qi = r // G  # query position among the Nq new tokens
    h = hk * G + r % G
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q = tl.load(Q + b.to(tl.int64) * sqb + h[:, None] * sqh + qi[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_M, HEAD_DIM)
    qpos = L - Nq + qi  # absolute position of each query row

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    j0 = split * KEYS_PER_SPLIT
    j1 = tl.minimum(j0 + KEYS_PER_SPLIT, L)
    if HAS_LEFT:  # keys left of every row's window are never loaded
        j0 = tl.maximum(j0, ((L - Nq - LEFT) // BLOCK_N) * BLOCK_N)
    for start in range(j0, j1, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < j1
        if PAGED:
            page = tl.load(BT + b.to(tl.int64) * sbt_b + cols // PAGE_SIZE, mask=col_ok, other=0)
            k_row = page.to(tl.int64) * skb + (cols % PAGE_SIZE) * skn
            v_row = page.to(tl.int64) * svb + (cols % PAGE_SIZE) * svn
        else:
            k_row = b.to(tl.int64) * skb + cols.to(tl.int64) * skn
            v_row = b.to(tl.int64) * svb + cols.to(tl.int64) * svn
        k = tl.load(K + hk * skh + k_row[:, None] + offs_d[None, :] * skd,
                    mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_N, HEAD_DIM)
        v = tl.load(V + hk * svh + v_row[:, None] + offs_dv[None, :] * svd,
                    mask=col_ok[:, None] & (offs_dv[None, :] < D_V), other=0.0)  # (BLOCK_N, HEAD_DIM_V)
        s = dot(q, tl.trans(k), IEEE_DOT) * qk_scale  # (BLOCK_M, BLOCK_N) logits in log2 units
        valid = col_ok[None, :] & row_ok[:, None]
        if HAS_LEFT:
            valid = valid & (cols[None, :] >= qpos[:, None] - LEFT)
        if HAS_RIGHT:
            valid = valid & (cols[None, :] <= qpos[:, None] + RIGHT)
        s = tl.where(valid, s, float("-inf"))
        p, alpha, l_i, m_i = online_softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE_DOT)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))  # log2 units
    o_ptr = OP + split * sop_s + b * sop_b + h[:, None] * sop_h + qi[:, None] * sop_m + offs_dv[None, :] * sop_d
    tl.store(o_ptr, out, mask=row_ok[:, None] & (offs_dv[None, :] < D_V))
    tl.store(LP + split * slp_s + b * slp_b + h * slp_h + qi * slp_m, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(OP, LP, O, LSE, S, ROWS, sop_s, slp_s,
                         D_V: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)  # flat (b, h, i) index into contiguous (B, Hq, Nq)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM_V)
    lse = tl.load(LP + offs_s * slp_s + row, mask=offs_s < S, other=float("-inf"))  # (BLOCK_S,) log2
    m = tl.max(lse, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_ref)  # 0 for empty splits
    total = tl.sum(w, 0)
    parts = tl.load(OP + offs_s[:, None] * sop_s + row * D_V + offs_d[None, :],
                    mask=(offs_s[:, None] < S) & (offs_d[None, :] < D_V), other=0.0)  # (BLOCK_S, HEAD_DIM_V)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + row * D_V + offs_d, out.to(O.dtype.element_ty), mask=offs_d < D_V)
    final = tl.where(total == 0.0, float("-inf"), (m_ref + tl.math.log2(tl.where(total == 0.0, 1.0, total))) / LOG2E_K)
    tl.store(LSE + row, final)


DECODE_BLOCK_N = 64  # keys per tile; its split count: fa2lab.decode.splits.kernel_num_splits


def decode_triton(q, k_cache, v_cache, seqlens, *, scale, left, right, num_splits, block_table=None,
                  block_n=DECODE_BLOCK_N, num_warps=4, num_stages=3, max_len=None):
    """q (B, Hq, Nq, D); dense cache (B, Hkv, Nmax, D) or pages (P, Hkv, page, D) + block_table;
    seqlens int32 (B,) -> out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) fp32.

    Splits are planned over `max_len` (default: the cache's capacity), never over the device's
    seqlens: no host-device sync, so a step launches asynchronously and can be captured in a CUDA
    graph. Splits that lie past a sequence's length exit at once (lse = -inf, weight 0)."""
    b, hq, nq, d = q.shape
    hkv, dv = k_cache.shape[1], v_cache.shape[-1]
    group = hq // hkv
    if max_len is None:
        max_len = block_table.shape[1] * k_cache.shape[2] if block_table is not None else k_cache.shape[2]
    out = torch.empty(b, hq, nq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    keys_per_split = triton.cdiv(triton.cdiv(max(max_len, 1), num_splits), block_n) * block_n
    splits = max(1, triton.cdiv(max(max_len, 1), keys_per_split))
    o_part = torch.empty(splits, b, hq, nq, dv, dtype=torch.float32, device=q.device)
    l_part = torch.empty(splits, b, hq, nq, dtype=torch.float32, device=q.device)
    paged = block_table is not None
    page_size = k_cache.shape[2] if paged else 1
    bt = block_table if paged else seqlens
    _decode_partial_kernel[(b * hkv, splits)](
        q, k_cache, v_cache, seqlens, bt, o_part, l_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), bt.stride(0) if paged else 0,
        *o_part.stride(), *l_part.stride(),
        hkv, nq, group, scale * LOG2E, max(left, 0), max(right, 0), keys_per_split,
        D=d, D_V=dv, HEAD_DIM=pow2(d), HEAD_DIM_V=pow2(dv), BLOCK_M=pow2(group * nq), BLOCK_N=block_n,
        PAGE_SIZE=page_size, PAGED=paged, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, IEEE_DOT=ieee_dot(q.dtype),
        num_warps=num_warps, num_stages=num_stages)
    _decode_merge_kernel[(b * hq * nq,)](
        o_part, l_part, out, lse, splits, b * hq * nq, o_part.stride(0), l_part.stride(0),
        D_V=dv, HEAD_DIM_V=pow2(dv), BLOCK_S=max(2, pow2(splits) if splits > 1 else 2), num_warps=1)
    return out, lse
