"""dK and dV for Hopper written in Gluon, warp-specialised (FA3's backward structure); dQ stays with
hopper_bwd.py's dQ kernel (the two-pass backward, so no atomics).

One program holds BLOCK_N = 128 keys of one (batch, query head): a producer warp streams the query
blocks Q_i and dO_i (BLOCK_M rows) through a ring of mbarrier-tracked buffers, and two consumer
warpgroups, 64 keys each, run per query block (transposed, as the portable backward's dK/dV pass):

    S^T = K Q_i^T   and   dP^T = V dO_i^T          (both issued async; S^T waited first)
    P^T = exp2(S^T * scale * log2(e) - lse2_i)      (under the dP^T wgmma)
    dV += P^T dO_i                                  (async, P^T from registers)
    dS^T = P^T * (dP^T - Delta_i)                   (under the dV wgmma)
    dK += dS^T Q_i                                  (async); wait; free Q_i and dO_i

Rows past the sequence ends read as zeros (TMA): a zero query row has dO = 0 and, its LSE read as
+inf, P = 0, so only causal / window edges need an element-wise mask; keys past Nk give rows of
dK / dV that the clipped stores drop. Programs run per query head: with GQA (G query heads per
K/V head) each writes its fp32 dK / dV partials and the G partials are summed after the kernel
(hopper_bwd.py), instead of the G-loop in registers of the Triton kernel.

Plain dense calls (no varlen, no variants), fp16/bf16, Dv == D, 32 < D <= 128. Not yet run on a
GPU: compiled for sm_90a (Triton 3.6) only, so the dispatcher never routes a call here
(no row of hopper_config.BWD names it); tests/test_gluon_gpu.py and `python -m
fa2lab.bench.hopper_bwd_gpu --plan gluon` check and time it through hopper_bwd's config key
"gluon_dkdv": (BLOCK_M, BLOCK_N, STAGES), with the two-pass "dq" kernel beside.
"""

from __future__ import annotations

import torch
import triton

from fa2lab.kernels.common import LOG2E, pow2
from fa2lab.kernels.gluon_fwd import HAVE_GLUON

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

    from fa2lab.kernels.gluon_fwd import _descriptors, _ring_barriers, _stream_pairs, _tma_load

    LOG2E_G: gl.constexpr = gl.constexpr(LOG2E)

    @gluon.jit
    def _query_blocks(j0, Nq, Nk, LEFT, RIGHT, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """Query blocks [lo, lo + n_blocks * BLOCK_M) that see a key of [j0, j0 + BLOCK_N), and the range
        [lo_full, hi_full) whose every row sees every one of those keys (no mask needed there)."""
        off = Nk - Nq  # bottom-right alignment of the diagonal
        j_last = gl.minimum(j0 + BLOCK_N, Nk) - 1
        lo = 0
        hi = Nq
        if HAS_RIGHT:
            lo = (gl.maximum(0, j0 - off - RIGHT) // BLOCK_M) * BLOCK_M
        if HAS_LEFT:
            hi = gl.maximum(0, gl.minimum(Nq, j_last - off + LEFT + 1))
        lo_full = lo
        if HAS_RIGHT:
            lo_full = gl.minimum(gl.maximum(lo, gl.cdiv(gl.maximum(0, j_last - off - RIGHT), BLOCK_M) * BLOCK_M), hi)
        hi_full = hi
        if HAS_LEFT:
            hi_full = gl.minimum(hi, (gl.maximum(0, j0 - off + LEFT + 1) // BLOCK_M) * BLOCK_M)
        hi_full = gl.maximum(hi_full, lo_full)
        return lo, gl.cdiv(gl.maximum(hi - lo, 0), BLOCK_M), lo_full, hi_full

    @gluon.jit
    def _bwd_loader(desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                    do_ready, do_empty, j0, lo, n_blocks, LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D,
                    lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                    HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """One warp: this program's K and V once, then Q_i and dO_i into the ring as the consumers free it."""
        mbarrier.expect(kv_bar, 2 * BLOCK_N * HEAD_DIM * 2)
        _tma_load(desc_k, [j0, 0], kv_bar, k_smem)
        _tma_load(desc_v, [j0, 0], kv_bar, v_smem)
        _stream_pairs(desc_q, desc_do, q_smem, do_smem, q_ready, q_empty, do_ready, do_empty, lo, n_blocks, BLOCK_M,
                      HEAD_DIM, STAGES)

    @gluon.jit
    def _bwd_consumer(desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                      do_ready, do_empty, j0, lo, n_blocks, LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D,
                      lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                      HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, WG: gl.constexpr):
        """One warpgroup: keys [j0 + WG * 64, + 64) of the program's block, every query block."""
        ROWS: gl.constexpr = BLOCK_N // 2
        dtype: gl.constexpr = q_smem.dtype
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])  # S^T, dP^T (ROWS, BLOCK_M)
        mma_d: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])  # dK, dV (ROWS, HEAD_DIM)
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_d, k_width=2)
        key_s: gl.constexpr = gl.SliceLayout(1, mma_s)
        query_s: gl.constexpr = gl.SliceLayout(0, mma_s)
        k_rows = k_smem.slice(WG * ROWS, ROWS)
        v_rows = v_smem.slice(WG * ROWS, ROWS)
        off = Nk - Nq
        keys = j0 + WG * ROWS + gl.arange(0, ROWS, layout=key_s)
        dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=mma_d)
        dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=mma_d)
        zero_s = gl.zeros([ROWS, BLOCK_M], gl.float32, layout=mma_s)
        mbarrier.wait(kv_bar, 0)
        for i in range(n_blocks):
            st = i % STAGES
            ph = (i // STAGES) & 1
            start_m = lo + i * BLOCK_M
            queries = start_m + gl.arange(0, BLOCK_M, layout=query_s)
            in_q = queries < Nq
            lse2 = gl.load(LSE_H + queries.to(gl.int64) * slm, mask=in_q, other=float("inf")) * LOG2E_G
            lse2 = gl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows with no key: P = 0
            delta = gl.load(DELTA_H + queries.to(gl.int64) * slm, mask=in_q, other=0.0)
            mbarrier.wait(q_ready.index(st), ph)
            s_tok = warpgroup_mma(k_rows, q_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            mbarrier.wait(do_ready.index(st), ph)
            dp_tok = warpgroup_mma(v_rows, do_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))  # S^T done; dP^T may still run
            p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 0))
            if HAS_LEFT or HAS_RIGHT:
                if (start_m < lo_full) | (start_m + BLOCK_M > hi_full):  # a causal / window edge
                    # Keys past Nk need no mask here: their dK / dV rows are never stored.
                    rel = gl.expand_dims(keys, 1) - gl.expand_dims(queries + off, 0)  # key - aligned query
                    if HAS_LEFT and HAS_RIGHT:
                        p = gl.where((rel >= -LEFT) & (rel <= RIGHT), p, 0.0)
                    elif HAS_RIGHT:
                        p = gl.where(rel <= RIGHT, p, 0.0)
                    else:
                        p = gl.where(rel >= -LEFT, p, 0.0)
            p_op = gl.convert_layout(p.to(dtype), op_layout)
            dv_tok = warpgroup_mma(p_op, do_smem.index(st), dv, is_async=True)
            dp = warpgroup_mma_wait(num_outstanding=1, deps=(dp_tok, ))  # dP^T done; dV may still run
            ds = p * (dp - gl.expand_dims(delta, 0))
            ds_op = gl.convert_layout(ds.to(dtype), op_layout)
            dk_tok = warpgroup_mma(ds_op, q_smem.index(st), dk, is_async=True)
            dv, dk, p_op, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, dk_tok, p_op, ds_op))
            mbarrier.arrive(q_empty.index(st), count=1)
            mbarrier.arrive(do_empty.index(st), count=1)
        rows_d: gl.constexpr = gl.SliceLayout(1, mma_d)
        cols_d: gl.constexpr = gl.SliceLayout(0, mma_d)
        r = gl.expand_dims(j0 + WG * ROWS + gl.arange(0, ROWS, layout=rows_d), 1).to(gl.int64)
        c = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=cols_d), 0)
        keep = (r < Nk) & (c < D)
        gl.store(DK + r * sdk + c, (dk * sm_scale).to(DK.dtype.element_ty), mask=keep)
        gl.store(DV + r * sdv + c, dv.to(DV.dtype.element_ty), mask=keep)

    @gluon.jit
    def _bwd_consumer_0(desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                        do_ready, do_empty, j0, lo, n_blocks, LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D,
                        lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M: gl.constexpr,
                        BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                        HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """The partitions share one signature (the kernel passes each the same arguments): consumer 0."""
        _bwd_consumer(desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                      do_ready, do_empty, j0, lo, n_blocks, LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D,
                      lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                      HAS_LEFT, HAS_RIGHT, 0)

    @gluon.jit
    def _bwd_consumer_1(desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                        do_ready, do_empty, j0, lo, n_blocks, LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D,
                        lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M: gl.constexpr,
                        BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                        HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        _bwd_consumer(desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                      do_ready, do_empty, j0, lo, n_blocks, LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D,
                      lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                      HAS_LEFT, HAS_RIGHT, 1)

    @gluon.jit
    def _gluon_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                           sdob, sdoh, sdom, slb, slh, slm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, H, Nq, Nk, G, D,
                           NUM_N, qk_scale, sm_scale, LEFT, RIGHT, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_LEFT: gl.constexpr,
                           HAS_RIGHT: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
        pid_n = gl.program_id(0)  # causal: key block 0 is seen by the most queries, so this order is longest-first
        bh = gl.program_id(1)
        b = (bh // H).to(gl.int64)
        h = (bh % H).to(gl.int64)
        hk = h // G
        j0 = pid_n * BLOCK_N
        dtype: gl.constexpr = Q.dtype.element_ty
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        # The forward's descriptors, dO in the output's place: (BLOCK_M, D) blocks of Q and dO, (BLOCK_N, D) of K, V.
        desc_q, desc_k, desc_v, desc_do = _descriptors(Q, K, V, DO, b, h, hk, sqb, sqh, sqm, skb, skh, skn, svb, svh,
                                                       svn, sdob, sdoh, sdom, Nq, Nk, D, HEAD_DIM, BLOCK_M, BLOCK_N,
                                                       BLOCK_M)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_layout)
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], kv_layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        q_ready, q_empty, do_ready, do_empty = _ring_barriers(STAGES, 2)
        lo, n_blocks, lo_full, hi_full = _query_blocks(j0, Nq, Nk, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT,
                                                       HAS_RIGHT)
        lse_h = LSE + b * slb + h * slh
        delta_h = DELTA + b * slb + h * slh
        dk_h = DK + b * sdkb + h * sdkh  # per query head: the caller sums GQA's partials
        dv_h = DV + b * sdvb + h * sdvh
        gl.warp_specialize([
            (_bwd_consumer_0, (
                desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                do_ready, do_empty, j0, lo, n_blocks, lse_h, delta_h, slm, dk_h, dv_h, sdkn, sdvn, Nq, Nk, D,
                lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                HAS_LEFT, HAS_RIGHT)),
            (_bwd_consumer_1, (
                desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                do_ready, do_empty, j0, lo, n_blocks, lse_h, delta_h, slm, dk_h, dv_h, sdkn, sdvn, Nq, Nk, D,
                lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                HAS_LEFT, HAS_RIGHT)),
            (_bwd_loader, (
                desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                do_ready, do_empty, j0, lo, n_blocks, lse_h, delta_h, slm, dk_h, dv_h, sdkn, sdvn, Nq, Nk, D,
                lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                HAS_LEFT, HAS_RIGHT)),
        ], [4, 1], [CONSUMER_REGS, 24])


def gluon_dkdv_takes(q, k, v) -> bool:
    """Shapes this kernel takes (the caller has checked sm_90 and TMA strides): Dv == D, 32 < D <= 128, 16-bit."""
    return (HAVE_GLUON and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == v.shape[-1]
            and 32 < q.shape[-1] <= 128)


def gluon_dkdv(do, q, k, v, lse, delta, *, scale, left, right, block_m=64, block_n=128, stages=2):
    """Dense (B, H, N, D) inputs, lse and delta (B, Hq, Nq) fp32 (delta = rowsum(dO * O) - dLSE)
    -> dk, dv in k's and v's dtypes and shapes (GQA's G query heads summed)."""
    from fa2lab.kernels.hopper_fwd import ensure_allocator

    if delta.stride() != lse.stride():
        raise ValueError(f"delta and lse must share strides (both (B, Hq, Nq)), got {delta.stride()} and {lse.stride()}")
    if block_n != 128:
        raise ValueError(f"the Gluon dK/dV kernel gives each of its two consumer warpgroups 64 keys: block_n=128, "
                         f"got {block_n}")
    ensure_allocator()
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = h // hkv
    if group == 1:  # one query head per K/V head: the kernel writes the gradients themselves
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    else:  # fp32 partials per query head, summed below
        dk = torch.empty(b, h, nk, d, dtype=torch.float32, device=q.device)
        dv = torch.empty(b, h, nk, d, dtype=torch.float32, device=q.device)
    num_n = triton.cdiv(nk, block_n)
    st = lambda t: t.stride()[:3]  # noqa: E731 (batch, head, token)
    _gluon_dkdv_kernel[(num_n, b * h)](
        q, k, v, do, lse, delta, dk, dv, *st(q), *st(k), *st(v), *st(do), *lse.stride(), *st(dk), *st(dv),
        h, nq, nk, group, d, num_n, scale * LOG2E, scale, max(left, 0), max(right, 0), HEAD_DIM=pow2(d),
        BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        CONSUMER_REGS=240, num_warps=4, maxnreg=168)
    if group > 1:  # into k's and v's layouts, as the Triton backward returns them
        dk = torch.empty_like(k).copy_(dk.view(b, hkv, group, nk, d).sum(2))
        dv = torch.empty_like(v).copy_(dv.view(b, hkv, group, nk, d).sum(2))
    return dk, dv


__all__ = ["gluon_dkdv", "gluon_dkdv_takes"]
