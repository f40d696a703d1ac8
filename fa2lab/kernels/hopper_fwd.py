"""FA2 forward for Hopper (sm_90): the portable kernel's algorithm fed by the tensor-memory accelerator.

Same online softmax, masks and notation as fa2lab/kernels/fwd.py (log2 domain, scale * log2(e)
folded into one multiply-add per score, bottom-right causal and sliding windows, GQA by index
arithmetic, varlen through cu_seqlens). What changes on Hopper:

- Q, K, V and O move through tensor descriptors (TMA bulk copies): built on the host over
  (B, H, N, D) (HOST_DESC, one grid-constant parameter each) or on the device per program with
  `tl.make_tensor_descriptor` over one (sequence, head) slice (varlen always). Either way the copy
  engine zero-fills rows past N and columns past D on loads and clips them on stores, so any
  length and any head dim up to 256 need no masked loads.
- Key blocks are split into masked edges and an unmasked middle; in the middle the softmax skips
  the mask and the empty-row guard, and the scale is folded into the max (one FMA per score).
- Query blocks are visited longest-first when causal (the last query block sees the most keys),
  heads in order so that programs running together share K/V in L2. PERSISTENT launches one
  program per SM slot that walks tiles in that order.
- WARP_SPECIALIZE asks Triton for a producer warp (`tl.range(..., warp_specialize=True)`) that
  overlaps the copies of one tile with the softmax of the previous one.

The interpreter runs these kernels too (TRITON_INTERPRET=1 models descriptors): tests/test_hopper.py
checks their logic on the CPU, tests/test_hopper_gpu.py at full size on an sm_90 GPU. The
dispatcher in fa2lab/kernels/attention.py sends Ampere, the interpreter, fp32 and strides TMA
cannot address to the portable kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fa2lab.kernels.common import LOG2E, LOG2E_K, online_softmax_step, pow2, seq_offsets
from fa2lab.kernels.variants import PLAIN_FLAGS, _dropout_keep_tile, _softcap, plain_args


@triton.jit
def _load(desc, b, h, row, HOST: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A (ROWS, COLS) tile at token `row`: host descriptors span (B, H, N, D), device ones one (N, D) slice."""
    if HOST:
        tile = desc.load([b, h, row, 0]).reshape(ROWS, COLS)
    else:
        tile = desc.load([row, 0])
    return tile


@triton.jit
def _hopper_blocks(acc, l_i, m_i, q, desc_k, desc_v, start, stop, i0, offs_m, offs_n, nk, off, LEFT, RIGHT, qk_scale,
                   b, hk, nq, bh, cap_in, cap_out, slope2, bias_base, desc_b, sbm, sbn, dropout_p, seed,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
                   HAS_RIGHT: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, HOST: tl.constexpr,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, SOFTCAP: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, ALIBI_SIDE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BIAS_TMA: tl.constexpr, HAS_DROPOUT: tl.constexpr, LAZY_RESCALE: tl.constexpr):
    """Online softmax over key blocks [start, stop) (Algorithm 1, lines 6-10). Variants
    (kernels/variants.py) change the logits; dropout zeroes P after l_i has summed it (the 1 / (1 - p)
    is applied once in the epilogue). ALIBI_SIDE: +1 every key of these blocks is left of (or on) every
    row's diagonal, -1 right of it, 0 either: with the side known, -slope |i + off - j| splits into a
    column term (one FMA per score) and a row term folded into the running max."""
    VARIANT_LOGITS: tl.constexpr = SOFTCAP or HAS_ALIBI or HAS_BIAS
    row_ok = offs_m[:, None] < nq
    if HAS_ALIBI and ALIBI_SIDE != 0:
        # -slope2 |i + off - j| = SIDE slope2 (j - i0 - off) - SIDE slope2 (i - i0): distances kept small
        # near the diagonal, where the mass is, so the split costs no precision there.
        row_term = -ALIBI_SIDE * slope2 * (offs_m - i0).to(tl.float32)  # (BLOCK_M,)
    for start_n in tl.range(start, stop, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = _load(desc_k, b, hk, start_n, HOST, BLOCK_N, HEAD_DIM)  # (BLOCK_N, HEAD_DIM); rows past nk: zeros
        s = tl.dot(q, k.T)  # (BLOCK_M, BLOCK_N), unscaled
        cols = start_n + offs_n
        if VARIANT_LOGITS:
            if SOFTCAP:
                s, _ = _softcap(s, cap_in, cap_out)
            else:
                s = s * qk_scale
            if HAS_ALIBI:
                if ALIBI_SIDE == 0:
                    s = s - slope2 * tl.abs(offs_m[:, None] + off - cols[None, :]).to(tl.float32)
                else:
                    col_term = ALIBI_SIDE * slope2 * (cols - i0 - off).to(tl.float32)  # (BLOCK_N,)
                    s = s + col_term[None, :]
            if HAS_BIAS:
                if BIAS_TMA:  # a (BLOCK_M, BLOCK_N) copy; zero-filled past nq / nk
                    bias = desc_b.load([i0, start_n])
                elif MASKED:
                    bias = tl.load(bias_base + offs_m[:, None].to(tl.int64) * sbm + cols[None, :].to(tl.int64) * sbn,
                                   mask=row_ok & (cols[None, :] < nk), other=0.0)
                else:
                    bias = tl.load(bias_base + offs_m[:, None].to(tl.int64) * sbm + cols[None, :].to(tl.int64) * sbn,
                                   mask=row_ok, other=0.0)
                s = s + bias.to(tl.float32) * LOG2E_K
        if MASKED:
            valid = cols[None, :] < nk
            if HAS_LEFT:
                valid = valid & (cols[None, :] >= offs_m[:, None] + off - LEFT)
            if HAS_RIGHT:
                valid = valid & (cols[None, :] <= offs_m[:, None] + off + RIGHT)
            if VARIANT_LOGITS:
                s = tl.where(valid, s, float("-inf"))
            else:
                s = tl.where(valid, s * qk_scale, float("-inf"))
            if HAS_ALIBI and ALIBI_SIDE != 0:
                s = s + row_term[:, None]
            p, alpha, l_i, m_new = online_softmax_step(s, m_i, l_i)
        elif VARIANT_LOGITS:  # every score visible and finite: no empty-row guard
            if HAS_ALIBI and ALIBI_SIDE != 0:  # the row term joins the max, not every score
                m_new = tl.maximum(m_i, tl.max(s, 1) + row_term)
                p = tl.math.exp2(s - (m_new - row_term)[:, None])
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
        else:  # every score visible (no empty row): max before scaling, then one FMA per score
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)  # line 10: rescale what was accumulated so far
            l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:  # after l_i: the softmax normalises the undropped probabilities
            p = tl.where(_dropout_keep_tile(seed, bh, offs_m, start_n, nq, nk, dropout_p, BLOCK_N), p, 0.0)
        if LAZY_RESCALE:  # exact: alpha == 1 on every row (no row max grew) leaves acc as it is
            if tl.min(alpha, 0) < 1.0:
                acc = acc * alpha[:, None]
        else:
            acc = acc * alpha[:, None]
        v = _load(desc_v, b, hk, start_n, HOST, BLOCK_N, HEAD_DIM_V)  # (BLOCK_N, HEAD_DIM_V)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _softmax_pv(acc, l_i, m_i, s, desc_v, b, hk, start_n, qk_scale, BLOCK_N: tl.constexpr, HOST: tl.constexpr,
                HEAD_DIM_V: tl.constexpr):
    """Lines 8-10 of Algorithm 1 for one unmasked, plain tile whose S = Q K^T is given."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load(desc_v, b, hk, start_n, HOST, BLOCK_N, HEAD_DIM_V)  # (BLOCK_N, HEAD_DIM_V)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _hopper_blocks_pipelined(acc, l_i, m_i, q, desc_k, desc_v, start, stop, b, hk, qk_scale, BLOCK_N: tl.constexpr,
                             HOST: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr):
    """The unmasked middle of a plain call with S of the next tile computed before the softmax of this
    one (FA3's intra-warpgroup overlap, written in the source): the next QK^T does not depend on this
    tile's softmax, so its tensor-core work can run while the softmax does."""
    if start < stop:
        k = _load(desc_k, b, hk, start, HOST, BLOCK_N, HEAD_DIM)
        s = tl.dot(q, k.T)  # (BLOCK_M, BLOCK_N) of the first tile
        for start_n in tl.range(start, stop - BLOCK_N, BLOCK_N):
            k_next = _load(desc_k, b, hk, start_n + BLOCK_N, HOST, BLOCK_N, HEAD_DIM)
            s_next = tl.dot(q, k_next.T)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, desc_v, b, hk, start_n, qk_scale, BLOCK_N, HOST, HEAD_DIM_V)
            s = s_next
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, desc_v, b, hk, stop - BLOCK_N, qk_scale, BLOCK_N, HOST,
                                    HEAD_DIM_V)
    return acc, l_i, m_i


@triton.jit
def _hopper_fwd_tile(tile, Q, K, V, O, LSE, CU_Q, CU_K,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh, slm,
                     H, Nq, Nk, G, NUM_M, NUM_BH, qk_scale, LEFT, RIGHT,
                     ALIBI, BIAS, SINKS, sab, sah, sbb, sbh, sbm, sbn, cap_in, cap_out, dropout_p, seed,
                     D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                     IS_VARLEN: tl.constexpr, LONGEST_FIRST: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                     HOST: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BIAS_TMA: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     LAZY_RESCALE: tl.constexpr, M_MAJOR: tl.constexpr, PIPELINE_QK: tl.constexpr):
    if M_MAJOR:  # every head's block pid_m before any head's pid_m - 1 (longest-first across heads)
        bh = tile % NUM_BH
        pid_m = tile // NUM_BH
    else:  # heads in order: programs running together share one head's K/V in L2
        bh = tile // NUM_M
        pid_m = tile % NUM_M
    if LONGEST_FIRST:  # causal: the last query block of a head has the most keys to visit
        pid_m = NUM_M - 1 - pid_m
    b = bh // H
    h = bh % H
    hk = h // G  # GQA: the K/V head this query head shares
    q_start, nq, k_start, nk = seq_offsets(CU_Q, CU_K, b, Nq, Nk, IS_VARLEN)
    if IS_VARLEN:  # packed sequences: batch index b selects a slice of the token dimension
        bq = q_start.to(tl.int64) * sqm
        bk = k_start.to(tl.int64) * skn
        bv = k_start.to(tl.int64) * svn
        bo = q_start.to(tl.int64) * som
        bl = q_start.to(tl.int64) * slm
    else:
        bq = b.to(tl.int64) * sqb
        bk = b.to(tl.int64) * skb
        bv = b.to(tl.int64) * svb
        bo = b.to(tl.int64) * sob
        bl = b.to(tl.int64) * slb
    i0 = pid_m * BLOCK_M
    if i0 < nq:
        if HOST:  # descriptors built once on the host over (B, H, N, D): no per-program setup
            desc_q = Q
            desc_k = K
            desc_v = V
            desc_o = O
        else:
            desc_q = tl.make_tensor_descriptor(Q + bq + h * sqh, shape=[nq, D], strides=[sqm, 1],
                                               block_shape=[BLOCK_M, HEAD_DIM])
            desc_k = tl.make_tensor_descriptor(K + bk + hk * skh, shape=[nk, D], strides=[skn, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
            desc_v = tl.make_tensor_descriptor(V + bv + hk * svh, shape=[nk, DV], strides=[svn, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM_V])
            desc_o = tl.make_tensor_descriptor(O + bo + h * soh, shape=[nq, DV], strides=[som, 1],
                                               block_shape=[BLOCK_M, HEAD_DIM_V])
        offs_m = i0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        q = _load(desc_q, b, h, i0, HOST, BLOCK_M, HEAD_DIM)  # (BLOCK_M, HEAD_DIM)
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(ALIBI + b * sab + h * sah) * LOG2E_K
        bias_base = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
        desc_b = desc_q  # a placeholder when the bias is absent or read through pointers
        if BIAS_TMA:  # one (Nq, Nk) slice of a bias with unit key stride: TMA copies, zero-filled at the edges
            desc_b = tl.make_tensor_descriptor(bias_base, shape=[nq, nk], strides=[sbm, 1],
                                               block_shape=[BLOCK_M, BLOCK_N])

        off = nk - nq  # bottom-right alignment of the diagonal
        lo = 0
        hi = nk
        if HAS_LEFT:
            lo = (tl.maximum(0, i0 + off - LEFT) // BLOCK_N) * BLOCK_N
        if HAS_RIGHT:
            hi = tl.maximum(0, tl.minimum(nk, tl.minimum(i0 + BLOCK_M, nq) - 1 + off + RIGHT + 1))
        # [lo_full, hi_full): key blocks every row of this query block sees in full, and inside nk.
        last = tl.minimum(i0 + BLOCK_M, nq) - 1  # the block's last row
        lo_full = lo
        if HAS_LEFT:
            lo_full = tl.minimum(tl.maximum(lo, tl.cdiv(tl.maximum(0, last + off - LEFT), BLOCK_N) * BLOCK_N), hi)
        hi_full = (nk // BLOCK_N) * BLOCK_N
        if HAS_RIGHT:
            hi_full = tl.minimum(hi_full, (tl.maximum(0, i0 + off + RIGHT + 1) // BLOCK_N) * BLOCK_N)
        hi_full = tl.maximum(hi_full, lo_full)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
        acc, l_i, m_i = _hopper_blocks(acc, l_i, m_i, q, desc_k, desc_v, lo, lo_full, i0, offs_m, offs_n, nk, off,
                                       LEFT, RIGHT, qk_scale, b, hk, nq, bh, cap_in, cap_out, slope2, bias_base, desc_b,
                                       sbm, sbn, dropout_p, seed, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, False, HOST,
                                       HEAD_DIM, HEAD_DIM_V, SOFTCAP, HAS_ALIBI, 0, HAS_BIAS, BIAS_TMA, HAS_DROPOUT,
                                       False)
        if HAS_ALIBI:  # the middle in three: keys left of every row's diagonal, straddling it, right of it
            a = tl.minimum(tl.maximum((tl.maximum(0, i0 + off + 1) // BLOCK_N) * BLOCK_N, lo_full), hi_full)
            c = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(0, last + off), BLOCK_N) * BLOCK_N, a), hi_full)
            acc, l_i, m_i = _hopper_blocks(acc, l_i, m_i, q, desc_k, desc_v, lo_full, a, i0, offs_m, offs_n, nk, off,
                                           LEFT, RIGHT, qk_scale, b, hk, nq, bh, cap_in, cap_out, slope2, bias_base,
                                           desc_b, sbm, sbn, dropout_p, seed, BLOCK_N, False, HAS_LEFT, HAS_RIGHT,
                                           WARP_SPECIALIZE, HOST, HEAD_DIM, HEAD_DIM_V, SOFTCAP, HAS_ALIBI, 1,
                                           HAS_BIAS, BIAS_TMA, HAS_DROPOUT, LAZY_RESCALE)
            acc, l_i, m_i = _hopper_blocks(acc, l_i, m_i, q, desc_k, desc_v, a, c, i0, offs_m, offs_n, nk, off,
                                           LEFT, RIGHT, qk_scale, b, hk, nq, bh, cap_in, cap_out, slope2, bias_base,
                                           desc_b, sbm, sbn, dropout_p, seed, BLOCK_N, False, HAS_LEFT, HAS_RIGHT,
                                           False, HOST, HEAD_DIM, HEAD_DIM_V, SOFTCAP, HAS_ALIBI, 0,
                                           HAS_BIAS, BIAS_TMA, HAS_DROPOUT, LAZY_RESCALE)
            acc, l_i, m_i = _hopper_blocks(acc, l_i, m_i, q, desc_k, desc_v, c, hi_full, i0, offs_m, offs_n, nk, off,
                                           LEFT, RIGHT, qk_scale, b, hk, nq, bh, cap_in, cap_out, slope2, bias_base,
                                           desc_b, sbm, sbn, dropout_p, seed, BLOCK_N, False, HAS_LEFT, HAS_RIGHT,
                                           WARP_SPECIALIZE, HOST, HEAD_DIM, HEAD_DIM_V, SOFTCAP, HAS_ALIBI, -1,
                                           HAS_BIAS, BIAS_TMA, HAS_DROPOUT, LAZY_RESCALE)
        elif PIPELINE_QK and not (SOFTCAP or HAS_BIAS or HAS_DROPOUT):
            acc, l_i, m_i = _hopper_blocks_pipelined(acc, l_i, m_i, q, desc_k, desc_v, lo_full, hi_full, b, hk,
                                                     qk_scale, BLOCK_N, HOST, HEAD_DIM, HEAD_DIM_V)
        else:
            acc, l_i, m_i = _hopper_blocks(acc, l_i, m_i, q, desc_k, desc_v, lo_full, hi_full, i0, offs_m, offs_n, nk,
                                           off, LEFT, RIGHT, qk_scale, b, hk, nq, bh, cap_in, cap_out, slope2,
                                           bias_base, desc_b, sbm, sbn, dropout_p, seed, BLOCK_N, False, HAS_LEFT,
                                           HAS_RIGHT, WARP_SPECIALIZE, HOST, HEAD_DIM, HEAD_DIM_V, SOFTCAP, HAS_ALIBI,
                                           0, HAS_BIAS, BIAS_TMA, HAS_DROPOUT, LAZY_RESCALE)
        acc, l_i, m_i = _hopper_blocks(acc, l_i, m_i, q, desc_k, desc_v, tl.maximum(hi_full, lo), hi, i0, offs_m,
                                       offs_n, nk, off, LEFT, RIGHT, qk_scale, b, hk, nq, bh, cap_in, cap_out, slope2,
                                       bias_base, desc_b, sbm, sbn, dropout_p, seed, BLOCK_N, True, HAS_LEFT, HAS_RIGHT,
                                       False, HOST, HEAD_DIM, HEAD_DIM_V, SOFTCAP, HAS_ALIBI, 0, HAS_BIAS, BIAS_TMA,
                                       HAS_DROPOUT, False)

        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        if HAS_DROPOUT:  # kept entries scaled by 1 / (1 - p): once per row here, not per score
            out = out * (1.0 / (1.0 - dropout_p))
        lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        if HAS_SINKS:  # exp(sink) joins the denominator: lse' = logaddexp(lse, sink), out' = out e^(lse - lse')
            sink2 = tl.load(SINKS + h) * LOG2E_K
            top = tl.maximum(lse2, sink2)
            lse_s = top + tl.math.log2(tl.math.exp2(lse2 - top) + tl.math.exp2(sink2 - top))
            out = out * tl.math.exp2(lse2 - lse_s)[:, None]
            lse2 = lse_s
        lse = lse2 / LOG2E_K
        out = out.to(desc_o.dtype)
        if HOST:  # rows past nq are clipped by the copy engine
            desc_o.store([b, h, i0, 0], out.reshape(1, 1, BLOCK_M, HEAD_DIM_V))
        else:
            desc_o.store([i0, 0], out)
        tl.store(LSE + bl + h * slh + offs_m * slm, lse, mask=offs_m < nq)


@triton.jit
def _hopper_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K,
                       sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh, slm,
                       H, Nq, Nk, G, NUM_M, NUM_TILES, qk_scale, LEFT, RIGHT,
                       ALIBI, BIAS, SINKS, sab, sah, sbb, sbh, sbm, sbn, cap_in, cap_out, dropout_p, seed,
                       D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr,
                       HAS_RIGHT: tl.constexpr, IS_VARLEN: tl.constexpr, LONGEST_FIRST: tl.constexpr,
                       PERSISTENT: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, HOST: tl.constexpr,
                       SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_TMA: tl.constexpr,
                       HAS_SINKS: tl.constexpr, HAS_DROPOUT: tl.constexpr, LAZY_RESCALE: tl.constexpr,
                       M_MAJOR: tl.constexpr, PIPELINE_QK: tl.constexpr):
    num_bh = NUM_TILES // NUM_M
    if PERSISTENT:
        for tile in range(tl.program_id(0), NUM_TILES, tl.num_programs(0)):
            _hopper_fwd_tile(tile, Q, K, V, O, LSE, CU_Q, CU_K, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                             sob, soh, som, slb, slh, slm, H, Nq, Nk, G, NUM_M, num_bh, qk_scale, LEFT, RIGHT,
                             ALIBI, BIAS, SINKS, sab, sah, sbb, sbh, sbm, sbn, cap_in, cap_out, dropout_p, seed, D, DV,
                             HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, IS_VARLEN, LONGEST_FIRST,
                             WARP_SPECIALIZE, HOST, SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_TMA, HAS_SINKS, HAS_DROPOUT,
                             LAZY_RESCALE, M_MAJOR, PIPELINE_QK)
    else:
        _hopper_fwd_tile(tl.program_id(0), Q, K, V, O, LSE, CU_Q, CU_K, sqb, sqh, sqm, skb, skh, skn, svb, svh,
                         svn, sob, soh, som, slb, slh, slm, H, Nq, Nk, G, NUM_M, num_bh, qk_scale, LEFT, RIGHT,
                         ALIBI, BIAS, SINKS, sab, sah, sbb, sbh, sbm, sbn, cap_in, cap_out, dropout_p, seed, D, DV,
                         HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, IS_VARLEN, LONGEST_FIRST,
                         WARP_SPECIALIZE, HOST, SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_TMA, HAS_SINKS, HAS_DROPOUT,
                         LAZY_RESCALE, M_MAJOR, PIPELINE_QK)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """On-device descriptors live in a global scratch buffer that Triton asks an allocator for.
    Installed only where none is set (a caller's own allocator wins); a context variable, so it
    is checked on every launch (new threads start without one)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _bias_tma_ok(kv) -> bool:
    """A bias tile can come by TMA: unit key stride, a non-broadcast query stride, every base offset and
    the query stride 16-byte aligned (the copy engine's rules)."""
    if kv is None or kv.var.attn_bias is None:
        return False
    sbb, sbh, sbm, sbn = kv.bias_strides
    elem = kv.bias.element_size()
    return (sbn == 1 and sbm > 0 and kv.bias.data_ptr() % 16 == 0
            and all((st * elem) % 16 == 0 for st in (sbb, sbh, sbm)))


def launch_hopper_fwd(q, k, v, out, lse, strides_q, strides_k, strides_v, strides_o, strides_l, batch, h, nq, nk,
                      hkv, scale, left, right, cu_q, cu_k, varlen, grid_m, cfg, variants=None):
    """Strides are (batch, head, token) in elements; the head-dim stride is 1 (checked by the dispatcher).
    variants: a kernels.variants.KernelVariants or None (dense calls only)."""
    ensure_allocator()
    d, dv = q.shape[-1], v.shape[-1]
    cfg = dict(cfg)
    persistent = cfg.pop("PERSISTENT", False)
    ws = cfg.pop("WARP_SPECIALIZE", False)
    host = cfg.pop("HOST_DESC", False) and not varlen
    bias_tma = cfg.pop("BIAS_TMA", True) and _bias_tma_ok(variants)
    if host:  # (B, H, N, D) descriptors: one grid-constant parameter each, bounds per (batch, head)
        from triton.tools.tensor_descriptor import TensorDescriptor

        hd, hdv = pow2(d), pow2(dv)
        q, k, v, out = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, cols])
                        for t, rows, cols in ((q, cfg["BLOCK_M"], hd), (k, cfg["BLOCK_N"], hd),
                                              (v, cfg["BLOCK_N"], hdv), (out, cfg["BLOCK_M"], hdv)))
    num_m = triton.cdiv(grid_m, cfg["BLOCK_M"])
    tiles = num_m * batch * h
    if persistent:
        sms = torch.cuda.get_device_properties(lse.device).multi_processor_count if lse.is_cuda else 4  # 4: interpreter
        slots = cfg.pop("PROGRAMS_PER_SM", 1) * sms
        grid = (min(tiles, slots),)
    else:
        cfg.pop("PROGRAMS_PER_SM", None)
        grid = (tiles,)
    cfg.setdefault("LAZY_RESCALE", False)
    cfg.setdefault("M_MAJOR", False)
    cfg.setdefault("PIPELINE_QK", False)
    dummy = cu_q if cu_q is not None else torch.zeros(1, dtype=torch.int32, device=lse.device)
    _hopper_fwd_kernel[grid](
        q, k, v, out, lse, dummy, cu_k if cu_k is not None else dummy,
        *strides_q, *strides_k, *strides_v, *strides_o, *strides_l,
        h, nq, nk, h // hkv, num_m, tiles, scale * LOG2E, max(left, 0), max(right, 0),
        *(variants.args() if variants else plain_args(lse)),
        D=d, DV=dv, HEAD_DIM=pow2(d), HEAD_DIM_V=pow2(dv), HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        IS_VARLEN=varlen, LONGEST_FIRST=right >= 0 and left < 0, PERSISTENT=persistent, WARP_SPECIALIZE=ws,
        HOST=host, BIAS_TMA=bias_tma, **(variants.flags() if variants else PLAIN_FLAGS), **cfg)


def hopper_fwd(q, k, v, *, scale, left, right, config=None, variants=None):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv), lse (B, Hq, Nq) fp32.
    variants: a kernels.variants.KernelVariants (softcap, ALiBi, bias, sinks, dropout) or None."""
    from fa2lab.kernels.hopper_config import hopper_fwd_config

    b, h, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if q.stride(1) < q.stride(2):  # q is a (B, Nq, Hq, D) tensor seen as (B, Hq, Nq, D): write out the same way
        out = torch.empty(b, nq, h, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty(b, h, nq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or nq == 0:
        return out, lse.fill_(float("-inf"))
    cfg = config or hopper_fwd_config(max(q.shape[-1], v.shape[-1]), causal=right >= 0 and left < 0, seq_len=nq,
                                      variants=variants)
    st = lambda t: t.stride()[:3]  # noqa: E731 (batch, head, token)
    launch_hopper_fwd(q, k, v, out, lse, st(q), st(k), st(v), st(out), lse.stride(), b, h, nq, nk, hkv, scale,
                      left, right, None, None, False, nq, cfg, variants)
    return out, lse


def hopper_fwd_varlen(q, k, v, cu_q, cu_k, max_q, *, scale, left, right, config=None):
    """Packed q (total_q, Hq, D), k/v (total_k, Hkv, D) -> out (total_q, Hq, Dv), lse (Hq, total_q) fp32."""
    from fa2lab.kernels.hopper_config import hopper_fwd_config

    total_q, h, _ = q.shape
    hkv = k.shape[1]
    batch = cu_q.numel() - 1
    out = torch.empty(total_q, h, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((h, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0 or max_q == 0:
        return out.zero_(), lse
    cfg = config or hopper_fwd_config(max(q.shape[-1], v.shape[-1]), causal=right >= 0 and left < 0, seq_len=max_q)
    tok = lambda t: (0, t.stride(1), t.stride(0))  # noqa: E731 (token-major: batch stride unused)
    launch_hopper_fwd(q, k, v, out, lse, tok(q), tok(k), tok(v), tok(out), (0, lse.stride(0), lse.stride(1)),
                      batch, h, 0, 0, hkv, scale, left, right, cu_q, cu_k, True, max_q, cfg)
    return out, lse


__all__ = ["ensure_allocator", "hopper_fwd", "hopper_fwd_varlen", "launch_hopper_fwd"]
