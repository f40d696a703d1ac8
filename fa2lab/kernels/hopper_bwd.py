"""FA2 backward for Hopper (sm_90): Algorithm 2 of fa2lab/kernels/bwd.py with TMA loads, one pass or two.

Notation as the portable backward (P recomputed from the saved LSE in the log2 domain, the scale
folded into one multiply per score; Delta = rowsum(dO * O) - dLSE from the portable preprocess).
One kernel walks key blocks; what it accumulates is chosen by WHICH (bit 1 dV, 2 dK, 4 dQ):

- one pass (WHICH = 7, FA2's original CUDA design, FA3, cuDNN): one program per (key block,
  batch x K/V head) computes S, P, dV, dP, dS, dK for each visible query block and adds
  dQ_i += dS_ij K_j into a zeroed fp32 buffer with relaxed atomics (or a TMA reduce-add): 5
  matmuls per tile. A cast kernel writes dQ * scale in q's dtype.
- two passes (WHICH = 3 plus the dQ kernel below): dQ from its own walk over key blocks, no
  atomics: 7 matmuls per tile, but bit-reproducible (torch.use_deterministic_algorithms).
- head dim 256 splits a pass into kernels with one big accumulator each (WHICH = 1, then 2 or 6).

Either way a program walks the G query heads of its K/V head, so GQA's dK/dV are summed in
registers: no atomics for them, no per-query-head copy. Q, dO (key-block kernel) and K, V (dQ
kernel) stream through on-device tensor descriptors, whose zero fill makes rows past the sequence
ends contribute nothing (a zero query row gives dO = 0 and, with its LSE read as +inf, P = 0), so
only the causal / window edges pay for an element-wise mask; the blocks in between run unmasked.
A partial last key block is masked throughout (its zero key rows would give P = exp(-lse) != 0,
harmless to the clipped dK/dV stores but not to dQ). Causal programs start longest-first.
Variants (kernels/variants.py) recompute the forward's logits and dropout mask exactly as the
portable backward does; the sinks' gradient is an O(N) sum in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fa2lab.kernels.bwd import _delta
from fa2lab.kernels.common import LOG2E, LOG2E_K, pow2, seq_offsets
from fa2lab.kernels.hopper_fwd import ensure_allocator
from fa2lab.kernels.variants import PLAIN_FLAGS, _dropout_keep, _variant_logits, plain_args


@triton.jit
def _key_block_steps(dk, dv, k, v, desc_q, desc_do, desc_dq, DQ_H, sdq_m, LSE_H, DELTA_H, slm, start, stop, cols,
                     nq, nk, off, LEFT, RIGHT, qk_scale, cap_in, cap_out, slope2, bias_base, sbm, sbn, dropout_p,
                     seed, bh, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SWAP_AB: tl.constexpr, WHICH: tl.constexpr,
                     DQ_TMA: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr):
    """Query blocks [start, stop) against the program's key block (Algorithm 2, lines 8-21)."""
    offs_d = tl.arange(0, HEAD_DIM)
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
            # memory; the P and dS tiles are transposed for dV and dK. Keeps K and V out of
            # registers where the dK/dV accumulators already fill them (head dim 256).
            qi = rows[:, None]
            kj = cols[None, :]
            s, t = _variant_logits(tl.dot(q, k.T), qi, kj, (qi < nq) & (kj < nk), nq, nk, qk_scale, cap_in,
                                   cap_out, slope2, bias_base, sbm, sbn, SOFTCAP, HAS_ALIBI, HAS_BIAS)
            p = tl.math.exp2(s - lse2[:, None])  # (BLOCK_M, BLOCK_N)
            if MASKED:
                valid = kj < nk
                if HAS_LEFT:
                    valid = valid & (kj >= qi + off - LEFT)
                if HAS_RIGHT:
                    valid = valid & (kj <= qi + off + RIGHT)
                p = tl.where(valid, p, 0.0)
            if HAS_DROPOUT:  # the forward's mask, regenerated: dV += (P Z)^T dO, dP *= Z
                keep = _dropout_keep(seed, bh, qi, kj, nq, nk, dropout_p)
                if WHICH & 1:
                    dv = tl.dot(tl.where(keep, p / (1.0 - dropout_p), 0.0).to(do.dtype).T, do, dv)
            elif WHICH & 1:
                dv = tl.dot(p.to(do.dtype).T, do, dv)
            if WHICH & 6:
                dp = tl.dot(do, v.T)  # (BLOCK_M, BLOCK_N)
                if HAS_DROPOUT:
                    dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
                ds = p * (dp - delta[:, None])
                if SOFTCAP:  # back through softcap * tanh(x / softcap): times 1 - tanh^2
                    ds = ds * (1.0 - t * t)
                ds = ds.to(q.dtype)
                if WHICH & 2:
                    dk = tl.dot(ds.T, q, dk)
                if WHICH & 4:
                    dq = tl.dot(ds, k)  # (BLOCK_M, HEAD_DIM), fp32, unscaled
                    if DQ_TMA:
                        desc_dq.atomic_add([start_m, 0], dq)
                    else:
                        tl.atomic_add(DQ_H + rows[:, None] * sdq_m + offs_d[None, :], dq, sem="relaxed")
        else:
            qi = rows[None, :]
            kj = cols[:, None]
            s_t, t_t = _variant_logits(tl.dot(k, q.T), qi, kj, (qi < nq) & (kj < nk), nq, nk, qk_scale, cap_in,
                                       cap_out, slope2, bias_base, sbm, sbn, SOFTCAP, HAS_ALIBI, HAS_BIAS)
            p_t = tl.math.exp2(s_t - lse2[None, :])  # (BLOCK_N, BLOCK_M) = P^T
            if MASKED:
                valid = kj < nk
                if HAS_LEFT:
                    valid = valid & (kj >= qi + off - LEFT)
                if HAS_RIGHT:
                    valid = valid & (kj <= qi + off + RIGHT)
                p_t = tl.where(valid, p_t, 0.0)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, bh, qi, kj, nq, nk, dropout_p)
                if WHICH & 1:
                    dv = tl.dot(tl.where(keep, p_t / (1.0 - dropout_p), 0.0).to(do.dtype), do, dv)
            elif WHICH & 1:
                dv = tl.dot(p_t.to(do.dtype), do, dv)
            if WHICH & 6:
                dp_t = tl.dot(v, do.T)  # (BLOCK_N, BLOCK_M) = dP^T
                if HAS_DROPOUT:
                    dp_t = tl.where(keep, dp_t / (1.0 - dropout_p), 0.0)
                ds_t = p_t * (dp_t - delta[None, :])
                if SOFTCAP:
                    ds_t = ds_t * (1.0 - t_t * t_t)
                ds_t = ds_t.to(q.dtype)
                if WHICH & 2:
                    dk = tl.dot(ds_t, q, dk)
                if WHICH & 4:
                    dq = tl.dot(ds_t.T, k)  # (BLOCK_M, HEAD_DIM), fp32, unscaled
                    if DQ_TMA:
                        desc_dq.atomic_add([start_m, 0], dq)
                    else:
                        tl.atomic_add(DQ_H + rows[:, None] * sdq_m + offs_d[None, :], dq, sem="relaxed")
    return dk, dv


@triton.jit
def _hopper_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DKEY, DVAL, DQACC, CU_Q, CU_K,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, slb, slh, slm,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sab, sah, sam,
    HKV, Nq, Nk, G, NUM_N, qk_scale, sm_scale, LEFT, RIGHT,
    ALIBI, BIAS, SINKS, s_ab, s_ah, sbb, sbh, sbm, sbn, cap_in, cap_out, dropout_p, seed,
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    IS_VARLEN: tl.constexpr, LONGEST_FIRST: tl.constexpr, SWAP_AB: tl.constexpr, WHICH: tl.constexpr,
    DQ_TMA: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
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
        bacc = q_start.to(tl.int64) * sam
    else:
        bq = b.to(tl.int64) * sqb
        bk = b.to(tl.int64) * skb
        bv = b.to(tl.int64) * svb
        bdo = b.to(tl.int64) * sdob
        bl = b.to(tl.int64) * slb
        bdk = b.to(tl.int64) * sdkb
        bdv = b.to(tl.int64) * sdvb
        bacc = b.to(tl.int64) * sab
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
    if WHICH & 4:
        if j0 + BLOCK_N > nk:  # a partial key block: mask every query block (see the module docstring)
            lo_full = hi
            hi_full = hi
    for g in range(0, G):
        h = hk * G + g
        desc_q = tl.make_tensor_descriptor(Q + bq + h * sqh, shape=[nq, D], strides=[sqm, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        desc_do = tl.make_tensor_descriptor(DO + bdo + h * sdoh, shape=[nq, DV], strides=[sdom, 1],
                                            block_shape=[BLOCK_M, HEAD_DIM_V])
        dq_h = DQACC + bacc + h * sah
        desc_dq = desc_q
        if DQ_TMA:
            desc_dq = tl.make_tensor_descriptor(dq_h, shape=[nq, HEAD_DIM], strides=[sam, 1],
                                                block_shape=[BLOCK_M, HEAD_DIM])
        lse_h = LSE + bl + h * slh
        delta_h = DELTA + bl + h * slh
        bh = b * (HKV * G) + h  # the forward's (batch, query head) index: dropout's counters
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(ALIBI + b * s_ab + h * s_ah) * LOG2E_K
        bias_base = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
        dk, dv = _key_block_steps(dk, dv, k, v, desc_q, desc_do, desc_dq, dq_h, sam, lse_h, delta_h, slm, lo, lo_full,
                                  cols, nq, nk, off, LEFT, RIGHT, qk_scale, cap_in, cap_out, slope2, bias_base, sbm,
                                  sbn, dropout_p, seed, bh, BLOCK_M, HEAD_DIM, True, HAS_LEFT, HAS_RIGHT, SWAP_AB,
                                  WHICH, DQ_TMA, SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT)
        dk, dv = _key_block_steps(dk, dv, k, v, desc_q, desc_do, desc_dq, dq_h, sam, lse_h, delta_h, slm, lo_full,
                                  hi_full, cols, nq, nk, off, LEFT, RIGHT, qk_scale, cap_in, cap_out, slope2,
                                  bias_base, sbm, sbn, dropout_p, seed, bh, BLOCK_M, HEAD_DIM, False, HAS_LEFT,
                                  HAS_RIGHT, SWAP_AB, WHICH, DQ_TMA, SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT)
        dk, dv = _key_block_steps(dk, dv, k, v, desc_q, desc_do, desc_dq, dq_h, sam, lse_h, delta_h, slm,
                                  tl.maximum(hi_full, lo), hi, cols, nq, nk, off, LEFT, RIGHT, qk_scale, cap_in,
                                  cap_out, slope2, bias_base, sbm, sbn, dropout_p, seed, bh, BLOCK_M, HEAD_DIM, True,
                                  HAS_LEFT, HAS_RIGHT, SWAP_AB, WHICH, DQ_TMA, SOFTCAP, HAS_ALIBI, HAS_BIAS,
                                  HAS_DROPOUT)
    desc_dk = tl.make_tensor_descriptor(DKEY + bdk + hk * sdkh, shape=[nk, D], strides=[sdkn, 1],
                                        block_shape=[BLOCK_N, HEAD_DIM])
    desc_dv = tl.make_tensor_descriptor(DVAL + bdv + hk * sdvh, shape=[nk, DV], strides=[sdvn, 1],
                                        block_shape=[BLOCK_N, HEAD_DIM_V])
    if WHICH & 2:
        desc_dk.store([j0, 0], (dk * sm_scale).to(DKEY.dtype.element_ty))
    if WHICH & 1:
        desc_dv.store([j0, 0], dv.to(DVAL.dtype.element_ty))


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, desc_k, desc_v, start, stop, rows, nq, nk, off, LEFT, RIGHT, qk_scale,
               cap_in, cap_out, slope2, bias_base, sbm, sbn, dropout_p, seed, bh,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        k = desc_k.load([start_n, 0])  # (BLOCK_N, HEAD_DIM); rows past nk are zeros and add nothing
        v = desc_v.load([start_n, 0])  # (BLOCK_N, HEAD_DIM_V)
        cols = start_n + tl.arange(0, BLOCK_N)
        qi = rows[:, None]
        kj = cols[None, :]
        s, t = _variant_logits(tl.dot(q, k.T), qi, kj, (qi < nq) & (kj < nk), nq, nk, qk_scale, cap_in, cap_out,
                               slope2, bias_base, sbm, sbn, SOFTCAP, HAS_ALIBI, HAS_BIAS)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            valid = tl.full([BLOCK_N], 1, tl.int1)[None, :]
            if HAS_LEFT:
                valid = valid & (kj >= qi + off - LEFT)
            if HAS_RIGHT:
                valid = valid & (kj <= qi + off + RIGHT)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, v.T)  # (BLOCK_M, BLOCK_N)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, qi, kj, nq, nk, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _hopper_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, slb, slh, slm, sdqb, sdqh, sdqm,
    H, Nq, Nk, G, NUM_M, qk_scale, sm_scale, LEFT, RIGHT,
    ALIBI, BIAS, SINKS, s_ab, s_ah, sbb, sbh, sbm, sbn, cap_in, cap_out, dropout_p, seed,
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    IS_VARLEN: tl.constexpr, LONGEST_FIRST: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
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
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + b * s_ab + h * s_ah) * LOG2E_K
    bias_base = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh

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
    dq = _dq_blocks(dq, q, do, lse2, delta, desc_k, desc_v, lo, lo_full, rows, nq, nk, off, LEFT, RIGHT, qk_scale,
                    cap_in, cap_out, slope2, bias_base, sbm, sbn, dropout_p, seed, pid_bh, BLOCK_N, True, HAS_LEFT,
                    HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT)
    dq = _dq_blocks(dq, q, do, lse2, delta, desc_k, desc_v, lo_full, hi_full, rows, nq, nk, off, LEFT, RIGHT,
                    qk_scale, cap_in, cap_out, slope2, bias_base, sbm, sbn, dropout_p, seed, pid_bh, BLOCK_N, False,
                    HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT)
    dq = _dq_blocks(dq, q, do, lse2, delta, desc_k, desc_v, tl.maximum(hi_full, lo), hi, rows, nq, nk, off, LEFT,
                    RIGHT, qk_scale, cap_in, cap_out, slope2, bias_base, sbm, sbn, dropout_p, seed, pid_bh, BLOCK_N,
                    True, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT)
    desc_dq = tl.make_tensor_descriptor(DQ + bdq + h * sdqh, shape=[nq, D], strides=[sdqm, 1],
                                        block_shape=[BLOCK_M, HEAD_DIM])
    desc_dq.store([i0, 0], (dq * sm_scale).to(DQ.dtype.element_ty))


@triton.jit
def _dq_cast_kernel(ACC, DQ, CU_Q, sab, sah, sam, sdqb, sdqh, sdqm, H, Nq, sm_scale, D: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr):
    """dQ = scale * (the fp32 sum of the atomic adds), in q's dtype and layout."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        nq = tl.load(CU_Q + b + 1) - q_start
        ba = q_start.to(tl.int64) * sam
        bd = q_start.to(tl.int64) * sdqm
    else:
        nq = Nq
        ba = b.to(tl.int64) * sab
        bd = b.to(tl.int64) * sdqb
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.load(ACC + ba + h * sah + rows[:, None] * sam + offs_d[None, :], mask=rows[:, None] < nq, other=0.0)
    tl.store(DQ + bd + h * sdqh + rows[:, None] * sdqm + offs_d[None, :], (acc * sm_scale).to(DQ.dtype.element_ty),
             mask=(rows[:, None] < nq) & (offs_d[None, :] < D))


# Config keys -> WHICH: the two-pass dK/dV kernel, its head-dim-256 split, and the one-pass kernels.
_KEY_BLOCK_KERNELS = (("dkdv", 3), ("dv", 1), ("dk", 2), ("dkdvq", 7), ("dkq", 6))


def _gluon_takes(q, k, v) -> bool:
    from fa2lab.kernels.gluon_bwd import gluon_dkdv_takes

    return gluon_dkdv_takes(q, k, v)


def _gluon_wide_takes(q, k, v) -> bool:
    from fa2lab.kernels.gluon_bwd_wide import gluon_bwd_wide_takes

    return gluon_bwd_wide_takes(q, k, v)


def hopper_bwd(do, dlse, q, k, v, out, lse, *, scale, left, right, cu_q=None, cu_k=None, max_q=0, max_k=0,
               config=None, variants=None, deterministic=False):
    """Dense: q (B, Hq, Nq, D) etc., lse (B, Hq, Nq). Varlen (cu_q given): q (total_q, Hq, D),
    lse (Hq, total_q). Returns dq, dk, dv in the dtypes and layouts of q, k, v (the dispatcher
    has checked that every head-dim stride is 1 and every other stride 16-byte aligned); with
    variants (dense only, a kernels.variants.KernelVariants) also dsinks (Hq,) or None.
    config: kernel tiles (see hopper_config.BWD); default hopper_config.hopper_bwd_config.
    deterministic (or torch.use_deterministic_algorithms): bit-reproducible gradients, the two passes."""
    from fa2lab.kernels.hopper_config import hopper_bwd_config

    ensure_allocator()
    varlen = cu_q is not None
    delta = _delta(do, out, varlen)  # (B, Hq, Nq) or (Hq, total_q), fp32
    if dlse is not None:
        delta -= dlse.float()
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dsinks = None
    if variants is not None and variants.var.sinks is not None:  # -sum_i exp(sink - lse_i) Delta_i, O(N)
        sinks = variants.var.sinks
        dsinks = -(torch.exp(sinks.float().view(1, -1, 1) - lse) * delta).sum(dim=(0, 2)).to(sinks.dtype)
    if q.numel() == 0 or k.numel() == 0:
        grads = dq.zero_(), dk.zero_(), dv.zero_()
        return grads if variants is None else (*grads, dsinks)
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
    cfg = dict(config or hopper_bwd_config(max(d, dvd), causal=causal, seq_len=grid_q,
                                           deterministic=deterministic or torch.are_deterministic_algorithms_enabled(),
                                           variants=variants, group=h // hkv))
    flags = variants.flags() if variants else PLAIN_FLAGS
    var_args = variants.args() if variants else plain_args(q)
    common = dict(D=d, DV=dvd, HEAD_DIM=pow2(d), HEAD_DIM_V=pow2(dvd), HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
                  IS_VARLEN=varlen, LONGEST_FIRST=causal, **flags)
    group = h // hkv
    # "gluon_dkdv": (BLOCK_M, BLOCK_N, STAGES) of kernels/gluon_bwd.py for dK / dV (plain dense calls it
    # takes; the row's Triton kernels run everything else), dQ from the two-pass "dq" kernel.
    # "gluon_dkdvq": the same kernel adding dQ's fp32 sums as it goes (one pass; D in (32, 128]), cast
    # by _dq_cast_kernel below; calls it does not take fall back to "gluon_dkdv" or the Triton rows.
    # (BLOCK_M, BLOCK_N, STAGES, *options): "atomic" adds the sums element-wise instead of by TMA reduce-adds,
    # "persistent" runs one program per SM over the tiles (gluon_bwd.gluon_dkdv).
    # "gluon_wide": (BLOCK_M, BLOCK_N, Q_STAGES, DO_STAGES, DQ_CHUNK[, "cols" | "keys"]) of
    # kernels/gluon_bwd_wide.py, the one pass for D in (128, 256].
    gluon_tiles = cfg.pop("gluon_dkdv", None)
    fused_tiles = cfg.pop("gluon_dkdvq", None)
    wide_tiles = cfg.pop("gluon_wide", None)
    plain = not varlen and variants is None
    use_wide = wide_tiles is not None and plain and _gluon_wide_takes(q, k, v)
    plain = plain and _gluon_takes(q, k, v)
    use_fused = fused_tiles is not None and plain
    use_gluon = use_wide or use_fused or (gluon_tiles is not None and plain)
    sums = None  # the one pass's fp32 dQ sums
    if use_wide or use_fused:  # rows padded to whole query blocks: a block's adds past Nq (zeros) need no mask
        bm = (wide_tiles if use_wide else fused_tiles)[0]
        sums = torch.zeros(batch, h, triton.cdiv(nq, bm) * bm, pow2(d), dtype=torch.float32, device=q.device)
    if use_wide:
        from fa2lab.kernels.gluon_bwd_wide import gluon_bwd_wide

        bm, bn, q_stages, do_stages, chunk, *split = wide_tiles
        dk, dv = gluon_bwd_wide(do, q, k, v, lse, delta, sums, scale=scale, left=left, right=right, block_m=bm,
                                block_n=bn, q_stages=q_stages, do_stages=do_stages, dq_chunk=chunk,
                                split=split[0] if split else "cols")
    elif use_gluon:
        from fa2lab.kernels.gluon_bwd import gluon_dkdv

        if not use_fused and "dq" not in cfg:
            raise ValueError(f"config {cfg}: the Gluon dK/dV kernel needs the two-pass 'dq' kernel beside it")
        bm, bn, stages, *opts = fused_tiles if use_fused else gluon_tiles
        dk, dv = gluon_dkdv(do, q, k, v, lse, delta, scale=scale, left=left, right=right, block_m=bm, block_n=bn,
                            stages=stages, dq_sums=sums, dq_reduce="atomic" if "atomic" in opts else "tma",
                            persistent="persistent" in opts)
    if not use_gluon and not any(key in cfg for key, _ in _KEY_BLOCK_KERNELS):
        raise ValueError(f"config {cfg} has no dK/dV kernel for this call (the Gluon ones take plain dense calls "
                         f"with Dv == D only, 32 < D <= 256): add a Triton 'dkdv' row (or 'dv' and 'dk') beside the "
                         f"Gluon keys")
    one_pass = use_wide or use_fused
    atomic = one_pass or (any(key in cfg for key in ("dkdvq", "dkq")) and not use_gluon)
    acc = sums if one_pass else q  # q: a placeholder pointer when no kernel adds into dQ
    if atomic and not one_pass:
        # fp32 dQ sums, q's layout with HEAD_DIM columns; rows padded so that a block's adds past
        # a sequence's end (zeros) stay inside the buffer without a mask.
        pad = max(cfg[key][0] for key in ("dkdvq", "dkq") if key in cfg)
        hd = pow2(d)
        if varlen:
            acc = torch.zeros(q.shape[0] + pad, h, hd, dtype=torch.float32, device=q.device)
        else:
            acc = torch.zeros(batch, h, triton.cdiv(nq, pad) * pad, hd, dtype=torch.float32, device=q.device)
    for key, which in _KEY_BLOCK_KERNELS:
        if key not in cfg or use_gluon:
            continue
        bm, bn, warps, stages, *swap = cfg[key]  # optional 5th entry: SWAP_AB
        num_n = triton.cdiv(grid_k, bn)
        _hopper_dkdv_kernel[(num_n, batch * hkv)](
            q, k, v, do, lse, delta, dk, dv, acc, cu_q, cu_k, *st(q), *st(k), *st(v), *st(do), *sl, *st(dk),
            *st(dv), *st(acc), hkv, nq, nk, group, num_n, scale * LOG2E, scale, max(left, 0), max(right, 0),
            *var_args, **common, BLOCK_M=bm, BLOCK_N=bn, SWAP_AB=bool(swap and swap[0]), WHICH=which,
            DQ_TMA=bool(which & 4 and cfg.get("dq_tma", False)), num_warps=warps, num_stages=stages)
    if atomic:
        block = 64 if d <= 128 else 32
        _dq_cast_kernel[(triton.cdiv(grid_q, block), batch * h)](
            acc, dq, cu_q, *st(acc), *st(dq), h, nq, scale, D=d, HEAD_DIM=pow2(d), BLOCK_M=block, IS_VARLEN=varlen)
    else:
        bm, bn, warps, stages = cfg["dq"]
        num_m = triton.cdiv(grid_q, bm)
        _hopper_dq_kernel[(num_m, batch * h)](
            q, k, v, do, lse, delta, dq, cu_q, cu_k, *st(q), *st(k), *st(v), *st(do), *sl, *st(dq),
            h, nq, nk, group, num_m, scale * LOG2E, scale, max(left, 0), max(right, 0), *var_args, **common,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return (dq, dk, dv) if variants is None else (dq, dk, dv, dsinks)


__all__ = ["hopper_bwd"]
