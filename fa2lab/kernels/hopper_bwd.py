"""FA2 backward for Hopper (sm_90): Algorithm 2 of fa2lab/kernels/bwd.py with TMA loads and split loops.

Same two kernels as the portable backward, same notation (P recomputed from the saved LSE in the
log2 domain, Delta = rowsum(dO * O) - dLSE precomputed by the portable preprocess kernel):

- dK/dV: one program per (key block, batch x K/V head); it walks the G query heads of its K/V
  head and the query blocks that see its keys, so GQA gradients are summed in registers: no
  atomics, no per-query-head copy.
- dQ: one program per (query block, batch x query head), walking the visible key blocks.

Hopper changes: Q, dO (dK/dV kernel) and K, V (dQ kernel) stream through on-device tensor
descriptors, whose zero fill makes rows past the sequence ends contribute nothing (a zero key row
gives dS @ K = 0, a zero query row gives dO = 0 and, with its LSE read as +inf, P = 0), so
only the causal / window edges pay for an element-wise mask; the blocks in between run unmasked.
Stores go through descriptors too (clipped at the ends). Causal programs start longest-first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fa2lab.kernels.bwd import _delta
from fa2lab.kernels.common import LOG2E, LOG2E_K, pow2, seq_offsets
from fa2lab.kernels.hopper_fwd import ensure_allocator


@triton.jit
def _dkdv_blocks(dk, dv, k, v, desc_q, desc_do, LSE_H, DELTA_H, slm, start, stop, cols, nq, off, LEFT, RIGHT,
                 qk_scale, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
                 HAS_RIGHT: tl.constexpr, SWAP_AB: tl.constexpr, WHICH: tl.constexpr):
    for start_m in range(start, stop, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < nq
        q = desc_q.load([start_m, 0])  # (BLOCK_M, HEAD_DIM)
        lse2 = tl.load(LSE_H + rows * slm, mask=row_ok, other=float("inf")) * LOG2E_K
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows with no key: P = 0
        do = desc_do.load([start_m, 0])  # (BLOCK_M, HEAD_DIM_V)
        delta = tl.load(DELTA_H + rows * slm, mask=row_ok, other=0.0)
        if SWAP_AB:
            # S and dP as (BLOCK_M, BLOCK_N) products whose right operands K^T, V^T stay in shared
            # memory; only the small P and dS tiles are transposed. Keeps K and V out of registers
            # where the dK/dV accumulators already fill them (head dim 256).
            s = tl.dot(q, k.T)  # (BLOCK_M, BLOCK_N), unscaled
            p = tl.math.exp2(s * qk_scale - lse2[:, None])
            if MASKED:
                valid = tl.full([BLOCK_M, 1], 1, tl.int1)
                if HAS_LEFT:
                    valid = valid & (cols[None, :] >= rows[:, None] + off - LEFT)
                if HAS_RIGHT:
                    valid = valid & (cols[None, :] <= rows[:, None] + off + RIGHT)
                p = tl.where(valid, p, 0.0)
            if WHICH & 1:
                dv = tl.dot(p.to(do.dtype).T, do, dv)
            if WHICH & 2:
                dp = tl.dot(do, v.T)  # (BLOCK_M, BLOCK_N)
                ds = p * (dp - delta[:, None])
                dk = tl.dot(ds.to(q.dtype).T, q, dk)
        else:
            s_t = tl.dot(k, q.T)  # (BLOCK_N, BLOCK_M) = S^T, unscaled
            p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])  # P^T
            if MASKED:
                valid = tl.full([1, BLOCK_M], 1, tl.int1)
                if HAS_LEFT:
                    valid = valid & (cols[:, None] >= rows[None, :] + off - LEFT)
                if HAS_RIGHT:
                    valid = valid & (cols[:, None] <= rows[None, :] + off + RIGHT)
                p_t = tl.where(valid, p_t, 0.0)
            if WHICH & 1:
                dv = tl.dot(p_t.to(do.dtype), do, dv)
            if WHICH & 2:
                dp_t = tl.dot(v, do.T)  # (BLOCK_N, BLOCK_M) = dP^T
                ds_t = p_t * (dp_t - delta[None, :])
                dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _hopper_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DKEY, DVAL, CU_Q, CU_K,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, slb, slh, slm,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    HKV, Nq, Nk, G, NUM_N, qk_scale, sm_scale, LEFT, RIGHT,
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    IS_VARLEN: tl.constexpr, LONGEST_FIRST: tl.constexpr, SWAP_AB: tl.constexpr, WHICH: tl.constexpr,
):
    pid_n = tl.program_id(0)  # causal: key block 0 is seen by the most queries, so this order is longest-first
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    q_start, nq, k_start, nk = seq_offsets(CU_Q, CU_K, b, Nq, Nk, IS_VARLEN)
    if IS_VARLEN:
        bq = q_start.to(tl.int64) * sqm
        bk = k_start.to(tl.int64) * skn
        bv = k_start.to(tl.int64) * svn
        bdo = q_start.to(tl.int64) * sdom
        bl = q_start.to(tl.int64) * slm
        bdk = k_start.to(tl.int64) * sdkn
        bdv = k_start.to(tl.int64) * sdvn
    else:
        bq = b.to(tl.int64) * sqb
        bk = b.to(tl.int64) * skb
        bv = b.to(tl.int64) * svb
        bdo = b.to(tl.int64) * sdob
        bl = b.to(tl.int64) * slb
        bdk = b.to(tl.int64) * sdkb
        bdv = b.to(tl.int64) * sdvb
    j0 = pid_n * BLOCK_N
    if j0 >= nk:
        return
    desc_k = tl.make_tensor_descriptor(K + bk + hk * skh, shape=[nk, D], strides=[skn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(V + bv + hk * svh, shape=[nk, DV], strides=[svn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM_V])
    k = desc_k.load([j0, 0])  # (BLOCK_N, HEAD_DIM)
    v = desc_v.load([j0, 0])  # (BLOCK_N, HEAD_DIM_V)
    cols = j0 + tl.arange(0, BLOCK_N)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype=tl.float32)

    off = nk - nq
    j_last = tl.minimum(j0 + BLOCK_N, nk) - 1
    lo = 0
    hi = nq
    if HAS_RIGHT:  # rows that see at least one key of [j0, j0 + BLOCK_N)
        lo = (tl.maximum(0, j0 - off - RIGHT) // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.maximum(0, tl.minimum(nq, j_last - off + LEFT + 1))
    # [lo_full, hi_full): query blocks whose every row sees every key of this block.
    lo_full = lo
    if HAS_RIGHT:
        lo_full = tl.minimum(tl.maximum(lo, tl.cdiv(tl.maximum(0, j_last - off - RIGHT), BLOCK_M) * BLOCK_M), hi)
    hi_full = hi
    if HAS_LEFT:
        hi_full = tl.minimum(hi, (tl.maximum(0, j0 - off + LEFT + 1) // BLOCK_M) * BLOCK_M)
    hi_full = tl.maximum(hi_full, lo_full)
    for g in range(0, G):
        h = hk * G + g
        desc_q = tl.make_tensor_descriptor(Q + bq + h * sqh, shape=[nq, D], strides=[sqm, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        desc_do = tl.make_tensor_descriptor(DO + bdo + h * sdoh, shape=[nq, DV], strides=[sdom, 1],
                                            block_shape=[BLOCK_M, HEAD_DIM_V])
        lse_h = LSE + bl + h * slh
        delta_h = DELTA + bl + h * slh
        dk, dv = _dkdv_blocks(dk, dv, k, v, desc_q, desc_do, lse_h, delta_h, slm, lo, lo_full, cols, nq, off, LEFT,
                              RIGHT, qk_scale, BLOCK_M, True, HAS_LEFT, HAS_RIGHT, SWAP_AB, WHICH)
        dk, dv = _dkdv_blocks(dk, dv, k, v, desc_q, desc_do, lse_h, delta_h, slm, lo_full, hi_full, cols, nq, off,
                              LEFT, RIGHT, qk_scale, BLOCK_M, False, HAS_LEFT, HAS_RIGHT, SWAP_AB, WHICH)
        dk, dv = _dkdv_blocks(dk, dv, k, v, desc_q, desc_do, lse_h, delta_h, slm, tl.maximum(hi_full, lo), hi, cols,
                              nq, off, LEFT, RIGHT, qk_scale, BLOCK_M, True, HAS_LEFT, HAS_RIGHT, SWAP_AB, WHICH)
    desc_dk = tl.make_tensor_descriptor(DKEY + bdk + hk * sdkh, shape=[nk, D], strides=[sdkn, 1],
                                        block_shape=[BLOCK_N, HEAD_DIM])
    desc_dv = tl.make_tensor_descriptor(DVAL + bdv + hk * sdvh, shape=[nk, DV], strides=[sdvn, 1],
                                        block_shape=[BLOCK_N, HEAD_DIM_V])
    if WHICH & 2:
        desc_dk.store([j0, 0], (dk * sm_scale).to(DKEY.dtype.element_ty))
    if WHICH & 1:
        desc_dv.store([j0, 0], dv.to(DVAL.dtype.element_ty))


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, desc_k, desc_v, start, stop, rows, off, LEFT, RIGHT, qk_scale,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        k = desc_k.load([start_n, 0])  # (BLOCK_N, HEAD_DIM); rows past nk are zeros and add nothing
        v = desc_v.load([start_n, 0])  # (BLOCK_N, HEAD_DIM_V)
        s = tl.dot(q, k.T)  # (BLOCK_M, BLOCK_N), unscaled
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            cols = start_n + tl.arange(0, BLOCK_N)
            valid = tl.full([BLOCK_N], 1, tl.int1)[None, :]
            if HAS_LEFT:
                valid = valid & (cols[None, :] >= rows[:, None] + off - LEFT)
            if HAS_RIGHT:
                valid = valid & (cols[None, :] <= rows[:, None] + off + RIGHT)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, v.T)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _hopper_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, slb, slh, slm, sdqb, sdqh, sdqm,
    H, Nq, Nk, G, NUM_M, qk_scale, sm_scale, LEFT, RIGHT,
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    IS_VARLEN: tl.constexpr, LONGEST_FIRST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if LONGEST_FIRST:  # causal: the last query block sees the most keys
        pid_m = NUM_M - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    q_start, nq, k_start, nk = seq_offsets(CU_Q, CU_K, b, Nq, Nk, IS_VARLEN)
    if IS_VARLEN:
        bq = q_start.to(tl.int64) * sqm
        bk = k_start.to(tl.int64) * skn
        bv = k_start.to(tl.int64) * svn
        bdo = q_start.to(tl.int64) * sdom
        bl = q_start.to(tl.int64) * slm
        bdq = q_start.to(tl.int64) * sdqm
    else:
        bq = b.to(tl.int64) * sqb
        bk = b.to(tl.int64) * skb
        bv = b.to(tl.int64) * svb
        bdo = b.to(tl.int64) * sdob
        bl = b.to(tl.int64) * slb
        bdq = b.to(tl.int64) * sdqb
    i0 = pid_m * BLOCK_M
    if i0 >= nq:
        return
    desc_q = tl.make_tensor_descriptor(Q + bq + h * sqh, shape=[nq, D], strides=[sqm, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    desc_do = tl.make_tensor_descriptor(DO + bdo + h * sdoh, shape=[nq, DV], strides=[sdom, 1],
                                        block_shape=[BLOCK_M, HEAD_DIM_V])
    desc_k = tl.make_tensor_descriptor(K + bk + hk * skh, shape=[nk, D], strides=[skn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(V + bv + hk * svh, shape=[nk, DV], strides=[svn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM_V])
    rows = i0 + tl.arange(0, BLOCK_M)
    row_ok = rows < nq
    q = desc_q.load([i0, 0])  # (BLOCK_M, HEAD_DIM)
    do = desc_do.load([i0, 0])  # (BLOCK_M, HEAD_DIM_V)
    lse2 = tl.load(LSE + bl + h * slh + rows * slm, mask=row_ok, other=float("inf")) * LOG2E_K
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(DELTA + bl + h * slh + rows * slm, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    off = nk - nq
    i_last = tl.minimum(i0 + BLOCK_M, nq) - 1
    lo = 0
    hi = nk
    if HAS_LEFT:
        lo = (tl.maximum(0, i0 + off - LEFT) // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.maximum(0, tl.minimum(nk, i_last + off + RIGHT + 1))
    lo_full = lo
    if HAS_LEFT:
        lo_full = tl.minimum(tl.maximum(lo, tl.cdiv(tl.maximum(0, i_last + off - LEFT), BLOCK_N) * BLOCK_N), hi)
    hi_full = hi
    if HAS_RIGHT:
        hi_full = tl.minimum(hi, (tl.maximum(0, i0 + off + RIGHT + 1) // BLOCK_N) * BLOCK_N)
    hi_full = tl.maximum(hi_full, lo_full)
    dq = _dq_blocks(dq, q, do, lse2, delta, desc_k, desc_v, lo, lo_full, rows, off, LEFT, RIGHT, qk_scale, BLOCK_N,
                    True, HAS_LEFT, HAS_RIGHT)
    dq = _dq_blocks(dq, q, do, lse2, delta, desc_k, desc_v, lo_full, hi_full, rows, off, LEFT, RIGHT, qk_scale,
                    BLOCK_N, False, HAS_LEFT, HAS_RIGHT)
    dq = _dq_blocks(dq, q, do, lse2, delta, desc_k, desc_v, tl.maximum(hi_full, lo), hi, rows, off, LEFT, RIGHT,
                    qk_scale, BLOCK_N, True, HAS_LEFT, HAS_RIGHT)
    desc_dq = tl.make_tensor_descriptor(DQ + bdq + h * sdqh, shape=[nq, D], strides=[sdqm, 1],
                                        block_shape=[BLOCK_M, HEAD_DIM])
    desc_dq.store([i0, 0], (dq * sm_scale).to(DQ.dtype.element_ty))


def hopper_bwd(do, dlse, q, k, v, out, lse, *, scale, left, right, cu_q=None, cu_k=None, max_q=0, max_k=0,
               config=None):
    """Dense: q (B, Hq, Nq, D) etc., lse (B, Hq, Nq). Varlen (cu_q given): q (total_q, Hq, D),
    lse (Hq, total_q). Returns dq, dk, dv in the dtypes and layouts of q, k, v (the dispatcher
    has checked that every head-dim stride is 1 and every other stride 16-byte aligned)."""
    from fa2lab.kernels.hopper_config import hopper_bwd_config

    ensure_allocator()
    varlen = cu_q is not None
    delta = _delta(do, out, varlen)  # (B, Hq, Nq) or (Hq, total_q), fp32
    if dlse is not None:
        delta -= dlse.float()
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    d, dvd = q.shape[-1], v.shape[-1]
    causal = right >= 0 and left < 0
    if varlen:
        batch, h, hkv = cu_q.numel() - 1, q.shape[1], k.shape[1]
        nq = nk = 0
        st = lambda t: (0, t.stride(1), t.stride(0))  # noqa: E731 (token-major layout)
        sl = (0, lse.stride(0), lse.stride(1))
        grid_q, grid_k = max_q, max_k
    else:
        batch, h, nq, _ = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        st = lambda t: t.stride()[:3]  # noqa: E731
        sl = lse.stride()
        grid_q, grid_k = nq, nk
        cu_q = cu_k = torch.zeros(1, dtype=torch.int32, device=q.device)
    cfg = dict(config or hopper_bwd_config(max(d, dvd), causal=causal, seq_len=grid_q))
    common = dict(D=d, DV=dvd, HEAD_DIM=pow2(d), HEAD_DIM_V=pow2(dvd), HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
                  IS_VARLEN=varlen, LONGEST_FIRST=causal)
    group = h // hkv
    # "dkdv": one kernel for both; or "dv" and "dk": two kernels, each with one accumulator (head
    # dim 256: two 64 x 256 fp32 accumulators alone fill 128 of a thread's 255 registers).
    for key, which in (("dkdv", 3), ("dv", 1), ("dk", 2)):
        if key not in cfg:
            continue
        bm, bn, warps, stages, *swap = cfg[key]  # optional 5th entry: SWAP_AB
        num_n = triton.cdiv(grid_k, bn)
        _hopper_dkdv_kernel[(num_n, batch * hkv)](
            q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, *st(q), *st(k), *st(v), *st(do), *sl, *st(dk), *st(dv),
            hkv, nq, nk, group, num_n, scale * LOG2E, scale, max(left, 0), max(right, 0), **common,
            BLOCK_M=bm, BLOCK_N=bn, SWAP_AB=bool(swap and swap[0]), WHICH=which, num_warps=warps,
            num_stages=stages)
    bm, bn, warps, stages = cfg["dq"]
    num_m = triton.cdiv(grid_q, bm)
    _hopper_dq_kernel[(num_m, batch * h)](
        q, k, v, do, lse, delta, dq, cu_q, cu_k, *st(q), *st(k), *st(v), *st(do), *sl, *st(dq),
        h, nq, nk, group, num_m, scale * LOG2E, scale, max(left, 0), max(right, 0), **common,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return dq, dk, dv


__all__ = ["hopper_bwd"]
