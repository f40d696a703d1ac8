"""The one-pass Hopper backward for wide heads (128 < D <= 256) in Gluon: dK, dV and dQ in one kernel.

kernels/gluon_bwd.py gives each of its two consumer warpgroups 64 keys and every column of dK and dV;
at D = 256 those two fp32 accumulators alone would take 256 registers a thread. Here (FA3's head-dim-256
plan) one program holds BLOCK_N = 64 keys, and the two consumer warpgroups share each query block
one of two ways (`split`):

"keys" (the default): warpgroup w owns keys [w * BLOCK_N/2, +BLOCK_N/2) and every head-dim column, with
dK and dV held transposed (FA3's swapped operands), so nothing but dQ needs the other warpgroup:

    S = Q_i K_w^T, dP = dO_i V_w^T, P, dS     (BLOCK_M, BLOCK_N/2) each
    dV_w^T += dO_i^T P,  dK_w^T += Q_i^T dS   (HEAD_DIM, BLOCK_N/2) fp32 accumulators
    dQ_i[:, cols_w] = dS_i K[:, cols_w]       both warpgroups' dS (an mbarrier of count 2, two buffers),
                                              cols_w = [w * D/2, (w + 1) * D/2), in DQ_CHUNK pieces

"cols": warpgroup w computes query columns [w * BLOCK_M/2, +BLOCK_M/2) of S^T and dP^T, writes its
halves of P^T and dS^T to shared (BLOCK_N, BLOCK_M) buffers, and after a tile-wide mbarrier (`tile_bar`;
`free_bar` before they are overwritten) accumulates dV[:, cols_w] += P^T dO_i[:, cols_w], dK[:, cols_w]
+= dS^T Q_i[:, cols_w] and the same dQ pieces.

Each dQ piece is added to fp32 sums in global memory by one TMA reduce-add (the caller scales and casts).
A thread holds two 128-register accumulators at D = 256 either way. Shared memory at D = 256: K and V
(32 KB each), Q_STAGES x 32 KB of Q, DO_STAGES x 32 KB of dO, P and dS (8 KB each; "keys" double-buffers
dS) and one (BLOCK_M, DQ_CHUNK) fp32 staging buffer per warpgroup (16 KB at 64 columns): 208-217 KB with
three stages of Q and dO together.

Rows past the sequence ends read as zeros (TMA): a zero query row has dO = 0 and, its LSE read as +inf,
P = 0; keys past Nk are zero rows of K and V, so they add nothing to dQ and their dK / dV rows are
clipped on store. Only causal / window edges need an element-wise mask. Programs run per query head:
with GQA each writes fp32 partials of dK / dV that the caller sums (as kernels/gluon_bwd.py). dQ's
sums add in a run-dependent order: the deterministic mode keeps the two passes (hopper_config).

Plain dense calls (no varlen, no variants), fp16/bf16, Dv == D, 128 < D <= 256, through
hopper_config.BWD's key "gluon_wide" (BWD_CAUSAL's for causal calls): (BLOCK_M, BLOCK_N, Q_STAGES,
DO_STAGES, DQ_CHUNK, split). Gluon does not run in the interpreter: tests/test_gluon_gpu.py checks it on
an sm_90 GPU through the public call; `python -m fa2lab.bench.hopper_bwd_gpu --plan wide` times it against
the two passes and cuDNN.
"""

from __future__ import annotations

import torch
import triton

from fa2lab.kernels.common import LOG2E, pow2
from fa2lab.kernels.gluon_bwd import HAVE_TMA_REDUCE
from fa2lab.kernels.gluon_fwd import HAVE_GLUON

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    from fa2lab.kernels.gluon_bwd import _band, _query_blocks, _tma_reduce_add
    from fa2lab.kernels.gluon_fwd import _cta_barrier, _descriptors, _tma_load

    LOG2E_W: gl.constexpr = gl.constexpr(LOG2E)

    @gluon.jit
    def _wide_loader(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem,
                     dq_smem, kv_bar, q_ready, q_empty, do_ready, do_empty, tile_bar, free_bar, j0, lo, n_blocks,
                     LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale,
                     sm_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                     Q_STAGES: gl.constexpr, DO_STAGES: gl.constexpr, DQ_CHUNK: gl.constexpr,
                     HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, SPLIT_KEYS: gl.constexpr,
                         DQ_REDUCE: gl.constexpr):
        """One warp: this program's K and V once, then Q_i and dO_i into their rings as both consumers free them."""
        mbarrier.expect(kv_bar, 2 * BLOCK_N * HEAD_DIM * 2)
        _tma_load(desc_k, [j0, 0], kv_bar, k_smem)
        _tma_load(desc_v, [j0, 0], kv_bar, v_smem)
        for i in range(n_blocks):
            row = lo + i * BLOCK_M
            sq = i % Q_STAGES
            mbarrier.wait(q_empty.index(sq), ((i // Q_STAGES) & 1) ^ 1)  # a fresh barrier reads as phase 1 done
            mbarrier.expect(q_ready.index(sq), BLOCK_M * HEAD_DIM * 2)
            _tma_load(desc_q, [row, 0], q_ready.index(sq), q_smem.index(sq))
            sd = i % DO_STAGES
            mbarrier.wait(do_empty.index(sd), ((i // DO_STAGES) & 1) ^ 1)
            mbarrier.expect(do_ready.index(sd), BLOCK_M * HEAD_DIM * 2)
            _tma_load(desc_do, [row, 0], do_ready.index(sd), do_smem.index(sd))

    @gluon.jit
    def _wide_consumer(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem,
                       dq_smem, kv_bar, q_ready, q_empty, do_ready, do_empty, tile_bar, free_bar, j0, lo, n_blocks,
                       LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale,
                       sm_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                       Q_STAGES: gl.constexpr, DO_STAGES: gl.constexpr, DQ_CHUNK: gl.constexpr,
                       HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, WG: gl.constexpr):
        """One warpgroup: query columns [WG * BLOCK_M/2, +BLOCK_M/2) of S^T and dP^T, head-dim columns
        [WG * HEAD_DIM/2, +HEAD_DIM/2) of dK, dV and dQ."""
        QCOLS: gl.constexpr = BLOCK_M // 2
        COLS: gl.constexpr = HEAD_DIM // 2
        dtype: gl.constexpr = q_smem.dtype
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, QCOLS, 16])  # S^T, dP^T (BLOCK_N, QCOLS)
        mma_d: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, COLS, 16])  # dK, dV (BLOCK_N, COLS)
        mma_q: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_CHUNK, 16])  # dQ (BLOCK_M, DQ_CHUNK)
        key_s: gl.constexpr = gl.SliceLayout(1, mma_s)
        query_s: gl.constexpr = gl.SliceLayout(0, mma_s)
        off = Nk - Nq
        keys = j0 + gl.arange(0, BLOCK_N, layout=key_s)
        dk = gl.zeros([BLOCK_N, COLS], gl.float32, layout=mma_d)
        dv = gl.zeros([BLOCK_N, COLS], gl.float32, layout=mma_d)
        pt_half = pt_smem.slice(WG * QCOLS, QCOLS, dim=1)
        dst_half = dst_smem.slice(WG * QCOLS, QCOLS, dim=1)
        dq_buf = dq_smem.index(WG)
        mbarrier.wait(kv_bar, 0)
        for i in range(n_blocks):
            sq = i % Q_STAGES
            sd = i % DO_STAGES
            start_m = lo + i * BLOCK_M
            queries = start_m + WG * QCOLS + gl.arange(0, QCOLS, layout=query_s)
            in_q = queries < Nq
            lse2 = gl.load(LSE_H + queries.to(gl.int64) * slm, mask=in_q, other=float("inf")) * LOG2E_W
            lse2 = gl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows with no key: P = 0
            delta = gl.load(DELTA_H + queries.to(gl.int64) * slm, mask=in_q, other=0.0)
            zero_s = gl.zeros([BLOCK_N, QCOLS], gl.float32, layout=mma_s)  # made here: not live across the loop
            zero_q = gl.zeros([BLOCK_M, DQ_CHUNK], gl.float32, layout=mma_q)
            q_tile = q_smem.index(sq)
            do_tile = do_smem.index(sd)
            mbarrier.wait(q_ready.index(sq), (i // Q_STAGES) & 1)
            s_tok = warpgroup_mma(k_smem, q_tile.slice(WG * QCOLS, QCOLS).permute((1, 0)), zero_s, use_acc=False,
                                  is_async=True)
            mbarrier.wait(do_ready.index(sd), (i // DO_STAGES) & 1)
            dp_tok = warpgroup_mma(v_smem, do_tile.slice(WG * QCOLS, QCOLS).permute((1, 0)), zero_s, use_acc=False,
                                   is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))  # S^T done; dP^T may still run
            p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 0))
            if HAS_LEFT or HAS_RIGHT:
                if (start_m < lo_full) | (start_m + BLOCK_M > hi_full):  # a causal / window edge
                    rel = gl.expand_dims(keys, 1) - gl.expand_dims(queries + off, 0)  # key - aligned query
                    p = _band(p, rel, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok, ))
            ds = p * (dp - gl.expand_dims(delta, 0))
            # The previous tile's matmuls (both warpgroups') have read P^T and dS^T: overwrite this half.
            mbarrier.wait(free_bar, (i & 1) ^ 1)
            pt_half.store(p.to(dtype))
            dst_half.store(ds.to(dtype))
            fence_async_shared()
            _cta_barrier()  # every thread's values are written before the one arrival
            mbarrier.arrive(tile_bar, count=1)
            mbarrier.wait(tile_bar, i & 1)  # both halves written
            # dQ_i's first chunk first: its reduce-add then runs under the dV and dK matmuls.
            dq_tok = warpgroup_mma(dst_smem.permute((1, 0)), k_smem.slice(WG * COLS, DQ_CHUNK, dim=1), zero_q,
                                   use_acc=False, is_async=True)
            dv_tok = warpgroup_mma(pt_smem, do_tile.slice(WG * COLS, COLS, dim=1), dv, is_async=True)
            dk_tok = warpgroup_mma(dst_smem, q_tile.slice(WG * COLS, COLS, dim=1), dk, is_async=True)
            for c in gl.static_range(COLS // DQ_CHUNK):
                if c > 0:
                    dq_tok = warpgroup_mma(dst_smem.permute((1, 0)),
                                           k_smem.slice(WG * COLS + c * DQ_CHUNK, DQ_CHUNK, dim=1), zero_q,
                                           use_acc=False, is_async=True)
                    dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, ))
                else:
                    dq = warpgroup_mma_wait(num_outstanding=2, deps=(dq_tok, ))
                tma.store_wait(0)  # this warpgroup's previous reduce-add has read its staging buffer
                _cta_barrier()
                dq_buf.store(dq)
                fence_async_shared()
                _cta_barrier()
                _tma_reduce_add(desc_dq, [start_m, WG * COLS + c * DQ_CHUNK], dq_buf)
            dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, dk_tok))
            mbarrier.arrive(free_bar, count=1)
            mbarrier.arrive(q_empty.index(sq), count=1)
            mbarrier.arrive(do_empty.index(sd), count=1)
        tma.store_wait(0)
        rows_d: gl.constexpr = gl.SliceLayout(1, mma_d)
        cols_d: gl.constexpr = gl.SliceLayout(0, mma_d)
        r = gl.expand_dims(j0 + gl.arange(0, BLOCK_N, layout=rows_d), 1).to(gl.int64)
        c = gl.expand_dims(WG * COLS + gl.arange(0, COLS, layout=cols_d), 0)
        keep = (r < Nk) & (c < D)
        gl.store(DK + r * sdk + c, (dk * sm_scale).to(DK.dtype.element_ty), mask=keep)
        gl.store(DV + r * sdv + c, dv.to(DV.dtype.element_ty), mask=keep)

    @gluon.jit
    def _wide_keys_consumer(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, p_smem, ds_smem,
                            dq_smem, kv_bar, q_ready, q_empty, do_ready, do_empty, ds_bar, unused_bar, j0, lo,
                            n_blocks, LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT,
                            qk_scale, sm_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                            HEAD_DIM: gl.constexpr, Q_STAGES: gl.constexpr, DO_STAGES: gl.constexpr,
                            DQ_CHUNK: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                            DQ_REDUCE: gl.constexpr, WG: gl.constexpr):
        """SPLIT_KEYS: one warpgroup owns keys [j0 + WG * BLOCK_N/2, +BLOCK_N/2) and every head-dim column of
        their dK and dV, held transposed (FA3's swapped operands: dV^T = dO^T P, a (HEAD_DIM, BLOCK_N/2)
        accumulator), so S, P, dS, dV and dK need nothing of the other warpgroup; only dQ does (both halves
        of dS, exchanged in shared memory as kernels/gluon_bwd.py does)."""
        KEYS: gl.constexpr = BLOCK_N // 2
        COLS: gl.constexpr = HEAD_DIM // 2
        dtype: gl.constexpr = q_smem.dtype
        # S, dP (BLOCK_M, KEYS) and dV^T, dK^T (HEAD_DIM, KEYS): one warp per 16 rows, repeated down the rows
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, KEYS, 16])
        mma_q: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_CHUNK, 16])  # dQ (BLOCK_M, DQ_CHUNK)
        query_s: gl.constexpr = gl.SliceLayout(1, mma_s)
        key_s: gl.constexpr = gl.SliceLayout(0, mma_s)
        off = Nk - Nq
        keys = j0 + WG * KEYS + gl.arange(0, KEYS, layout=key_s)
        dkt = gl.zeros([HEAD_DIM, KEYS], gl.float32, layout=mma_s)
        dvt = gl.zeros([HEAD_DIM, KEYS], gl.float32, layout=mma_s)
        k_rows = k_smem.slice(WG * KEYS, KEYS)
        v_rows = v_smem.slice(WG * KEYS, KEYS)
        p_own = p_smem.index(WG)
        dq_buf = dq_smem.index(WG)
        mbarrier.wait(kv_bar, 0)
        for i in range(n_blocks):
            sq = i % Q_STAGES
            sd = i % DO_STAGES
            start_m = lo + i * BLOCK_M
            queries = start_m + gl.arange(0, BLOCK_M, layout=query_s)
            in_q = queries < Nq
            lse2 = gl.load(LSE_H + queries.to(gl.int64) * slm, mask=in_q, other=float("inf")) * LOG2E_W
            lse2 = gl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows with no key: P = 0
            delta = gl.load(DELTA_H + queries.to(gl.int64) * slm, mask=in_q, other=0.0)
            zero_s = gl.zeros([BLOCK_M, KEYS], gl.float32, layout=mma_s)
            zero_q = gl.zeros([BLOCK_M, DQ_CHUNK], gl.float32, layout=mma_q)
            q_tile = q_smem.index(sq)
            do_tile = do_smem.index(sd)
            ds_tile = ds_smem.index(i % 2)
            mbarrier.wait(q_ready.index(sq), (i // Q_STAGES) & 1)
            s_tok = warpgroup_mma(q_tile, k_rows.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            mbarrier.wait(do_ready.index(sd), (i // DO_STAGES) & 1)
            dp_tok = warpgroup_mma(do_tile, v_rows.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))  # S done; dP may still run
            p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 1))
            if HAS_LEFT or HAS_RIGHT:
                if (start_m < lo_full) | (start_m + BLOCK_M > hi_full):  # a causal / window edge
                    rel = gl.expand_dims(keys, 0) - gl.expand_dims(queries + off, 1)  # key - aligned query
                    p = _band(p, rel, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            p_own.store(p.to(dtype))  # this warpgroup's own: its previous dV matmul was waited for
            dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok, ))
            ds = p * (dp - gl.expand_dims(delta, 1))
            ds_half = ds_tile.slice(WG * KEYS, KEYS, dim=1)
            ds_half.store(ds.to(dtype))
            fence_async_shared()
            _cta_barrier()  # every thread's values are written before the matmuls read them and the one arrival
            mbarrier.arrive(ds_bar.index(i % 2), count=1)
            # dV^T += dO_i^T P, dK^T += Q_i^T dS: this warpgroup's keys, every column
            dv_tok = warpgroup_mma(do_tile.permute((1, 0)), p_own, dvt, is_async=True)
            dk_tok = warpgroup_mma(q_tile.permute((1, 0)), ds_half, dkt, is_async=True)
            # dQ_i[:, cols] = dS_i K[:, cols] over both warpgroups' keys, this warpgroup's half of the columns. The
            # dS buffer is rewritten two blocks later, after both warpgroups have passed this block's wait.
            mbarrier.wait(ds_bar.index(i % 2), (i // 2) & 1)
            for c in gl.static_range(COLS // DQ_CHUNK):
                dq_tok = warpgroup_mma(ds_tile, k_smem.slice(WG * COLS + c * DQ_CHUNK, DQ_CHUNK, dim=1), zero_q,
                                       use_acc=False, is_async=True)
                if c == 0:  # dV and dK (issued first) done: Q_i and dO_i are free
                    dvt, dkt = warpgroup_mma_wait(num_outstanding=1, deps=(dv_tok, dk_tok))
                    mbarrier.arrive(q_empty.index(sq), count=1)
                    mbarrier.arrive(do_empty.index(sd), count=1)
                dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, ))
                tma.store_wait(0)  # this warpgroup's previous reduce-add has read its staging buffer
                _cta_barrier()
                dq_buf.store(dq)
                fence_async_shared()
                _cta_barrier()
                if DQ_REDUCE:  # False: a timing probe only (dQ left zero; see gluon_bwd_wide)
                    _tma_reduce_add(desc_dq, [start_m, WG * COLS + c * DQ_CHUNK], dq_buf)
        tma.store_wait(0)
        cols_t: gl.constexpr = gl.SliceLayout(1, mma_s)
        keys_t: gl.constexpr = gl.SliceLayout(0, mma_s)
        c = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=cols_t), 1)
        r = gl.expand_dims(j0 + WG * KEYS + gl.arange(0, KEYS, layout=keys_t), 0).to(gl.int64)
        keep = (r < Nk) & (c < D)
        gl.store(DK + r * sdk + c, (dkt * sm_scale).to(DK.dtype.element_ty), mask=keep)
        gl.store(DV + r * sdv + c, dvt.to(DV.dtype.element_ty), mask=keep)

    @gluon.jit
    def _wide_consumer_0(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem,
                         dq_smem, kv_bar, q_ready, q_empty, do_ready, do_empty, tile_bar, free_bar, j0, lo, n_blocks,
                         LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale,
                         sm_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                         Q_STAGES: gl.constexpr, DO_STAGES: gl.constexpr, DQ_CHUNK: gl.constexpr, HAS_LEFT: gl.constexpr,
                         HAS_RIGHT: gl.constexpr, SPLIT_KEYS: gl.constexpr, DQ_REDUCE: gl.constexpr):
        """The partitions share one signature (the kernel passes each the same arguments): consumer 0."""
        if SPLIT_KEYS:
            _wide_keys_consumer(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, pt_smem,
                                dst_smem, dq_smem, kv_bar, q_ready, q_empty, do_ready, do_empty, tile_bar, free_bar,
                                j0, lo, n_blocks, LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D, lo_full, hi_full,
                                LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, Q_STAGES, DO_STAGES,
                                DQ_CHUNK, HAS_LEFT, HAS_RIGHT, DQ_REDUCE, 0)
        else:
            _wide_consumer(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, pt_smem,
                           dst_smem, dq_smem, kv_bar, q_ready, q_empty, do_ready, do_empty, tile_bar, free_bar, j0,
                           lo, n_blocks, LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D, lo_full, hi_full, LEFT,
                           RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, Q_STAGES, DO_STAGES, DQ_CHUNK,
                           HAS_LEFT, HAS_RIGHT, 0)

    @gluon.jit
    def _wide_consumer_1(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem,
                         dq_smem, kv_bar, q_ready, q_empty, do_ready, do_empty, tile_bar, free_bar, j0, lo, n_blocks,
                         LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale,
                         sm_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                         Q_STAGES: gl.constexpr, DO_STAGES: gl.constexpr, DQ_CHUNK: gl.constexpr, HAS_LEFT: gl.constexpr,
                         HAS_RIGHT: gl.constexpr, SPLIT_KEYS: gl.constexpr, DQ_REDUCE: gl.constexpr):
        """The partitions share one signature (the kernel passes each the same arguments): consumer 1."""
        if SPLIT_KEYS:
            _wide_keys_consumer(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, pt_smem,
                                dst_smem, dq_smem, kv_bar, q_ready, q_empty, do_ready, do_empty, tile_bar, free_bar,
                                j0, lo, n_blocks, LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D, lo_full, hi_full,
                                LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, Q_STAGES, DO_STAGES,
                                DQ_CHUNK, HAS_LEFT, HAS_RIGHT, DQ_REDUCE, 1)
        else:
            _wide_consumer(desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, pt_smem,
                           dst_smem, dq_smem, kv_bar, q_ready, q_empty, do_ready, do_empty, tile_bar, free_bar, j0,
                           lo, n_blocks, LSE_H, DELTA_H, slm, DK, DV, sdk, sdv, Nq, Nk, D, lo_full, hi_full, LEFT,
                           RIGHT, qk_scale, sm_scale, BLOCK_M, BLOCK_N, HEAD_DIM, Q_STAGES, DO_STAGES, DQ_CHUNK,
                           HAS_LEFT, HAS_RIGHT, 1)

    @gluon.jit
    def _gluon_bwd_wide_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQA, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                               sdob, sdoh, sdom, slb, slh, slm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sab, sah, sam,
                               NQ_PAD, H, Nq, Nk, G, D, qk_scale, sm_scale, LEFT, RIGHT, HEAD_DIM: gl.constexpr,
                               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, Q_STAGES: gl.constexpr,
                               DO_STAGES: gl.constexpr, DQ_CHUNK: gl.constexpr, HAS_LEFT: gl.constexpr,
                               HAS_RIGHT: gl.constexpr, SPLIT_KEYS: gl.constexpr, DQ_REDUCE: gl.constexpr,
                               CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, num_warps: gl.constexpr):
        pid_n = gl.program_id(0)  # causal: key block 0 is seen by the most queries, so this order is longest-first
        bh = gl.program_id(1)
        b = (bh // H).to(gl.int64)
        h = (bh % H).to(gl.int64)
        hk = h // G
        j0 = pid_n * BLOCK_N
        dtype: gl.constexpr = Q.dtype.element_ty
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        desc_q, desc_k, desc_v, desc_do = _descriptors(Q, K, V, DO, b, h, hk, sqb, sqh, sqm, skb, skh, skn, svb, svh,
                                                       svn, sdob, sdoh, sdom, Nq, Nk, D, HEAD_DIM, BLOCK_M, BLOCK_N,
                                                       BLOCK_M)
        q_smem = gl.allocate_shared_memory(dtype, [Q_STAGES, BLOCK_M, HEAD_DIM], q_layout)
        do_smem = gl.allocate_shared_memory(dtype, [DO_STAGES, BLOCK_M, HEAD_DIM], q_layout)
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], kv_layout)
        if SPLIT_KEYS:
            # Each warpgroup's P (BLOCK_M, BLOCK_N/2), and two buffers of dS (BLOCK_M, BLOCK_N) whose key halves the
            # warpgroups write: a swizzle atom as wide as that half (16-bit: BLOCK_N/2 elements = BLOCK_N bytes).
            p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N // 2], dtype)
            pt_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_N // 2], p_layout)
            ds_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=BLOCK_N, element_bitwidth=16, rank=2)
            dst_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_N], ds_layout)
        else:
            # P^T and dS^T (BLOCK_N, BLOCK_M), each warpgroup writing BLOCK_M / 2 columns: a swizzle atom as wide
            # as that half (16-bit: BLOCK_M / 2 elements = BLOCK_M bytes), so the halves are whole atoms.
            t_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=BLOCK_M, element_bitwidth=16, rank=2)
            pt_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], t_layout)
            dst_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], t_layout)
        dq_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, DQ_CHUNK], gl.float32)
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, DQ_CHUNK], dq_layout)
        desc_dq = tma.make_tensor_descriptor(DQA + b * sab + h * sah, shape=[NQ_PAD, HEAD_DIM], strides=[sam, 1],
                                             block_shape=[BLOCK_M, DQ_CHUNK], layout=dq_layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        q_ready = gl.allocate_shared_memory(gl.int64, [Q_STAGES, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [Q_STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(Q_STAGES):
            mbarrier.init(q_ready.index(s), count=1)
            mbarrier.init(q_empty.index(s), count=2)
        do_ready = gl.allocate_shared_memory(gl.int64, [DO_STAGES, 1], mbarrier.MBarrierLayout())
        do_empty = gl.allocate_shared_memory(gl.int64, [DO_STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(DO_STAGES):
            mbarrier.init(do_ready.index(s), count=1)
            mbarrier.init(do_empty.index(s), count=2)
        if SPLIT_KEYS:  # ds_bar (passed as tile_bar): each dS buffer complete when both halves are written
            tile_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            for s in gl.static_range(2):
                mbarrier.init(tile_bar.index(s), count=2)
            free_bar = kv_bar  # not read
        else:
            tile_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            free_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(tile_bar, count=2)
            mbarrier.init(free_bar, count=2)
        lo, n_blocks, lo_full, hi_full = _query_blocks(j0, Nq, Nk, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT,
                                                       HAS_RIGHT)
        lse_h = LSE + b * slb + h * slh
        delta_h = DELTA + b * slb + h * slh
        dk_h = DK + b * sdkb + h * sdkh  # per query head: the caller sums GQA's partials
        dv_h = DV + b * sdvb + h * sdvh
        gl.warp_specialize([
            (_wide_consumer_0, (
                desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem, dq_smem,
                kv_bar, q_ready, q_empty, do_ready, do_empty, tile_bar, free_bar, j0, lo, n_blocks, lse_h, delta_h,
                slm, dk_h, dv_h, sdkn, sdvn, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M,
                BLOCK_N, HEAD_DIM, Q_STAGES, DO_STAGES, DQ_CHUNK, HAS_LEFT, HAS_RIGHT, SPLIT_KEYS, DQ_REDUCE)),
            (_wide_consumer_1, (
                desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem, dq_smem,
                kv_bar, q_ready, q_empty, do_ready, do_empty, tile_bar, free_bar, j0, lo, n_blocks, lse_h, delta_h,
                slm, dk_h, dv_h, sdkn, sdvn, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M,
                BLOCK_N, HEAD_DIM, Q_STAGES, DO_STAGES, DQ_CHUNK, HAS_LEFT, HAS_RIGHT, SPLIT_KEYS, DQ_REDUCE)),
            (_wide_loader, (
                desc_q, desc_k, desc_v, desc_do, desc_dq, q_smem, do_smem, k_smem, v_smem, pt_smem, dst_smem, dq_smem,
                kv_bar, q_ready, q_empty, do_ready, do_empty, tile_bar, free_bar, j0, lo, n_blocks, lse_h, delta_h,
                slm, dk_h, dv_h, sdkn, sdvn, Nq, Nk, D, lo_full, hi_full, LEFT, RIGHT, qk_scale, sm_scale, BLOCK_M,
                BLOCK_N, HEAD_DIM, Q_STAGES, DO_STAGES, DQ_CHUNK, HAS_LEFT, HAS_RIGHT, SPLIT_KEYS, DQ_REDUCE)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


# A timing probe, never set outside a benchmark: True launches split="keys" without its dQ reduce-adds (dQ
# comes back wrong), to measure what the L2 reduce traffic costs (fa2lab.bench.hopper_bwd_gpu --plan wide).
PROBE_SKIP_DQ_REDUCE = False


def gluon_bwd_wide_takes(q, k, v) -> bool:
    """Shapes this kernel takes (the caller has checked sm_90 and TMA strides): Dv == D, 128 < D <= 256,
    16-bit, and a Triton that builds the TMA reduce-add."""
    return (HAVE_GLUON and HAVE_TMA_REDUCE and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] == v.shape[-1] and 128 < q.shape[-1] <= 256)


def gluon_bwd_wide(do, q, k, v, lse, delta, dq_sums, *, scale, left, right, block_m=64, block_n=64, q_stages=2,
                   do_stages=1, dq_chunk=64, split="cols"):
    """Dense (B, H, N, D) inputs, lse and delta (B, Hq, Nq) fp32 (delta = rowsum(dO * O) - dLSE), dq_sums a
    zeroed fp32 (B, Hq, >= cdiv(Nq, block_m) * block_m, pow2(D)) tensor with unit column stride, into
    which the kernel adds dS K (dQ / scale; hopper_bwd's `_dq_cast_kernel` finishes it) -> dk, dv in k's
    and v's dtypes and shapes (GQA's G query heads summed). split: how the two consumer warpgroups share a
    tile: "cols" (each half of the head dim's columns of dK / dV) or "keys" (each half of the keys, dK / dV
    held transposed)."""
    from fa2lab.kernels.hopper_fwd import ensure_allocator

    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if not 128 < d <= 256 or v.shape[-1] != d:
        raise ValueError(f"the wide Gluon backward takes 128 < D <= 256 with Dv == D, got D={d}, Dv={v.shape[-1]}")
    if delta.stride() != lse.stride():
        raise ValueError(f"delta and lse must share strides (both (B, Hq, Nq)), got {delta.stride()} and "
                         f"{lse.stride()}")
    rows = triton.cdiv(nq, block_m) * block_m
    if (dq_sums.dtype != torch.float32 or dq_sums.shape[:2] != (b, h) or dq_sums.shape[2] < rows
            or dq_sums.shape[3] != pow2(d) or dq_sums.stride(3) != 1):
        raise ValueError(f"dq_sums must be a zeroed float32 ({b}, {h}, >= {rows}, {pow2(d)}) tensor with unit "
                         f"column stride, got {tuple(dq_sums.shape)} {dq_sums.dtype} strides {dq_sums.stride()}")
    if (pow2(d) // 2) % dq_chunk or block_m % 32:
        raise ValueError(f"dq_chunk must divide half the head dim ({pow2(d) // 2}) and block_m be a multiple of 32, "
                         f"got dq_chunk={dq_chunk}, block_m={block_m}")
    if split not in ("cols", "keys"):
        raise ValueError(f"split must be 'cols' or 'keys', got {split!r}")
    ensure_allocator()
    group = h // hkv
    if group == 1:  # one query head per K/V head: the kernel writes the gradients themselves
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    else:  # fp32 partials per query head, summed below
        dk = torch.empty(b, h, nk, d, dtype=torch.float32, device=q.device)
        dv = torch.empty(b, h, nk, d, dtype=torch.float32, device=q.device)
    st = lambda t: t.stride()[:3]  # noqa: E731 (batch, head, token)
    _gluon_bwd_wide_kernel[(triton.cdiv(nk, block_n), b * h)](
        q, k, v, do, lse, delta, dk, dv, dq_sums, *st(q), *st(k), *st(v), *st(do), *lse.stride(), *st(dk), *st(dv),
        *st(dq_sums), dq_sums.shape[2], h, nq, nk, group, d, scale * LOG2E, scale, max(left, 0), max(right, 0),
        HEAD_DIM=pow2(d), BLOCK_M=block_m, BLOCK_N=block_n, Q_STAGES=q_stages, DO_STAGES=do_stages,
        DQ_CHUNK=dq_chunk, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, SPLIT_KEYS=split == "keys",
        DQ_REDUCE=not PROBE_SKIP_DQ_REDUCE, CONSUMER_REGS=240, LOADER_REGS=24, num_warps=4, maxnreg=168)
    if group > 1:  # into k's and v's layouts, as the Triton backward returns them
        dk = torch.empty_like(k).copy_(dk.view(b, hkv, group, nk, d).sum(2))
        dv = torch.empty_like(v).copy_(dv.view(b, hkv, group, nk, d).sum(2))
    return dk, dv


__all__ = ["gluon_bwd_wide", "gluon_bwd_wide_takes"]
