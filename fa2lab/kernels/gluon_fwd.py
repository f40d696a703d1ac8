"""FA2 forward for Hopper written in Gluon: the next tile's Q K^T runs on the tensor cores while this
tile's softmax runs on the other units (FA3's intra-warpgroup overlap, Algorithm 2 of the paper).

Why a second Hopper forward: hopper_fwd.py (Triton's tile language) reaches ~500 TFLOP/s at
D = 128 on the H200 and no config, warp specialisation, lazy rescaling or reordering of its source
moved it (BENCHMARKS.md, issue 15): the compiler waits for each wgmma before the next step, so the
matmuls and the exponentials of a step run one after the other. Gluon, Triton's lower-level
language, states what the tile language leaves to the compiler: the shared-memory buffers, the TMA
copies and their mbarriers, the register layouts, and when to wait for an asynchronous wgmma.

One program computes BLOCK_M query rows of one (batch, head), key blocks j = 0 .. n-1:

    S_0 = Q K_0^T; softmax(S_0) -> P_0
    for j in 1 .. n-1:
        issue S_j = Q K_j^T                         (async)
        issue O += P_{j-1} V_{j-1}                  (async; O already rescaled for block j-1)
        wait until S_j is done (PV may still run)   -> softmax(S_j) -> P_j, alpha_j   (overlaps PV)
        wait for PV; refill the freed K and V buffers (TMA, STAGES deep); O *= alpha_j
    O += P_{n-1} V_{n-1}; O / l; O by TMA store, LSE

The softmax is the log2-domain one of fwd.py (scale * log2(e) folded into one multiply-add per
score), masks only on the blocks that need them (bottom-right causal diagonal, windows, the last
partial block), fully masked rows give zeros and LSE -inf. GQA by index arithmetic; any length
(descriptors per (batch, head) slice: the copy engine zero-fills rows past N and clips stores).

Two kernels run that loop. `_gluon_fwd_kernel`: one partition of two warpgroups (8 warps) that
share each K/V buffer and meet at a CTA barrier before it is refilled (the first version: the
barriers keep the warpgroups in lockstep, 0.70-0.99x the Triton kernel). `_gluon_fwd_ws_kernel`
(config WS=True, the default table): warp-specialised, a producer warp issues the TMA copies and
two consumer warpgroups of 64 rows each (three with CONSUMERS=3, BLOCK_M=192: FA3's D=64 tile) run
the loop above, each freeing a buffer by its own mbarrier arrival, so none waits for another
(1.12-1.19x the Triton kernel at D = 128, N >= 4096 on the H200: BENCHMARKS.md).

Plain dense calls only (no varlen, no variants), Dv == D, 32 < D <= 256 (tiles in
hopper_config.GLUON_FWD); the dispatcher sends a call here only at head-dim bounds in
hopper_config.FWD_GLUON (measured faster) and GLUON_TESTED (tested on a GPU), everything else to
hopper_fwd.py. Gluon does not run in the interpreter: tests/test_gluon_gpu.py checks these kernels
on an sm_90 GPU; on the CPU tests/test_gluon_host.py checks the host-side choices.
"""

from __future__ import annotations

import torch
import triton

from fa2lab.kernels.common import LOG2E, pow2
from fa2lab.kernels.hopper_config import GLUON_FWD, GLUON_FWD_ONE_PARTITION, gluon_kernel_takes
from fa2lab.kernels.launch import KernelLaunch

try:  # Gluon ships with Triton >= 3.5; without it this kernel is simply not offered
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - old Triton
    HAVE_GLUON = False

if HAVE_GLUON:
    LN2: gl.constexpr = gl.constexpr(1.0 / LOG2E)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # the name since Triton 3.7
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # renamed in Triton 3.7

    @gluon.jit
    def _softmax_step(s, m_i, l_i, start_n, masked, offs_m, offs_n, nk, off, LEFT, RIGHT, qk_scale,
                      HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """Lines 8-10 of Algorithm 1 on one S tile: -> P (fp32), alpha, new row max, new row sum."""
        if masked:  # an edge block: out-of-range keys, the causal diagonal, a window's edge
            cols = start_n + offs_n
            valid = gl.expand_dims(cols, 0) < nk
            if HAS_LEFT:
                valid = valid & (gl.expand_dims(cols, 0) >= gl.expand_dims(offs_m + off - LEFT, 1))
            if HAS_RIGHT:
                valid = valid & (gl.expand_dims(cols, 0) <= gl.expand_dims(offs_m + off + RIGHT, 1))
            s = gl.where(valid, s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key yet: P = 0
            p = gl.exp2(s - gl.expand_dims(m_use, 1))
            alpha = gl.exp2(m_i - m_use)
        else:  # every score visible: the max before scaling, then one FMA per score
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _tile_coords(NUM_M, H, G, BLOCK_M: gl.constexpr, LONGEST_FIRST: gl.constexpr):
        """This program's batch, query head, K/V head (GQA: G query heads share one) and first query row."""
        tile = gl.program_id(0)
        bh = tile // NUM_M
        pid_m = tile % NUM_M
        if LONGEST_FIRST:  # causal: the last query block of a head has the most keys to visit
            pid_m = NUM_M - 1 - pid_m
        b = (bh // H).to(gl.int64)
        h = (bh % H).to(gl.int64)
        return b, h, h // G, pid_m * BLOCK_M

    @gluon.jit
    def _key_blocks(i0, Nq, Nk, LEFT, RIGHT, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """Key blocks [lo, lo + n_blocks * BLOCK_N) the query rows [i0, i0 + BLOCK_M) visit, and the
        range [lo_full, hi_full) every one of those rows sees in full (no mask needed there)."""
        off = Nk - Nq  # bottom-right alignment of the diagonal
        lo = 0
        hi = Nk
        if HAS_LEFT:
            lo = (gl.maximum(0, i0 + off - LEFT) // BLOCK_N) * BLOCK_N
        if HAS_RIGHT:
            hi = gl.maximum(0, gl.minimum(Nk, gl.minimum(i0 + BLOCK_M, Nq) - 1 + off + RIGHT + 1))
        last = gl.minimum(i0 + BLOCK_M, Nq) - 1
        lo_full = lo
        if HAS_LEFT:
            lo_full = gl.minimum(gl.maximum(lo, gl.cdiv(gl.maximum(0, last + off - LEFT), BLOCK_N) * BLOCK_N), hi)
        hi_full = (Nk // BLOCK_N) * BLOCK_N
        if HAS_RIGHT:
            hi_full = gl.minimum(hi_full, (gl.maximum(0, i0 + off + RIGHT + 1) // BLOCK_N) * BLOCK_N)
        return lo, gl.cdiv(gl.maximum(hi - lo, 0), BLOCK_N), lo_full, hi_full

    @gluon.jit
    def _descriptors(Q, K, V, O, b, h, hk, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, Nq, Nk, D,
                     HEAD_DIM: gl.constexpr, Q_ROWS: gl.constexpr, BLOCK_N: gl.constexpr, O_ROWS: gl.constexpr):
        """TMA descriptors over this (batch, head)'s (tokens, D) slices: rows past the end read as zeros
        and are clipped on store. Q_ROWS / O_ROWS: the rows one Q load / one output store moves."""
        dtype: gl.constexpr = Q.dtype.element_ty
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q_ROWS, HEAD_DIM], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        o_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([O_ROWS, HEAD_DIM], dtype)
        desc_q = tma.make_tensor_descriptor(Q + b * sqb + h * sqh, shape=[Nq, D], strides=[sqm, 1],
                                            block_shape=[Q_ROWS, HEAD_DIM], layout=q_layout)
        desc_k = tma.make_tensor_descriptor(K + b * skb + hk * skh, shape=[Nk, D], strides=[skn, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM], layout=kv_layout)
        desc_v = tma.make_tensor_descriptor(V + b * svb + hk * svh, shape=[Nk, D], strides=[svn, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM], layout=kv_layout)
        desc_o = tma.make_tensor_descriptor(O + b * sob + h * soh, shape=[Nq, D], strides=[som, 1],
                                            block_shape=[O_ROWS, HEAD_DIM], layout=o_layout)
        return desc_q, desc_k, desc_v, desc_o

    @gluon.jit
    def _gluon_fwd_kernel(Q, K, V, O, LSE, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                          slb, slh, slm, H, Nq, Nk, G, D, NUM_M, qk_scale, LEFT, RIGHT,
                          HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                          STAGES: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                          LONGEST_FIRST: gl.constexpr, num_warps: gl.constexpr):
        b, h, hk, i0 = _tile_coords(NUM_M, H, G, BLOCK_M, LONGEST_FIRST)
        dtype: gl.constexpr = Q.dtype.element_ty
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        desc_q, desc_k, desc_v, desc_o = _descriptors(Q, K, V, O, b, h, hk, sqb, sqh, sqm, skb, skh, skn, svb, svh,
                                                      svn, sob, soh, som, Nq, Nk, D, HEAD_DIM, BLOCK_M, BLOCK_N,
                                                      BLOCK_M)

        # Register layouts: S and O are wgmma accumulators (one warp per 16 rows); P feeds the PV
        # wgmma from registers; row statistics live in S's row slice.
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
        mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
        col_s: gl.constexpr = gl.SliceLayout(0, mma_s)
        row_o: gl.constexpr = gl.SliceLayout(1, mma_o)

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)  # later the output tile
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)

        lo, n_blocks, lo_full, hi_full = _key_blocks(i0, Nq, Nk, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        off = Nk - Nq

        q_bytes: gl.constexpr = BLOCK_M * HEAD_DIM * 2
        kv_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * 2
        mbarrier.expect(q_bar, q_bytes)
        _tma_load(desc_q, [i0, 0], q_bar, q_smem)
        for i in gl.static_range(STAGES):  # the first STAGES key and value blocks
            mbarrier.expect(k_bars.index(i), kv_bytes, pred=i < n_blocks)
            _tma_load(desc_k, [lo + i * BLOCK_N, 0], k_bars.index(i), k_smem.index(i), pred=i < n_blocks)
            mbarrier.expect(v_bars.index(i), kv_bytes, pred=i < n_blocks)
            _tma_load(desc_v, [lo + i * BLOCK_N, 0], v_bars.index(i), v_smem.index(i), pred=i < n_blocks)

        offs_m = i0 + gl.arange(0, BLOCK_M, layout=row_s)
        offs_n = gl.arange(0, BLOCK_N, layout=col_s)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=mma_o)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma_s)
        mbarrier.wait(q_bar, 0)

        if n_blocks > 0:
            # Block 0: S, softmax, then its K buffer is refilled with block STAGES.
            mbarrier.wait(k_bars.index(0), 0)
            s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
            masked = (lo < lo_full) | (lo + BLOCK_N > hi_full)
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, lo, masked, offs_m, offs_n, Nk, off, LEFT, RIGHT,
                                               qk_scale, HAS_LEFT, HAS_RIGHT)
            p_prev = gl.convert_layout(p.to(dtype), p_layout)
            _cta_barrier()  # both warpgroups are done with K_0
            mbarrier.expect(k_bars.index(0), kv_bytes, pred=STAGES < n_blocks)
            _tma_load(desc_k, [lo + STAGES * BLOCK_N, 0], k_bars.index(0), k_smem.index(0), pred=STAGES < n_blocks)

            for j in range(1, n_blocks):
                st = j % STAGES
                prev = (j - 1) % STAGES
                start_n = lo + j * BLOCK_N
                mbarrier.wait(k_bars.index(st), (j // STAGES) & 1)
                s_tok = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False,
                                      is_async=True)
                mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
                o_tok = warpgroup_mma(p_prev, v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))  # S_j done; P V may still run
                masked = (start_n < lo_full) | (start_n + BLOCK_N > hi_full)
                p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, start_n, masked, offs_m, offs_n, Nk, off, LEFT,
                                                   RIGHT, qk_scale, HAS_LEFT, HAS_RIGHT)
                p_next = gl.convert_layout(p.to(dtype), p_layout)
                acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_prev))
                _cta_barrier()  # both warpgroups are done with K_j and V_{j-1}: refill them
                refill_k = j + STAGES < n_blocks
                mbarrier.expect(k_bars.index(st), kv_bytes, pred=refill_k)
                _tma_load(desc_k, [start_n + STAGES * BLOCK_N, 0], k_bars.index(st), k_smem.index(st),
                          pred=refill_k)
                refill_v = j - 1 + STAGES < n_blocks
                mbarrier.expect(v_bars.index(prev), kv_bytes, pred=refill_v)
                _tma_load(desc_v, [start_n + (STAGES - 1) * BLOCK_N, 0], v_bars.index(prev), v_smem.index(prev),
                          pred=refill_v)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                p_prev = p_next
            last_st = (n_blocks - 1) % STAGES
            mbarrier.wait(v_bars.index(last_st), ((n_blocks - 1) // STAGES) & 1)
            o_tok = warpgroup_mma(p_prev, v_smem.index(last_st), acc, is_async=True)
            acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_prev))

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))

        empty = l_i == 0.0
        l_o = gl.convert_layout(gl.where(empty, 1.0, l_i), row_o)
        out = acc / gl.expand_dims(l_o, 1)
        lse = gl.where(empty, float("-inf"), m_i + gl.log2(gl.where(empty, 1.0, l_i))) * LN2  # log2 -> natural
        _cta_barrier()  # every warpgroup is done reading Q: its buffer takes the output tile
        q_smem.store(out.to(dtype))
        fence_async_shared()
        _cta_barrier()
        _tma_store(desc_o, [i0, 0], q_smem)  # rows past Nq are clipped by the copy engine
        gl.store(LSE + b * slb + h * slh + offs_m.to(gl.int64) * slm, lse, mask=offs_m < Nq)
        tma.store_wait(0)


    @gluon.jit
    def _ring_barriers(STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        """The mbarriers of two rings of STAGES buffers (read by _stream_pairs): ready_a, empty_a, ready_b,
        empty_b. A `ready` barrier completes when the copy has landed; an `empty` one when each of the
        CONSUMERS warpgroups has arrived, done with the buffer."""
        ready_a = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty_a = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ready_b = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty_b = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready_a.index(i), count=1)
            mbarrier.init(ready_b.index(i), count=1)
            mbarrier.init(empty_a.index(i), count=CONSUMERS)
            mbarrier.init(empty_b.index(i), count=CONSUMERS)
        return ready_a, empty_a, ready_b, empty_b

    @gluon.jit
    def _stream_pairs(desc_a, desc_b, a_smem, b_smem, a_ready, a_empty, b_ready, b_empty, lo, n_blocks,
                      ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
        """A producer's loop: blocks j = 0 .. n_blocks - 1 (rows lo + j * ROWS) of two tensors into rings of
        STAGES buffers, each refilled once its consumers have arrived on its `empty` barrier (the
        forward's K and V, the backward's Q and dO)."""
        for j in range(n_blocks):
            st = j % STAGES
            ph = (j // STAGES) & 1
            mbarrier.wait(a_empty.index(st), ph ^ 1)  # a fresh barrier counts as phase 1 complete
            mbarrier.expect(a_ready.index(st), ROWS * HEAD_DIM * 2)
            _tma_load(desc_a, [lo + j * ROWS, 0], a_ready.index(st), a_smem.index(st))
            mbarrier.wait(b_empty.index(st), ph ^ 1)
            mbarrier.expect(b_ready.index(st), ROWS * HEAD_DIM * 2)
            _tma_load(desc_b, [lo + j * ROWS, 0], b_ready.index(st), b_smem.index(st))

    @gluon.jit
    def _ws_producer(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                     i0, lo, n_blocks, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                     STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        """One warp: Q once, then K_j and V_j into the ring as the consumers free its buffers."""
        ROWS: gl.constexpr = BLOCK_M // CONSUMERS
        mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * 2)
        if CONSUMERS == 2:  # one (128, D) block
            _tma_load(desc_q, [i0, 0], q_bar, q_smem)
        else:  # TMA blocks are powers of two: three (64, D) blocks of the 192 rows
            for c in gl.static_range(CONSUMERS):
                _tma_load(desc_q, [i0 + c * ROWS, 0], q_bar, q_smem.index(c))
        _stream_pairs(desc_k, desc_v, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, lo, n_blocks, BLOCK_N,
                      HEAD_DIM, STAGES)

    @gluon.jit
    def _ws_consumer(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                     i0, lo, n_blocks, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                     STAGES: gl.constexpr, WG: gl.constexpr, CONSUMERS: gl.constexpr, desc_o, LSE_ROW, slm, Nq, Nk,
                     lo_full, hi_full, LEFT, RIGHT, qk_scale, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """One warpgroup: rows [i0 + WG * ROWS, + ROWS) of the tile (ROWS = BLOCK_M / CONSUMERS = 64),
        Algorithm 2 of FA3. The consumers share K and V but never wait for each other (each frees a
        buffer on its own mbarrier arrival), so one's softmax runs under another's matmuls as the
        scheduler finds them."""
        ROWS: gl.constexpr = BLOCK_M // CONSUMERS
        dtype: gl.constexpr = q_smem.dtype
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
        mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
        col_s: gl.constexpr = gl.SliceLayout(0, mma_s)
        row_o: gl.constexpr = gl.SliceLayout(1, mma_o)
        if CONSUMERS == 2:
            q_rows = q_smem.slice(WG * ROWS, ROWS)
        else:
            q_rows = q_smem.index(WG)
        r0 = i0 + WG * ROWS
        off = Nk - Nq
        offs_m = r0 + gl.arange(0, ROWS, layout=row_s)
        offs_n = gl.arange(0, BLOCK_N, layout=col_s)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([ROWS], gl.float32, layout=row_s)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=mma_o)
        zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=mma_s)
        mbarrier.wait(q_bar, 0)
        if n_blocks > 0:
            mbarrier.wait(k_ready.index(0), 0)
            s_tok = warpgroup_mma(q_rows, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(0), count=1)
            masked = (lo < lo_full) | (lo + BLOCK_N > hi_full)
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, lo, masked, offs_m, offs_n, Nk, off, LEFT, RIGHT,
                                               qk_scale, HAS_LEFT, HAS_RIGHT)
            p_prev = gl.convert_layout(p.to(dtype), p_layout)
            for j in range(1, n_blocks):
                st = j % STAGES
                prev = (j - 1) % STAGES
                start_n = lo + j * BLOCK_N
                mbarrier.wait(k_ready.index(st), (j // STAGES) & 1)
                s_tok = warpgroup_mma(q_rows, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False,
                                      is_async=True)
                mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
                o_tok = warpgroup_mma(p_prev, v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))  # S_j done; P V may still run
                mbarrier.arrive(k_empty.index(st), count=1)
                masked = (start_n < lo_full) | (start_n + BLOCK_N > hi_full)
                p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, start_n, masked, offs_m, offs_n, Nk, off, LEFT,
                                                   RIGHT, qk_scale, HAS_LEFT, HAS_RIGHT)
                p_next = gl.convert_layout(p.to(dtype), p_layout)
                acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_prev))
                mbarrier.arrive(v_empty.index(prev), count=1)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                p_prev = p_next
            last_st = (n_blocks - 1) % STAGES
            mbarrier.wait(v_ready.index(last_st), ((n_blocks - 1) // STAGES) & 1)
            o_tok = warpgroup_mma(p_prev, v_smem.index(last_st), acc, is_async=True)
            acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_prev))
            mbarrier.arrive(v_empty.index(last_st), count=1)
        empty = l_i == 0.0
        out = acc / gl.expand_dims(gl.convert_layout(gl.where(empty, 1.0, l_i), row_o), 1)
        lse = gl.where(empty, float("-inf"), m_i + gl.log2(gl.where(empty, 1.0, l_i))) * LN2
        q_rows.store(out.to(dtype))  # this warpgroup's rows of Q are no longer read: the output tile
        fence_async_shared()
        _tma_store(desc_o, [r0, 0], q_rows)  # rows past Nq are clipped by the copy engine
        gl.store(LSE_ROW + offs_m.to(gl.int64) * slm, lse, mask=offs_m < Nq)
        tma.store_wait(0)

    @gluon.jit
    def _ws_consumer_0(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
            i0, lo, n_blocks, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
            STAGES: gl.constexpr, CONSUMERS: gl.constexpr, desc_o, LSE_ROW, slm, Nq, Nk, lo_full, hi_full, LEFT,
            RIGHT, qk_scale, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """The partitions share one signature (the kernel passes each the same arguments): consumer 0."""
        _ws_consumer(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                     i0, lo, n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, 0, CONSUMERS, desc_o, LSE_ROW, slm, Nq,
                     Nk, lo_full, hi_full, LEFT, RIGHT, qk_scale, HAS_LEFT, HAS_RIGHT)

    @gluon.jit
    def _ws_consumer_1(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
            i0, lo, n_blocks, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
            STAGES: gl.constexpr, CONSUMERS: gl.constexpr, desc_o, LSE_ROW, slm, Nq, Nk, lo_full, hi_full, LEFT,
            RIGHT, qk_scale, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        _ws_consumer(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                     i0, lo, n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, 1, CONSUMERS, desc_o, LSE_ROW, slm, Nq,
                     Nk, lo_full, hi_full, LEFT, RIGHT, qk_scale, HAS_LEFT, HAS_RIGHT)

    @gluon.jit
    def _ws_consumer_2(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
            i0, lo, n_blocks, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
            STAGES: gl.constexpr, CONSUMERS: gl.constexpr, desc_o, LSE_ROW, slm, Nq, Nk, lo_full, hi_full, LEFT,
            RIGHT, qk_scale, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        _ws_consumer(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                     i0, lo, n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, 2, CONSUMERS, desc_o, LSE_ROW, slm, Nq,
                     Nk, lo_full, hi_full, LEFT, RIGHT, qk_scale, HAS_LEFT, HAS_RIGHT)

    @gluon.jit
    def _ws_loader(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
            i0, lo, n_blocks, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
            STAGES: gl.constexpr, CONSUMERS: gl.constexpr, desc_o, LSE_ROW, slm, Nq, Nk, lo_full, hi_full, LEFT,
            RIGHT, qk_scale, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        _ws_producer(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                     i0, lo, n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CONSUMERS)

    @gluon.jit
    def _gluon_fwd_ws_kernel(Q, K, V, O, LSE, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                             slb, slh, slm, H, Nq, Nk, G, D, NUM_M, qk_scale, LEFT, RIGHT,
                             HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                             STAGES: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                             LONGEST_FIRST: gl.constexpr, CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                             num_warps: gl.constexpr):
        """Warp-specialised: a producer warp for the copies, CONSUMERS (2 or 3) consumer warpgroups of 64 rows."""
        b, h, hk, i0 = _tile_coords(NUM_M, H, G, BLOCK_M, LONGEST_FIRST)
        dtype: gl.constexpr = Q.dtype.element_ty
        ROWS: gl.constexpr = BLOCK_M // CONSUMERS  # query rows per consumer warpgroup (64)
        Q_ROWS: gl.constexpr = BLOCK_M if CONSUMERS == 2 else ROWS  # one Q load: a power of two
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q_ROWS, HEAD_DIM], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        desc_q, desc_k, desc_v, desc_o = _descriptors(Q, K, V, O, b, h, hk, sqb, sqh, sqm, skb, skh, skn, svb, svh,
                                                      svn, sob, soh, som, Nq, Nk, D, HEAD_DIM, Q_ROWS, BLOCK_N, ROWS)
        if CONSUMERS == 2:  # later the output rows
            q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)
        else:
            q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, ROWS, HEAD_DIM], q_layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        k_ready, k_empty, v_ready, v_empty = _ring_barriers(STAGES, CONSUMERS)

        lo, n_blocks, lo_full, hi_full = _key_blocks(i0, Nq, Nk, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        lse_row = LSE + b * slb + h * slh
        # The same arguments for every partition, written out each time: a tuple held in a variable
        # would turn its constexprs (BLOCK_M, CONSUMERS, ...) into runtime values.
        if CONSUMERS == 3:
            gl.warp_specialize([
                (_ws_consumer_0, (
                    desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                    i0, lo, n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CONSUMERS, desc_o, lse_row, slm, Nq,
                    Nk, lo_full, hi_full, LEFT, RIGHT, qk_scale, HAS_LEFT, HAS_RIGHT)),
                (_ws_consumer_1, (
                    desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                    i0, lo, n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CONSUMERS, desc_o, lse_row, slm, Nq,
                    Nk, lo_full, hi_full, LEFT, RIGHT, qk_scale, HAS_LEFT, HAS_RIGHT)),
                (_ws_consumer_2, (
                    desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                    i0, lo, n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CONSUMERS, desc_o, lse_row, slm, Nq,
                    Nk, lo_full, hi_full, LEFT, RIGHT, qk_scale, HAS_LEFT, HAS_RIGHT)),
                (_ws_loader, (
                    desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                    i0, lo, n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CONSUMERS, desc_o, lse_row, slm, Nq,
                    Nk, lo_full, hi_full, LEFT, RIGHT, qk_scale, HAS_LEFT, HAS_RIGHT)),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])
        else:
            gl.warp_specialize([
                (_ws_consumer_0, (
                    desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                    i0, lo, n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CONSUMERS, desc_o, lse_row, slm, Nq,
                    Nk, lo_full, hi_full, LEFT, RIGHT, qk_scale, HAS_LEFT, HAS_RIGHT)),
                (_ws_consumer_1, (
                    desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                    i0, lo, n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CONSUMERS, desc_o, lse_row, slm, Nq,
                    Nk, lo_full, hi_full, LEFT, RIGHT, qk_scale, HAS_LEFT, HAS_RIGHT)),
                (_ws_loader, (
                    desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                    i0, lo, n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CONSUMERS, desc_o, lse_row, slm, Nq,
                    Nk, lo_full, hi_full, LEFT, RIGHT, qk_scale, HAS_LEFT, HAS_RIGHT)),
            ], [4, 1], [CONSUMER_REGS, 24])


def gluon_supported(q, k, v) -> bool:
    """Shapes this kernel takes (the caller has checked sm_90 and TMA strides): Dv == D, 32 < D <= 256, 16-bit."""
    return HAVE_GLUON and gluon_kernel_takes(q, k, v) and pow2(q.shape[-1]) in GLUON_FWD


def _launch_config(config: dict) -> tuple[bool, dict]:
    """A GLUON_FWD-style tile -> (warp-specialised?, the kernel's constants and options), checked."""
    cfg = dict(config)
    ws = cfg.pop("WS", False)
    if ws:
        if cfg.get("num_warps", 4) != 4:
            raise ValueError(f"the warp-specialised Gluon kernel runs num_warps=4 (one consumer warpgroup per "
                             f"partition), got num_warps={cfg['num_warps']}: drop num_warps or WS from the config")
        cfg["num_warps"] = 4
        consumers = cfg.setdefault("CONSUMERS", 2)
        if consumers not in (2, 3) or cfg["BLOCK_M"] != 64 * consumers:
            raise ValueError(f"the warp-specialised Gluon kernel gives each of CONSUMERS (2 or 3) warpgroups 64 query "
                             f"rows, got CONSUMERS={consumers}, BLOCK_M={cfg['BLOCK_M']}: use BLOCK_M={64 * consumers}")
        # Registers per thread: at launch each of the 128 * (CONSUMERS + 1) threads (the producer warp's
        # group is padded to a warpgroup) gets maxnreg, 65536 in all per SM; then the worker consumers
        # grow to CONSUMER_REGS, the producer shrinks to 24 and the default consumer takes what is left
        # (240 for two consumers; 168 for three). FA3's split: 240 / 24 for two, 160 / 24 for three.
        cfg.setdefault("CONSUMER_REGS", 240 if consumers == 2 else 160)
        cfg.setdefault("maxnreg", 168 if consumers == 2 else 128)
    return ws, cfg


_CONFIGS: dict = {}  # a tile's items -> _launch_config(tile), checked once
if HAVE_GLUON:  # direct launches after the first of each signature (kernels/launch.py: ~30 us a call less)
    _LAUNCH = {True: KernelLaunch(_gluon_fwd_ws_kernel), False: KernelLaunch(_gluon_fwd_kernel)}


def gluon_fwd(q, k, v, *, scale, left, right, config=None):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, D) -> out (B, Hq, Nq, D), lse (B, Hq, Nq) fp32."""
    from fa2lab.kernels.hopper_fwd import ensure_allocator

    ensure_allocator()
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if q.stride(1) < q.stride(2):  # q is a (B, Nq, Hq, D) tensor seen as (B, Hq, Nq, D): write out the same way
        out = torch.empty(b, nq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty(b, h, nq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or nq == 0:
        return out, lse.fill_(float("-inf"))
    width = pow2(d)
    tile = GLUON_FWD[width] if config is None else config
    key = tuple(tile.items())
    if key not in _CONFIGS:
        if len(_CONFIGS) > 64:
            _CONFIGS.clear()
        _CONFIGS[key] = _launch_config(tile)
    ws, cfg = _CONFIGS[key]
    num_m = triton.cdiv(nq, cfg["BLOCK_M"])
    sq, sk, sv, so = q.stride(), k.stride(), v.stride(), out.stride()
    scalars = (sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], so[0], so[1], so[2], *lse.stride(),
               h, nq, nk, h // hkv, d, num_m, scale * LOG2E, max(left, 0), max(right, 0))
    _LAUNCH[ws]((num_m * b * h,), (q, k, v, out, lse), scalars, HEAD_DIM=width, HAS_LEFT=left >= 0,
                HAS_RIGHT=right >= 0, LONGEST_FIRST=right >= 0 and left < 0, **cfg)
    return out, lse


__all__ = ["GLUON_FWD", "GLUON_FWD_ONE_PARTITION", "HAVE_GLUON", "gluon_fwd", "gluon_supported"]
