"""The Hopper backward written in Gluon, warp-specialised (FA3's structure): dK and dV, and dQ in the same
pass (the default for plain calls at the head dims whose hopper_config.BWD row holds "gluon_dkdvq"); without
dQ, hopper_bwd.py's dQ kernel runs after it (the two-pass backward: the other rows, deterministic mode).

One program holds BLOCK_N = 128 keys of one (batch, query head): a producer warp streams the query
blocks Q_i and dO_i (BLOCK_M rows) through a ring of mbarrier-tracked buffers, and two consumer
warpgroups, 64 keys each, run per query block (transposed, as the portable backward's dK/dV pass):

    S^T = K Q_i^T   and   dP^T = V dO_i^T          (both issued async; S^T waited first)
    P^T = exp2(S^T * scale * log2(e) - lse2_i)      (under the dP^T wgmma)
    dV += P^T dO_i                                  (async, P^T from registers)
    dS^T = P^T * (dP^T - Delta_i)                   (under the dV wgmma)
    dK += dS^T Q_i                                  (async); wait; free Q_i and dO_i

With DQ (the one-pass backward, 5 matmuls per block instead of the two passes' 7), each warpgroup
also writes its dS^T rows to one of two shared buffers (BLOCK_N, BLOCK_M); once both have (an
mbarrier of count 2), warpgroup w computes dQ_i[:, w*D/2 : (w+1)*D/2] = dS_i K[:, same columns]
over all BLOCK_N keys and adds it to fp32 sums in global memory (the caller scales and casts
them): by default through a shared buffer per warpgroup and one TMA reduce-add (the copy engine's
cp.reduce.async.bulk, FA3's way: 1.12-1.26x the two passes at D=128 on the H200), or element-wise by
relaxed fp32 atomics (dq_reduce="atomic": 0.74-0.78x the two passes, kept to compare). Key blocks add
in a run-dependent order, so dQ's last bits vary between runs: the deterministic mode keeps the two
passes (hopper_config.hopper_bwd_config). The sums take 4 x B x Hq x Nq x pow2(D) bytes (twice q).

Rows past the sequence ends read as zeros (TMA): a zero query row has dO = 0 and, its LSE read as
+inf, P = 0, so only causal / window edges need an element-wise mask; keys past Nk give rows of
dK / dV that the clipped stores drop (and zero rows of K, so nothing in dQ). Programs run per query
head: with GQA (G query heads per K/V head) each writes its fp32 dK / dV partials and the G partials
are summed after the kernel (hopper_bwd.py), instead of the G-loop in registers of the Triton kernel.

`_gluon_dkdv_persistent_kernel` (option "persistent"; hopper_config.BWD_SHORT for MHA calls up to 2048
tokens) runs the same blocks with one program per SM walking the (key block, head) tiles, the loader
fetching the next tile's K, V and first Q / dO while the consumers store this tile's dK / dV.

Plain dense calls (no varlen, no variants), fp16/bf16, Dv == D, 32 < D <= 128 (dQ's halves: 32 or 64 columns).
Gluon does not run in the interpreter: tests/test_gluon_gpu.py checks both modes on an sm_90 GPU
through hopper_config.BWD's keys "gluon_dkdv" (dK / dV here, the two-pass "dq" kernel beside) and
"gluon_dkdvq" (everything here): (BLOCK_M, BLOCK_N, STAGES[, "tma" | "atomic"]); `python -m fa2lab.bench.hopper_bwd_gpu
--plan gluon` / `--plan fused` time them through the public call.
"""

from __future__ import annotations

import torch
import triton

from fa2lab.kernels.common import LOG2E, pow2
from fa2lab.kernels.gluon_fwd import HAVE_GLUON, L2_SECTION_BYTES, _box_strides, _box_strides_ok, _sm_count

HAVE_TMA_REDUCE = False
if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    from triton.experimental.gluon.language._core import builtin as _gluon_builtin
    from triton.experimental.gluon.language.nvidia.hopper import tma

    from fa2lab.kernels.gluon_fwd import _cta_barrier, _descriptors, _ring_barriers, _stream_pairs, _tma_load

    # The copy engine's reduce-add of a shared tile into global memory (cp.reduce.async.bulk.tensor):
    # Triton 3.6's Gluon builds it (GluonOpBuilder.create_async_tma_reduce) but exports no function.
    try:
        from triton._C.libtriton import gluon_ir as _gluon_ir

        HAVE_TMA_REDUCE = hasattr(_gluon_ir.GluonOpBuilder, "create_async_tma_reduce")
    except ImportError:
        HAVE_TMA_REDUCE = False

    @_gluon_builtin
    def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        from triton._C.libtriton import ir

        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)

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
    def _band(p, rel, LEFT, RIGHT, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """p where rel (key - bottom-right-aligned query) lies in the window [-LEFT, RIGHT] (a side without its
        flag is unbounded), else 0: the causal / sliding-window mask of a diagonal tile."""
        if HAS_LEFT and HAS_RIGHT:
            p = gl.where((rel >= -LEFT) & (rel <= RIGHT), p, 0.0)
        elif HAS_RIGHT:
            p = gl.where(rel <= RIGHT, p, 0.0)
        elif HAS_LEFT:
            p = gl.where(rel >= -LEFT, p, 0.0)
        return p

    @gluon.jit
    def _bwd_loader(desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                    do_ready, do_empty, ds_smem, ds_bar, dq_smem, desc_dq, j0, lo, n_blocks,
                    LSE_H, DELTA_H, slm, DK, DV, sdk, sdv,
                    DQA, sam, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                    HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DQ: gl.constexpr,
                    DQ_TMA: gl.constexpr):
        """One warp: this program's K and V once, then Q_i and dO_i into the ring as the consumers free it."""
        mbarrier.expect(kv_bar, 2 * BLOCK_N * HEAD_DIM * 2)
        _tma_load(desc_k, [j0, 0], kv_bar, k_smem)
        _tma_load(desc_v, [j0, 0], kv_bar, v_smem)
        _stream_pairs(desc_q, desc_do, q_smem, do_smem, q_ready, q_empty, do_ready, do_empty, lo, n_blocks, BLOCK_M,
                      HEAD_DIM, STAGES)

    @gluon.jit
    def _bwd_block(i, it, dk, dv, keys, k_smem, v_smem, q_smem, do_smem, q_ready, q_empty, do_ready, do_empty, ds_smem,
                   ds_bar, dq_smem, desc_dq, b, h, lo, LSE_H, DELTA_H, slm, DQA, sam, Nq, off, lo_full, hi_full, LEFT,
                   RIGHT, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                   STAGES: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DQ: gl.constexpr,
                   DQ_TMA: gl.constexpr, DESC4: gl.constexpr, WG: gl.constexpr):
        """Query block i of a key block (ring slot and dS buffer from `it`, the blocks this program has run
        before it): one warpgroup's S^T, dP^T, dV, dK and, with DQ, its half of dQ_i -> dk, dv. DESC4: dQ's
        descriptor is the persistent kernel's (B, H, rows, D) one (coordinates b, h first)."""
        ROWS: gl.constexpr = BLOCK_N // 2
        DQ_COLS: gl.constexpr = HEAD_DIM // 2
        dtype: gl.constexpr = q_smem.dtype
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])  # S^T, dP^T (ROWS, BLOCK_M)
        mma_d: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])  # dK, dV (ROWS, HEAD_DIM)
        mma_q: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_COLS, 16])  # dQ (BLOCK_M, DQ_COLS)
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_d, k_width=2)
        query_s: gl.constexpr = gl.SliceLayout(0, mma_s)
        k_rows = k_smem.slice(WG * ROWS, ROWS)
        v_rows = v_smem.slice(WG * ROWS, ROWS)
        zero_s = gl.zeros([ROWS, BLOCK_M], gl.float32, layout=mma_s)
        st = it % STAGES
        ph = (it // STAGES) & 1
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
                p = _band(p, rel, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
        p_op = gl.convert_layout(p.to(dtype), op_layout)
        dv_tok = warpgroup_mma(p_op, do_smem.index(st), dv, is_async=True)
        dp = warpgroup_mma_wait(num_outstanding=1, deps=(dp_tok, ))  # dP^T done; dV may still run
        ds = p * (dp - gl.expand_dims(delta, 0))
        ds_op = gl.convert_layout(ds.to(dtype), op_layout)
        dk_tok = warpgroup_mma(ds_op, q_smem.index(st), dk, is_async=True)
        if DQ:  # this warpgroup's 64 rows of dS^T into the block's (BLOCK_N, BLOCK_M) buffer, for dQ below
            ds_smem.index(it % 2).slice(WG * ROWS, ROWS).store(ds.to(dtype))
            fence_async_shared()
            _cta_barrier()  # every thread's rows are written before the one arrival
            mbarrier.arrive(ds_bar.index(it % 2), count=1)
        dv, dk, p_op, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, dk_tok, p_op, ds_op))
        mbarrier.arrive(q_empty.index(st), count=1)
        mbarrier.arrive(do_empty.index(st), count=1)
        if DQ:
            # dQ_i[:, cols] += dS_i K[:, cols] over all BLOCK_N keys (both warpgroups' dS^T rows), this
            # warpgroup's half of the columns; added in fp32 to the (padded) dQ sums. The buffer is
            # rewritten two blocks later, after both warpgroups have passed this block's wait.
            mbarrier.wait(ds_bar.index(it % 2), (it // 2) & 1)
            zero_q = gl.zeros([BLOCK_M, DQ_COLS], gl.float32, layout=mma_q)
            dq = warpgroup_mma(ds_smem.index(it % 2).permute((1, 0)), k_smem.slice(WG * DQ_COLS, DQ_COLS, dim=1),
                               zero_q, use_acc=False)
            if DQ_TMA:  # one bulk reduce-add of the (BLOCK_M, DQ_COLS) tile by the copy engine
                tma.store_wait(0)  # this warpgroup's previous reduce has read its buffer
                _cta_barrier()
                dq_buf = dq_smem.index(WG)
                dq_buf.store(dq)
                fence_async_shared()
                if DESC4:
                    dq4: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_M, DQ_COLS], gl.float32)
                    _tma_reduce_add(desc_dq, [b, h, start_m, WG * DQ_COLS],
                                    dq_buf._reinterpret(gl.float32, [1, 1, BLOCK_M, DQ_COLS], dq4))
                else:
                    _tma_reduce_add(desc_dq, [start_m, WG * DQ_COLS], dq_buf)
            else:  # element-wise fp32 atomics (32 per thread and block)
                dq_cols = gl.expand_dims(WG * DQ_COLS + gl.arange(0, DQ_COLS, layout=gl.SliceLayout(0, mma_q)), 0)
                q_rows = gl.expand_dims(start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_q)), 1)
                gl.atomic_add(DQA + q_rows * sam + dq_cols, dq, sem="relaxed")
        return dk, dv

    @gluon.jit
    def _store_dkdv(dk, dv, DK, DV, sdk, sdv, j0, Nk, D, sm_scale, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                    WG: gl.constexpr):
        """This warpgroup's 64 rows of dK (scaled) and dV, clipped to Nk keys and D columns."""
        ROWS: gl.constexpr = BLOCK_N // 2
        mma_d: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
        rows_d: gl.constexpr = gl.SliceLayout(1, mma_d)
        cols_d: gl.constexpr = gl.SliceLayout(0, mma_d)
        r = gl.expand_dims(j0 + WG * ROWS + gl.arange(0, ROWS, layout=rows_d), 1).to(gl.int64)
        c = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=cols_d), 0)
        keep = (r < Nk) & (c < D)
        gl.store(DK + r * sdk + c, (dk * sm_scale).to(DK.dtype.element_ty), mask=keep)
        gl.store(DV + r * sdv + c, dv.to(DV.dtype.element_ty), mask=keep)

    @gluon.jit
    def _bwd_consumer(desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                      do_ready, do_empty, ds_smem, ds_bar, dq_smem, desc_dq, j0, lo, n_blocks,
                      LSE_H, DELTA_H, slm, DK, DV, sdk, sdv,
                      DQA, sam, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                      HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DQ: gl.constexpr,
                      DQ_TMA: gl.constexpr, WG: gl.constexpr):
        """One warpgroup: keys [j0 + WG * 64, + 64) of the program's block, every query block."""
        ROWS: gl.constexpr = BLOCK_N // 2
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
        mma_d: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
        key_s: gl.constexpr = gl.SliceLayout(1, mma_s)
        keys = j0 + WG * ROWS + gl.arange(0, ROWS, layout=key_s)
        dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=mma_d)
        dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=mma_d)
        mbarrier.wait(kv_bar, 0)
        for i in range(n_blocks):
            dk, dv = _bwd_block(i, i, dk, dv, keys, k_smem, v_smem, q_smem, do_smem, q_ready, q_empty, do_ready,
                                do_empty, ds_smem, ds_bar, dq_smem, desc_dq, 0, 0, lo, LSE_H, DELTA_H, slm, DQA, sam,
                                Nq, Nk - Nq, lo_full, hi_full, LEFT, RIGHT, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM,
                                STAGES, HAS_LEFT, HAS_RIGHT, DQ, DQ_TMA, False, WG)
        if DQ_TMA:
            tma.store_wait(0)
        _store_dkdv(dk, dv, DK, DV, sdk, sdv, j0, Nk, D, sm_scale, BLOCK_N, HEAD_DIM, WG)

    @gluon.jit
    def _bwd_consumer_0(desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                        do_ready, do_empty, ds_smem, ds_bar, dq_smem, desc_dq, j0, lo, n_blocks,
                        LSE_H, DELTA_H, slm, DK, DV, sdk, sdv,
                        DQA, sam, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M: gl.constexpr,
                        BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                        HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DQ: gl.constexpr,
                    DQ_TMA: gl.constexpr):
        """The partitions share one signature (the kernel passes each the same arguments): consumer 0."""
        _bwd_consumer(desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                      do_ready, do_empty, ds_smem, ds_bar, dq_smem, desc_dq, j0, lo, n_blocks,
                      LSE_H, DELTA_H, slm, DK, DV, sdk, sdv,
                      DQA, sam, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N,
                      HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, DQ, DQ_TMA, 0)

    @gluon.jit
    def _bwd_consumer_1(desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                        do_ready, do_empty, ds_smem, ds_bar, dq_smem, desc_dq, j0, lo, n_blocks,
                        LSE_H, DELTA_H, slm, DK, DV, sdk, sdv,
                        DQA, sam, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M: gl.constexpr,
                        BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                        HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DQ: gl.constexpr,
                    DQ_TMA: gl.constexpr):
        _bwd_consumer(desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                      do_ready, do_empty, ds_smem, ds_bar, dq_smem, desc_dq, j0, lo, n_blocks,
                      LSE_H, DELTA_H, slm, DK, DV, sdk, sdv,
                      DQA, sam, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N,
                      HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, DQ, DQ_TMA, 1)

    @gluon.jit
    def _gluon_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQA, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                           sdob, sdoh, sdom, slb, slh, slm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sab, sah, sam, NQ_PAD, H,
                           Nq, Nk, G, D, NUM_N, qk_scale, sm_scale, LEFT, RIGHT, HEAD_DIM: gl.constexpr,
                           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                           HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, DQ: gl.constexpr,
                           DQ_TMA: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
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
        # DQ: two buffers of dS^T (BLOCK_N, BLOCK_M), each complete when both consumers have written theirs
        if DQ:
            ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
            ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ds_layout)
        else:  # not read: any buffer stands in
            ds_smem = q_smem
        DQ_COLS: gl.constexpr = HEAD_DIM // 2
        if DQ_TMA:  # each consumer's dQ tile goes by a TMA reduce-add from its own buffer
            dq_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, DQ_COLS], gl.float32)
            dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, DQ_COLS], dq_layout)
            desc_dq = tma.make_tensor_descriptor(DQA + b * sab + h * sah, shape=[NQ_PAD, HEAD_DIM], strides=[sam, 1],
                                                 block_shape=[BLOCK_M, DQ_COLS], layout=dq_layout)
        else:  # not read: stand-ins
            dq_smem = q_smem
            desc_dq = desc_q
        ds_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(ds_bar.index(i), count=2)
        lo, n_blocks, lo_full, hi_full = _query_blocks(j0, Nq, Nk, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT,
                                                       HAS_RIGHT)
        lse_h = LSE + b * slb + h * slh
        delta_h = DELTA + b * slb + h * slh
        dk_h = DK + b * sdkb + h * sdkh  # per query head: the caller sums GQA's partials
        dv_h = DV + b * sdvb + h * sdvh
        dqa_h = DQA + b * sab + h * sah
        gl.warp_specialize([
            (_bwd_consumer_0, (
                desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                do_ready, do_empty, ds_smem, ds_bar, dq_smem, desc_dq, j0, lo, n_blocks,
                lse_h, delta_h, slm, dk_h, dv_h, sdkn, sdvn,
                dqa_h, sam, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N,
                HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, DQ, DQ_TMA)),
            (_bwd_consumer_1, (
                desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                do_ready, do_empty, ds_smem, ds_bar, dq_smem, desc_dq, j0, lo, n_blocks,
                lse_h, delta_h, slm, dk_h, dv_h, sdkn, sdvn,
                dqa_h, sam, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N,
                HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, DQ, DQ_TMA)),
            (_bwd_loader, (
                desc_q, desc_k, desc_v, desc_do, q_smem, do_smem, k_smem, v_smem, kv_bar, q_ready, q_empty,
                do_ready, do_empty, ds_smem, ds_bar, dq_smem, desc_dq, j0, lo, n_blocks,
                lse_h, delta_h, slm, dk_h, dv_h, sdkn, sdvn,
                dqa_h, sam, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N,
                HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, DQ, DQ_TMA)),
        ], [4, 1], [CONSUMER_REGS, 24])


    # ---- The persistent backward (a config's "persistent" flag) -----------------------------------------
    # One program per SM walks (key block, head) tiles in a snake order; causal: heads in sections whose Q,
    # dO and dQ sums fit in L2, key block 0 (seen by the most queries) first. The loader runs ahead across
    # tiles: once both consumers are done with a tile's K and V (kv_empty) it loads the next tile's, then its
    # first Q / dO blocks, while the consumers store this tile's dK / dV: a short tile's prologue and
    # epilogue (N = 1024: 9 query blocks per causal key block on average) overlap the neighbouring tiles'
    # work. Descriptors over the whole (B, H, N, D) tensors (4-d boxes), built once per program.

    @gluon.jit
    def _bwd_tile(k, pid, nprog, NUM_N, BH, H, G, SECTION, BLOCK_N: gl.constexpr, LONGEST_FIRST: gl.constexpr):
        """This program's k-th tile -> (tile index, batch, query head, K/V head, first key row)."""
        t = k * nprog + gl.where(k % 2 == 0, pid, nprog - 1 - pid)
        if LONGEST_FIRST:
            per = SECTION * NUM_N
            sec = t // per
            width = gl.maximum(gl.minimum(SECTION, BH - sec * SECTION), 1)  # >= 1 past the last tile too
            r = t % per
            pid_n = r // width
            bh = sec * SECTION + r % width
        else:
            bh = t // NUM_N
            pid_n = t % NUM_N
        h = bh % H
        return t, bh // H, h, h // G, pid_n * BLOCK_N

    @gluon.jit
    def _pbwd_loader(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem,
                     kv_bar, kv_empty, q_ready, q_empty, do_ready, do_empty, ds_bar, LSE, DELTA, DK, DV, DQA, slb,
                     slh, slm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sab, sah, sam, num_tiles, NUM_N, BH, H, G, SECTION,
                     Nq, Nk, D, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                     DQ: gl.constexpr, DQ_TMA: gl.constexpr, LONGEST_FIRST: gl.constexpr):
        """One warp: per tile, K and V once both consumers have released the last tile's, then Q_i and dO_i into
        the ring (slot = blocks so far % STAGES)."""
        dtype: gl.constexpr = q_smem.dtype
        q4: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_M, HEAD_DIM], dtype)
        kv4: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_N, HEAD_DIM], dtype)
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        it = 0
        done = 0
        for k in range(gl.cdiv(num_tiles, nprog)):
            t, b, h, hk, j0 = _bwd_tile(k, pid, nprog, NUM_N, BH, H, G, SECTION, BLOCK_N, LONGEST_FIRST)
            if t < num_tiles:
                lo, n_blocks, lo_full, hi_full = _query_blocks(j0, Nq, Nk, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT,
                                                               HAS_RIGHT)
                mbarrier.wait(kv_empty, (done & 1) ^ 1)  # a fresh barrier reads as phase 1 complete
                mbarrier.expect(kv_bar, 2 * BLOCK_N * HEAD_DIM * 2)
                _tma_load(desc_k, [b, hk, j0, 0], kv_bar, k_smem._reinterpret(dtype, [1, 1, BLOCK_N, HEAD_DIM], kv4))
                _tma_load(desc_v, [b, hk, j0, 0], kv_bar, v_smem._reinterpret(dtype, [1, 1, BLOCK_N, HEAD_DIM], kv4))
                for j in range(n_blocks):
                    st = it % STAGES
                    ph = (it // STAGES) & 1
                    mbarrier.wait(q_empty.index(st), ph ^ 1)
                    mbarrier.expect(q_ready.index(st), BLOCK_M * HEAD_DIM * 2)
                    _tma_load(desc_q, [b, h, lo + j * BLOCK_M, 0], q_ready.index(st),
                              q_smem.index(st)._reinterpret(dtype, [1, 1, BLOCK_M, HEAD_DIM], q4))
                    mbarrier.wait(do_empty.index(st), ph ^ 1)
                    mbarrier.expect(do_ready.index(st), BLOCK_M * HEAD_DIM * 2)
                    _tma_load(desc_do, [b, h, lo + j * BLOCK_M, 0], do_ready.index(st),
                              do_smem.index(st)._reinterpret(dtype, [1, 1, BLOCK_M, HEAD_DIM], q4))
                    it += 1
                done += 1

    @gluon.jit
    def _pbwd_consumer(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem,
                       kv_bar, kv_empty, q_ready, q_empty, do_ready, do_empty, ds_bar, LSE, DELTA, DK, DV, DQA, slb,
                       slh, slm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sab, sah, sam, num_tiles, NUM_N, BH, H, G,
                       SECTION, Nq, Nk, D, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M: gl.constexpr, 
                       BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, HAS_LEFT: gl.constexpr, 
                       HAS_RIGHT: gl.constexpr, DQ: gl.constexpr, DQ_TMA: gl.constexpr, LONGEST_FIRST: gl.constexpr, 
                       WG: gl.constexpr):
        """One consumer warpgroup over this program's tiles: keys [j0 + WG * 64, +64) of each, every query block
        (_bwd_block), then its dK / dV rows, stored while the loader fetches the next tile."""
        ROWS: gl.constexpr = BLOCK_N // 2
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
        mma_d: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
        key_s: gl.constexpr = gl.SliceLayout(1, mma_s)
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        it = 0
        done = 0
        for k in range(gl.cdiv(num_tiles, nprog)):
            t, b, h, hk, j0 = _bwd_tile(k, pid, nprog, NUM_N, BH, H, G, SECTION, BLOCK_N, LONGEST_FIRST)
            if t < num_tiles:
                lo, n_blocks, lo_full, hi_full = _query_blocks(j0, Nq, Nk, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT,
                                                               HAS_RIGHT)
                b64 = b.to(gl.int64)
                h64 = h.to(gl.int64)
                lse_h = LSE + b64 * slb + h64 * slh
                delta_h = DELTA + b64 * slb + h64 * slh
                dqa_h = DQA + b64 * sab + h64 * sah
                keys = j0 + WG * ROWS + gl.arange(0, ROWS, layout=key_s)
                dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=mma_d)
                dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=mma_d)
                mbarrier.wait(kv_bar, done & 1)
                for i in range(n_blocks):
                    dk, dv = _bwd_block(i, it + i, dk, dv, keys, k_smem, v_smem, q_smem, do_smem, q_ready, q_empty,
                                        do_ready, do_empty, ds_smem, ds_bar, dq_smem, desc_dq, b, h, lo, lse_h,
                                        delta_h, slm, dqa_h, sam, Nq, Nk - Nq, lo_full, hi_full, LEFT, RIGHT, qk_scale,
                                        BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, DQ, DQ_TMA, True, WG)
                it += n_blocks
                mbarrier.arrive(kv_empty, count=1)  # this warpgroup's matmuls of the tile are done with K and V
                _store_dkdv(dk, dv, DK + b64 * sdkb + h64 * sdkh, DV + b64 * sdvb + h64 * sdvh, sdkn, sdvn, j0, Nk, D,
                            sm_scale, BLOCK_N, HEAD_DIM, WG)
                done += 1
        if DQ_TMA:
            tma.store_wait(0)

    @gluon.jit
    def _pbwd_consumer_0(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem,
                         kv_bar, kv_empty, q_ready, q_empty, do_ready, do_empty, ds_bar, LSE, DELTA, DK, DV, DQA, slb,
                         slh, slm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sab, sah, sam, num_tiles, NUM_N, BH, H, G,
                         SECTION, Nq, Nk, D, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M: gl.constexpr, 
                         BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, HAS_LEFT: gl.constexpr,
                         HAS_RIGHT: gl.constexpr, DQ: gl.constexpr, DQ_TMA: gl.constexpr, 
                         LONGEST_FIRST: gl.constexpr):
        """The partitions share one signature: consumer 0."""
        _pbwd_consumer(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem,
                       kv_bar, kv_empty, q_ready, q_empty, do_ready, do_empty, ds_bar, LSE, DELTA, DK, DV, DQA, slb,
                       slh, slm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sab, sah, sam, num_tiles, NUM_N, BH, H, G,
                       SECTION, Nq, Nk, D, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                       HAS_LEFT, HAS_RIGHT, DQ, DQ_TMA, LONGEST_FIRST, 0)

    @gluon.jit
    def _pbwd_consumer_1(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem,
                         kv_bar, kv_empty, q_ready, q_empty, do_ready, do_empty, ds_bar, LSE, DELTA, DK, DV, DQA, slb,
                         slh, slm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sab, sah, sam, num_tiles, NUM_N, BH, H, G,
                         SECTION, Nq, Nk, D, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M: gl.constexpr, 
                         BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, HAS_LEFT: gl.constexpr,
                         HAS_RIGHT: gl.constexpr, DQ: gl.constexpr, DQ_TMA: gl.constexpr, 
                         LONGEST_FIRST: gl.constexpr):
        _pbwd_consumer(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem,
                       kv_bar, kv_empty, q_ready, q_empty, do_ready, do_empty, ds_bar, LSE, DELTA, DK, DV, DQA, slb,
                       slh, slm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sab, sah, sam, num_tiles, NUM_N, BH, H, G,
                       SECTION, Nq, Nk, D, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                       HAS_LEFT, HAS_RIGHT, DQ, DQ_TMA, LONGEST_FIRST, 1)

    @gluon.jit
    def _gluon_dkdv_persistent_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQA, sqb, sqh, sqm, skb, skh, skn, svb, svh,
                                      svn, sdob, sdoh, sdom, slb, slh, slm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sab,
                                      sah, sam, NQ_PAD, B, H, Hkv, Nq, Nk, G, D, NUM_N, SECTION, qk_scale, sm_scale,
                                      LEFT, RIGHT, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                                      BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_LEFT: gl.constexpr,
                                      HAS_RIGHT: gl.constexpr, DQ: gl.constexpr, DQ_TMA: gl.constexpr,
                                      LONGEST_FIRST: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                      num_warps: gl.constexpr):
        """Persistent and warp-specialised: grid = min(tiles, SMs); a loader warp, two consumer warpgroups of 64
        keys; the buffers of _gluon_dkdv_kernel, K and V released per tile by `kv_empty`."""
        dtype: gl.constexpr = Q.dtype.element_ty
        q4: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_M, HEAD_DIM], dtype)
        kv4: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_N, HEAD_DIM], dtype)
        desc_q = tma.make_tensor_descriptor(Q, shape=[B, H, Nq, D], strides=[sqb, sqh, sqm, 1],
                                            block_shape=[1, 1, BLOCK_M, HEAD_DIM], layout=q4)
        desc_do = tma.make_tensor_descriptor(DO, shape=[B, H, Nq, D], strides=[sdob, sdoh, sdom, 1],
                                             block_shape=[1, 1, BLOCK_M, HEAD_DIM], layout=q4)
        desc_k = tma.make_tensor_descriptor(K, shape=[B, Hkv, Nk, D], strides=[skb, skh, skn, 1],
                                            block_shape=[1, 1, BLOCK_N, HEAD_DIM], layout=kv4)
        desc_v = tma.make_tensor_descriptor(V, shape=[B, Hkv, Nk, D], strides=[svb, svh, svn, 1],
                                            block_shape=[1, 1, BLOCK_N, HEAD_DIM], layout=kv4)
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_layout)
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], kv_layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        mbarrier.init(kv_empty, count=2)
        q_ready, q_empty, do_ready, do_empty = _ring_barriers(STAGES, 2)
        if DQ:
            ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
            ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ds_layout)
        else:  # not read: any buffer stands in
            ds_smem = q_smem
        DQ_COLS: gl.constexpr = HEAD_DIM // 2
        if DQ_TMA:  # each consumer's dQ tile goes by a TMA reduce-add from its own buffer
            dq_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, DQ_COLS], gl.float32)
            dq4: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_M, DQ_COLS], gl.float32)
            dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, DQ_COLS], dq_layout)
            desc_dq = tma.make_tensor_descriptor(DQA, shape=[B, H, NQ_PAD, HEAD_DIM], strides=[sab, sah, sam, 1],
                                                 block_shape=[1, 1, BLOCK_M, DQ_COLS], layout=dq4)
        else:  # not read: stand-ins
            dq_smem = q_smem
            desc_dq = desc_q
        ds_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(ds_bar.index(i), count=2)
        num_tiles = NUM_N * B * H
        BH = B * H
        gl.warp_specialize([
            (_pbwd_consumer_0, (
                desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, kv_bar,
                kv_empty, q_ready, q_empty, do_ready, do_empty, ds_bar, LSE, DELTA, DK, DV, DQA, slb, slh, slm, sdkb,
                sdkh, sdkn, sdvb, sdvh, sdvn, sab, sah, sam, num_tiles, NUM_N, BH, H, G, SECTION, Nq, Nk, D, LEFT,
                RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, DQ, DQ_TMA,
                LONGEST_FIRST)),
            (_pbwd_consumer_1, (
                desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, kv_bar,
                kv_empty, q_ready, q_empty, do_ready, do_empty, ds_bar, LSE, DELTA, DK, DV, DQA, slb, slh, slm, sdkb,
                sdkh, sdkn, sdvb, sdvh, sdvn, sab, sah, sam, num_tiles, NUM_N, BH, H, G, SECTION, Nq, Nk, D, LEFT,
                RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, DQ, DQ_TMA,
                LONGEST_FIRST)),
            (_pbwd_loader, (
                desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, kv_bar,
                kv_empty, q_ready, q_empty, do_ready, do_empty, ds_bar, LSE, DELTA, DK, DV, DQA, slb, slh, slm, sdkb,
                sdkh, sdkn, sdvb, sdvh, sdvn, sab, sah, sam, num_tiles, NUM_N, BH, H, G, SECTION, Nq, Nk, D, LEFT,
                RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT, DQ, DQ_TMA,
                LONGEST_FIRST)),
        ], [4, 1], [CONSUMER_REGS, 24])


def gluon_dkdv_takes(q, k, v) -> bool:
    """Shapes this kernel takes (the caller has checked sm_90 and TMA strides): Dv == D, 32 < D <= 128, 16-bit."""
    return (HAVE_GLUON and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == v.shape[-1]
            and 32 < q.shape[-1] <= 128)


def gluon_dkdv(do, q, k, v, lse, delta, *, scale, left, right, block_m=64, block_n=128, stages=2, dq_sums=None,
               dq_reduce="tma", persistent=False):
    """Dense (B, H, N, D) inputs, lse and delta (B, Hq, Nq) fp32 (delta = rowsum(dO * O) - dLSE)
    -> dk, dv in k's and v's dtypes and shapes (GQA's G query heads summed). dq_sums: a zeroed fp32
    (B, Hq, >= cdiv(Nq, block_m) * block_m, pow2(D)) tensor, unit column stride, into which the kernel
    also adds dS K (dQ / scale: the one-pass backward, `_dq_cast_kernel` finishes it); None: dK / dV only.
    dq_reduce: how the adds reach dq_sums: "tma" (one bulk reduce-add per block and consumer, where this
    Triton builds it; else atomics) or "atomic" (element-wise fp32 atomics). persistent: one program per SM
    walks the (key block, head) tiles (`_gluon_dkdv_persistent_kernel`; inputs whose batch or head stride
    broadcasts take the per-tile kernel)."""
    from fa2lab.kernels.hopper_fwd import ensure_allocator

    if delta.stride() != lse.stride():
        raise ValueError(f"delta and lse must share strides (both (B, Hq, Nq)), got {delta.stride()} and "
                         f"{lse.stride()}")
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
    if dq_sums is not None:
        rows = triton.cdiv(nq, block_m) * block_m
        if (dq_sums.dtype != torch.float32 or dq_sums.shape[:2] != (b, h) or dq_sums.shape[2] < rows
                or dq_sums.shape[3] != pow2(d) or dq_sums.stride(3) != 1):
            raise ValueError(f"dq_sums must be a zeroed float32 ({b}, {h}, >= {rows}, {pow2(d)}) tensor with unit "
                             f"column stride, got {tuple(dq_sums.shape)} {dq_sums.dtype} strides {dq_sums.stride()}")
        if dq_reduce not in ("tma", "atomic"):
            raise ValueError(f"dq_reduce must be 'tma' or 'atomic', got {dq_reduce!r}")
        if not 32 < d <= 128:
            raise ValueError(f"the one-pass Gluon backward (dq_sums) splits dQ's columns between its two "
                             f"consumers, 32 or 64 each: 32 < D <= 128, got D={d}")
    num_n = triton.cdiv(nk, block_n)
    st = lambda t: t.stride()[:3]  # noqa: E731 (batch, head, token)
    sums = q if dq_sums is None else dq_sums  # q: a placeholder pointer, never written without DQ
    dq_tma = dq_sums is not None and dq_reduce == "tma" and HAVE_TMA_REDUCE
    if persistent and all(_box_strides_ok(t) for t in (q, k, v, do)):
        causal = right >= 0 and left < 0
        elem = q.element_size()  # what a head's key blocks re-read: Q, dO and (one pass) the fp32 dQ sums
        per_head = 2 * nq * d * elem + (4 * nq * pow2(d) if dq_sums is not None else 0)
        section = max(1, int(L2_SECTION_BYTES // max(per_head, 1)))
        tiles = num_n * b * h
        bs = _box_strides
        _gluon_dkdv_persistent_kernel[(min(tiles, _sm_count(q)), )](
            q, k, v, do, lse, delta, dk, dv, sums, *bs(q), *bs(k), *bs(v), *bs(do), *lse.stride(), *st(dk), *st(dv),
            *(st(dq_sums) if dq_sums is not None else (0, 0, 0)), dq_sums.shape[2] if dq_sums is not None else 0,
            b, h, hkv, nq, nk, group, d, num_n, section, scale * LOG2E, scale, max(left, 0), max(right, 0),
            HEAD_DIM=pow2(d), BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, HAS_LEFT=left >= 0,
            HAS_RIGHT=right >= 0, DQ=dq_sums is not None, DQ_TMA=dq_tma, LONGEST_FIRST=causal, CONSUMER_REGS=240,
            num_warps=4, maxnreg=168)
    else:
        _launch_per_tile(q, k, v, do, lse, delta, dk, dv, sums, dq_sums, h, nq, nk, group, d, num_n, scale, left,
                         right, block_m, block_n, stages, dq_tma)
    if group > 1:  # into k's and v's layouts, as the Triton backward returns them
        dk = torch.empty_like(k).copy_(dk.view(b, hkv, group, nk, d).sum(2))
        dv = torch.empty_like(v).copy_(dv.view(b, hkv, group, nk, d).sum(2))
    return dk, dv


def _launch_per_tile(q, k, v, do, lse, delta, dk, dv, sums, dq_sums, h, nq, nk, group, d, num_n, scale, left, right,
                     block_m, block_n, stages, dq_tma):
    """One program per (key block, head): `_gluon_dkdv_kernel`."""
    st = lambda t: t.stride()[:3]  # noqa: E731 (batch, head, token)
    b = q.shape[0]
    _gluon_dkdv_kernel[(num_n, b * h)](
        q, k, v, do, lse, delta, dk, dv, sums, *st(q), *st(k), *st(v), *st(do), *lse.stride(), *st(dk), *st(dv),
        *(st(dq_sums) if dq_sums is not None else (0, 0, 0)), dq_sums.shape[2] if dq_sums is not None else 0, h,
        nq, nk, group, d, num_n, scale * LOG2E, scale, max(left, 0), max(right, 0), HEAD_DIM=pow2(d),
        BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        DQ=dq_sums is not None, DQ_TMA=dq_tma, CONSUMER_REGS=240, num_warps=4, maxnreg=168)


__all__ = ["gluon_dkdv", "gluon_dkdv_takes"]
