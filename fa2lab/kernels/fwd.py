"""FA2 forward in Triton: one program per (query block, batch x head), K/V blocks streamed.

Same algorithm and notation as fa2lab/tiled/forward.py, in the log2 domain (exp2 is the native
instruction; scale * log2(e) is folded into the logits). Masks are FA2's (bottom-right causal,
sliding window); key blocks outside the window are never loaded. Any Nq, Nk (edges masked), any
head dim up to 256 (padded to a power of two with masked loads), GQA by index arithmetic (no K/V
copies), varlen through cu_seqlens. Soft-capping, ALiBi, an additive bias, sinks and dropout are
compile-time switches (kernels/variants.py): switched off, the code is the plain kernel's.

Readable twin: fa2lab/tiled/forward.py. Tests: tests/test_triton.py, tests/test_triton_gpu.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fa2lab.kernels.common import LOG2E, LOG2E_K, dot, ieee_dot, interpreting, online_softmax_step, pow2, seq_offsets
from fa2lab.kernels.variants import PLAIN_FLAGS, _dropout_keep_tile, _variant_logits, plain_args


@triton.jit
def _attn_blocks(acc, l_i, m_i, q, k_base, v_base, start, stop, offs_m, offs_n, offs_d, offs_dv, nk, off, LEFT, RIGHT,
                 skn, skd, svn, svd, qk_scale, nq, bh, cap_in, cap_out, slope2, bias_base, sbm, sbn, dropout_p, seed,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, IEEE_DOT: tl.constexpr,
                 SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """Online softmax over key blocks [start, stop) (Algorithm 1, lines 6-10); MASKED blocks apply
    the window and the key-length bound element by element. Variants (kernels/variants.py) change
    the logits; dropout scales P after l_i has summed it."""
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd,
                        mask=(cols[:, None] < nk) & (offs_d[None, :] < D), other=0.0)  # (BLOCK_N, HEAD_DIM)
        else:
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd, mask=offs_d[None, :] < D, other=0.0)
        s, _ = _variant_logits(dot(q, tl.trans(k), IEEE_DOT), offs_m[:, None], cols[None, :],
                               (offs_m[:, None] < nq) & (cols[None, :] < nk), nq, nk, qk_scale, cap_in, cap_out,
                               slope2, bias_base, sbm, sbn, SOFTCAP, HAS_ALIBI,
                               HAS_BIAS)  # (BLOCK_M, BLOCK_N) logits in log2 units
        if MASKED:
            valid = cols[None, :] < nk
            if HAS_LEFT:
                valid = valid & (cols[None, :] >= offs_m[:, None] + off - LEFT)
            if HAS_RIGHT:
                valid = valid & (cols[None, :] <= offs_m[:, None] + off + RIGHT)
            s = tl.where(valid, s, float("-inf"))
        p, alpha, l_i, m_i = online_softmax_step(s, m_i, l_i)
        if HAS_DROPOUT:  # after l_i: the softmax normalises the undropped probabilities
            keep = _dropout_keep_tile(seed, bh, offs_m, start_n, nq, nk, dropout_p, BLOCK_N)  # a Philox call per 4 keys
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        if MASKED:
            v = tl.load(v_base + cols[:, None] * svn + offs_dv[None, :] * svd,
                        mask=(cols[:, None] < nk) & (offs_dv[None, :] < DV), other=0.0)  # (BLOCK_N, HEAD_DIM_V)
        else:
            v = tl.load(v_base + cols[:, None] * svn + offs_dv[None, :] * svd, mask=offs_dv[None, :] < DV, other=0.0)
        # Line 10: rescale what was accumulated so far; p is rounded to v's dtype first, as on the
        # tensor-core path.
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE_DOT)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, slb, slh, slm,
    H, Nq, Nk, G, qk_scale, LEFT, RIGHT,
    ALIBI, BIAS, SINKS, sab, sah, sbb, sbh, sbm, sbn, cap_in, cap_out, dropout_p, seed,
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, IS_VARLEN: tl.constexpr, IEEE_DOT: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G  # GQA: the K/V head this query head shares
    q_start, nq, k_start, nk = seq_offsets(CU_Q, CU_K, b, Nq, Nk, IS_VARLEN)
    if IS_VARLEN:  # packed sequences: batch index b selects a slice of the token dimension
        b_off_q = q_start.to(tl.int64) * sqm
        b_off_k = k_start.to(tl.int64) * skn
        b_off_v = k_start.to(tl.int64) * svn
        b_off_o = q_start.to(tl.int64) * som
        b_off_l = q_start.to(tl.int64) * slm
    else:
        b_off_q = b.to(tl.int64) * sqb
        b_off_k = b.to(tl.int64) * skb
        b_off_v = b.to(tl.int64) * svb
        b_off_o = b.to(tl.int64) * sob
        b_off_l = b.to(tl.int64) * slb
    i0 = pid_m * BLOCK_M
    if i0 >= nq:
        return
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q_ptrs = Q + b_off_q + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < nq) & (offs_d[None, :] < D), other=0.0)
    k_base = K + b_off_k + hk * skh
    v_base = V + b_off_v + hk * svh
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + b * sab + h * sah) * LOG2E_K
    bias_base = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh

    off = nk - nq  # bottom-right alignment of the diagonal
    lo = 0
    hi = nk
    if HAS_LEFT:
        lo = tl.maximum(0, i0 + off - LEFT)
        lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(nk, tl.minimum(i0 + BLOCK_M, nq) - 1 + off + RIGHT + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    # Blocks every row of this query block sees in full need no mask: [lo_full, hi_full). Only the
    # blocks on the window's edges (and the ragged last block) pay for element-wise masking.
    lo_full = lo
    if HAS_LEFT:
        lo_full = tl.minimum(tl.maximum(lo, tl.cdiv(tl.minimum(i0 + BLOCK_M, nq) - 1 + off - LEFT, BLOCK_N) * BLOCK_N), hi)
    hi_full = (nk // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi_full = tl.minimum(hi_full, ((i0 + off + RIGHT + 1) // BLOCK_N) * BLOCK_N)
    hi_full = tl.maximum(hi_full, lo_full)
    acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_base, v_base, lo, lo_full, offs_m, offs_n, offs_d, offs_dv,
                                 nk, off, LEFT, RIGHT, skn, skd, svn, svd, qk_scale, nq, pid_bh, cap_in, cap_out, slope2, bias_base, sbm, sbn,
                                 dropout_p, seed, D, DV, BLOCK_N,
                                 True, HAS_LEFT, HAS_RIGHT, IEEE_DOT, SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT)
    acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_base, v_base, lo_full, hi_full, offs_m, offs_n, offs_d, offs_dv,
                                 nk, off, LEFT, RIGHT, skn, skd, svn, svd, qk_scale, nq, pid_bh, cap_in, cap_out, slope2, bias_base, sbm, sbn,
                                 dropout_p, seed, D, DV, BLOCK_N,
                                 False, HAS_LEFT, HAS_RIGHT, IEEE_DOT, SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT)
    acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_base, v_base, tl.maximum(hi_full, lo), hi, offs_m, offs_n,
                                 offs_d, offs_dv, nk, off, LEFT, RIGHT, skn, skd, svn, svd, qk_scale, nq, pid_bh, cap_in, cap_out, slope2, bias_base, sbm, sbn,
                                 dropout_p, seed, D, DV, BLOCK_N,
                                 True, HAS_LEFT, HAS_RIGHT, IEEE_DOT, SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    if HAS_SINKS:  # exp(sink) joins the denominator: lse' = logaddexp(lse, sink), out' = out e^(lse - lse')
        sink2 = tl.load(SINKS + h) * LOG2E_K
        top = tl.maximum(lse2, sink2)
        lse_s = top + tl.math.log2(tl.math.exp2(lse2 - top) + tl.math.exp2(sink2 - top))
        out = out * tl.math.exp2(lse2 - lse_s)[:, None]
        lse2 = lse_s
    lse = lse2 / LOG2E_K
    o_ptrs = O + b_off_o + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < nq) & (offs_dv[None, :] < DV))
    tl.store(LSE + b_off_l + h * slh + offs_m * slm, lse, mask=offs_m < nq)


def fwd_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch shape, from the sweep `python -m fa2lab.bench.tune_gpu` on the H100
    (2026-11-22, bf16, N=4096: BENCHMARKS.md). The interpreter uses the same shapes."""
    if dtype == torch.float32:  # 4-byte tiles: the bf16 shapes overflow shared memory (393 KB > 227 KB)
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)  # 451 TFLOP/s (BLOCK_N=128: 357)
    if head_dim <= 128:
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)  # 494 / 436 causal (BLOCK_N=64: 472 / 431)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)  # head dim 256: register-bound, untuned


def _launch(q, k, v, out, lse, strides_q, strides_k, strides_v, strides_o, strides_l, batch, h, nq, nk, hkv,
            scale, left, right, cu_q, cu_k, varlen, grid_m, config=None, variants=None):
    d, dv = q.shape[-1], v.shape[-1]
    cfg = dict(config or fwd_config(max(d, dv), q.dtype))
    if variants is not None and variants.var.attn_bias is not None and config is None:
        # The bias tile is a third pipelined load: three stages of K, V and bias tiles need 288 KB
        # of shared memory at D = 128 (H200: 227 KB); two fit.
        cfg["num_stages"] = min(cfg["num_stages"], 2)
    grid = (triton.cdiv(grid_m, cfg["BLOCK_M"]), batch * h)
    dummy = cu_q if cu_q is not None else torch.zeros(1, dtype=torch.int32, device=q.device)
    _fwd_kernel[grid](
        q, k, v, out, lse, dummy, cu_k if cu_k is not None else dummy,
        *strides_q, *strides_k, *strides_v, *strides_o, *strides_l,
        h, nq, nk, h // hkv, scale * LOG2E, max(left, 0), max(right, 0),
        *(variants.args() if variants else plain_args(q)),
        D=d, DV=dv, HEAD_DIM=pow2(d), HEAD_DIM_V=pow2(dv), HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        IS_VARLEN=varlen, IEEE_DOT=ieee_dot(q.dtype), **(variants.flags() if variants else PLAIN_FLAGS), **cfg)


def flash_fwd_triton(q, k, v, *, scale, left, right, config=None, variants=None):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv), lse (B, Hq, Nq) fp32.
    variants: a kernels.variants.KernelVariants (softcap, ALiBi, bias, sinks, dropout) or None."""
    b, h, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if q.stride(1) < q.stride(2):  # q is a (B, Nq, Hq, D) tensor seen as (B, Hq, Nq, D): write out the same way
        out = torch.empty(b, nq, h, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty(b, h, nq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or nq == 0:
        return out, lse.fill_(float("-inf"))
    _launch(q, k, v, out, lse, q.stride(), k.stride(), v.stride(), out.stride(), (*lse.stride(), ),
            b, h, nq, nk, hkv, scale, left, right, None, None, False, nq, config, variants)
    return out, lse


def flash_fwd_varlen_triton(q, k, v, cu_q, cu_k, max_q, *, scale, left, right, config=None):
    """Packed q (total_q, Hq, D), k/v (total_k, Hkv, D) -> out (total_q, Hq, Dv), lse (Hq, total_q) fp32."""
    total_q, h, _ = q.shape
    hkv = k.shape[1]
    batch = cu_q.numel() - 1
    out = torch.empty(total_q, h, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((h, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0 or max_q == 0:
        return out.zero_(), lse
    sq, sk, sv, so = q.stride(), k.stride(), v.stride(), out.stride()
    # Per-token layout: batch stride unused (0), token stride = dim 0, head stride = dim 1.
    _launch(q, k, v, out, lse, (0, sq[1], sq[0], sq[2]), (0, sk[1], sk[0], sk[2]), (0, sv[1], sv[0], sv[2]),
            (0, so[1], so[0], so[2]), (0, lse.stride(0), lse.stride(1)), batch, h, 0, 0, hkv, scale, left, right,
            cu_q, cu_k, True, max_q, config)
    return out, lse


__all__ = ["flash_fwd_triton", "flash_fwd_varlen_triton", "fwd_config", "ieee_dot", "interpreting"]
