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

Three kernels run that loop. `_gluon_fwd_kernel`: one partition of two warpgroups (8 warps) that
share each K/V buffer and meet at a CTA barrier before it is refilled (the first version: the
barriers keep the warpgroups in lockstep, 0.70-0.99x the Triton kernel). `_gluon_fwd_ws_kernel`
(config WS=True): warp-specialised, a producer warp issues the TMA copies and two consumer
warpgroups of 64 rows each (three with CONSUMERS=3, BLOCK_M=192: FA3's D=64 tile) run the loop above
(`_consume_tile`), each freeing a buffer by its own mbarrier arrival, so none waits for another
(1.12-1.19x the Triton kernel at D = 128, N >= 4096 on the H200: BENCHMARKS.md), one program per
tile. `_gluon_fwd_persistent_kernel` (WS=True, PERSISTENT=True, the default table): the same
partitions, one program per SM walking tiles in a snake order (causal: longest first within
L2-sized groups of heads); the producer loads the next tile's Q and K / V while the consumers finish
this one, so a tile's start (launch, descriptors, first loads) is paid once per SM (N = 1024, D = 128:
557 against 442 TFLOP/s non-persistent, cuDNN 552).

Plain dense calls only (no varlen, no variants), Dv == D, 32 < D <= 256 (tiles in
hopper_config.GLUON_FWD; causal and window calls where GLUON_FWD_MASKED has a tile, that one); the
dispatcher sends a call here only at head-dim bounds in hopper_config.FWD_GLUON (measured faster)
and GLUON_TESTED (tested on a GPU), everything else to hopper_fwd.py. Gluon does not run in the
interpreter: tests/test_gluon_gpu.py checks these kernels on an sm_90 GPU; on the CPU
tests/test_gluon_host.py checks the host-side choices.
"""

from __future__ import annotations

import torch
import triton

from fa2lab.kernels.common import LOG2E, pow2
from fa2lab.kernels.hopper_config import GLUON_FWD, GLUON_FWD_MASKED, GLUON_FWD_ONE_PARTITION, gluon_kernel_takes
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
    def _consume_tile(q_rows, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, it0, r0, lo, n_blocks, lo_full,
                      hi_full, Nk, off, LEFT, RIGHT, qk_scale, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                      HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """One consumer warpgroup's loop over one tile (Algorithm 2 of FA3): query rows [r0, r0 + ROWS)
        against key blocks lo + j * BLOCK_N, j < n_blocks, which the producer puts in ring slot
        (it0 + j) % STAGES (it0: the blocks this program consumed before this tile). -> the unnormalised
        output (fp32), row max and row sum in the log2 domain."""
        dtype: gl.constexpr = q_rows.dtype
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
        mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
        col_s: gl.constexpr = gl.SliceLayout(0, mma_s)
        row_o: gl.constexpr = gl.SliceLayout(1, mma_o)
        offs_m = r0 + gl.arange(0, ROWS, layout=row_s)
        offs_n = gl.arange(0, BLOCK_N, layout=col_s)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([ROWS], gl.float32, layout=row_s)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=mma_o)
        zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=mma_s)
        if n_blocks > 0:
            st = it0 % STAGES
            mbarrier.wait(k_ready.index(st), (it0 // STAGES) & 1)
            s_tok = warpgroup_mma(q_rows, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(st), count=1)
            masked = (lo < lo_full) | (lo + BLOCK_N > hi_full)
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, lo, masked, offs_m, offs_n, Nk, off, LEFT, RIGHT,
                                               qk_scale, HAS_LEFT, HAS_RIGHT)
            p_prev = gl.convert_layout(p.to(dtype), p_layout)
            for j in range(1, n_blocks):
                it = it0 + j
                st = it % STAGES
                prev = (it - 1) % STAGES
                start_n = lo + j * BLOCK_N
                mbarrier.wait(k_ready.index(st), (it // STAGES) & 1)
                s_tok = warpgroup_mma(q_rows, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False,
                                      is_async=True)
                mbarrier.wait(v_ready.index(prev), ((it - 1) // STAGES) & 1)
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
            last = it0 + n_blocks - 1
            mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
            o_tok = warpgroup_mma(p_prev, v_smem.index(last % STAGES), acc, is_async=True)
            acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_prev))
            mbarrier.arrive(v_empty.index(last % STAGES), count=1)
        return acc, m_i, l_i

    @gluon.jit
    def _finish(acc, m_i, l_i, r0, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
        """O / l and the natural-log LSE of a consumer's rows (rows that saw no key: zeros and -inf), and
        the rows' indices in LSE's layout."""
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
        mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, mma_o)
        empty = l_i == 0.0
        out = acc / gl.expand_dims(gl.convert_layout(gl.where(empty, 1.0, l_i), row_o), 1)
        lse = gl.where(empty, float("-inf"), m_i + gl.log2(gl.where(empty, 1.0, l_i))) * LN2
        return out, lse, r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma_s))

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
        if CONSUMERS == 2:
            q_rows = q_smem.slice(WG * ROWS, ROWS)
        else:
            q_rows = q_smem.index(WG)
        r0 = i0 + WG * ROWS
        mbarrier.wait(q_bar, 0)
        acc, m_i, l_i = _consume_tile(q_rows, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, 0, r0, lo, n_blocks,
                                      lo_full, hi_full, Nk, Nk - Nq, LEFT, RIGHT, qk_scale, ROWS, BLOCK_N, HEAD_DIM,
                                      STAGES, HAS_LEFT, HAS_RIGHT)
        out, lse, offs_m = _finish(acc, m_i, l_i, r0, ROWS, BLOCK_N, HEAD_DIM)
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


    # ---- The persistent warp-specialised kernel (config PERSISTENT=True) -----------------------------
    # One program per SM walks tiles t = pid, then the next in a snake order (below). The producer
    # runs ahead across tiles: it loads the next tile's Q (Q_STAGES = 2 buffers) and its first K and V
    # blocks while the consumers finish this one, so a tile's prologue (Q and K_0 latency) and the
    # launch of a program are paid once per SM, not once per tile: the cost that puts N = 1024 at
    # 0.67-0.79x cuDNN (a tile there has 8 key blocks). The descriptors cover the whole (B, H, N, D)
    # tensors (4-d boxes of (1, 1, rows, D)), built once per program: rows past N still read as zeros
    # and are clipped on store, per head.

    @gluon.jit
    def _persistent_tile(k, pid, nprog, NUM_M, BH, H, G, SECTION, BLOCK_M: gl.constexpr,
                         LONGEST_FIRST: gl.constexpr):
        """This program's k-th tile -> (tile index, batch, query head, K/V head, first query row).

        Snake order: wave k gives tile k * nprog + pid, odd waves in reverse, so that the program
        that drew the heaviest tile of one wave draws the lightest of the next. Causal (LONGEST_FIRST):
        heads in sections of SECTION whose K and V fit in L2; in a section, the query blocks with the
        most keys first (a longest-first order over the section's tiles). Otherwise head-major: the
        programs running at once share a few heads' K and V."""
        t = k * nprog + gl.where(k % 2 == 0, pid, nprog - 1 - pid)
        if LONGEST_FIRST:
            per = SECTION * NUM_M
            sec = t // per
            width = gl.maximum(gl.minimum(SECTION, BH - sec * SECTION), 1)  # >= 1 past the last tile too
            r = t % per
            pid_m = NUM_M - 1 - r // width
            bh = sec * SECTION + r % width
        else:
            bh = t // NUM_M
            pid_m = t % NUM_M
        h = bh % H
        return t, bh // H, h, h // G, pid_m * BLOCK_M

    @gluon.jit
    def _pws_producer(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                      v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT, RIGHT,
                      qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                      STAGES: gl.constexpr, Q_STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
                      HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, LONGEST_FIRST: gl.constexpr):
        """One warp: per tile, Q into buffer `done % Q_STAGES` once the consumers have stored the output
        that buffer last held, then K_j and V_j into the ring (slot = blocks so far % STAGES)."""
        ROWS: gl.constexpr = BLOCK_M // CONSUMERS
        dtype: gl.constexpr = q_smem.dtype
        q4: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, ROWS, HEAD_DIM], dtype)
        kv4: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_N, HEAD_DIM], dtype)
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        it = 0
        done = 0
        for k in range(gl.cdiv(num_tiles, nprog)):
            t, b, h, hk, i0 = _persistent_tile(k, pid, nprog, NUM_M, BH, H, G, SECTION, BLOCK_M, LONGEST_FIRST)
            if t < num_tiles:
                lo, n_blocks, lo_full, hi_full = _key_blocks(i0, Nq, Nk, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT,
                                                             HAS_RIGHT)
                qs = done % Q_STAGES
                mbarrier.wait(q_empty.index(qs), ((done // Q_STAGES) & 1) ^ 1)  # fresh: phase 1 complete
                mbarrier.expect(q_ready.index(qs), BLOCK_M * HEAD_DIM * 2)
                for c in gl.static_range(CONSUMERS):
                    _tma_load(desc_q, [b, h, i0 + c * ROWS, 0], q_ready.index(qs),
                              q_smem.index(qs * CONSUMERS + c)._reinterpret(dtype, [1, 1, ROWS, HEAD_DIM], q4))
                for j in range(n_blocks):
                    st = it % STAGES
                    ph = (it // STAGES) & 1
                    mbarrier.wait(k_empty.index(st), ph ^ 1)
                    mbarrier.expect(k_ready.index(st), BLOCK_N * HEAD_DIM * 2)
                    _tma_load(desc_k, [b, hk, lo + j * BLOCK_N, 0], k_ready.index(st),
                              k_smem.index(st)._reinterpret(dtype, [1, 1, BLOCK_N, HEAD_DIM], kv4))
                    mbarrier.wait(v_empty.index(st), ph ^ 1)
                    mbarrier.expect(v_ready.index(st), BLOCK_N * HEAD_DIM * 2)
                    _tma_load(desc_v, [b, hk, lo + j * BLOCK_N, 0], v_ready.index(st),
                              v_smem.index(st)._reinterpret(dtype, [1, 1, BLOCK_N, HEAD_DIM], kv4))
                    it += 1
                done += 1

    @gluon.jit
    def _pws_consumer(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                      v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT, RIGHT,
                      qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                      STAGES: gl.constexpr, Q_STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
                      HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, LONGEST_FIRST: gl.constexpr,
                      WG: gl.constexpr):
        """One consumer warpgroup over this program's tiles: the loop of _consume_tile, then the output
        through its Q buffer (no longer read) by TMA; the buffer is released once the copy has read it."""
        ROWS: gl.constexpr = BLOCK_M // CONSUMERS
        dtype: gl.constexpr = q_smem.dtype
        q4: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, ROWS, HEAD_DIM], dtype)
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        it = 0
        done = 0
        for k in range(gl.cdiv(num_tiles, nprog)):
            t, b, h, hk, i0 = _persistent_tile(k, pid, nprog, NUM_M, BH, H, G, SECTION, BLOCK_M, LONGEST_FIRST)
            if t < num_tiles:
                lo, n_blocks, lo_full, hi_full = _key_blocks(i0, Nq, Nk, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT,
                                                             HAS_RIGHT)
                qs = done % Q_STAGES
                q_rows = q_smem.index(qs * CONSUMERS + WG)
                r0 = i0 + WG * ROWS
                mbarrier.wait(q_ready.index(qs), (done // Q_STAGES) & 1)
                acc, m_i, l_i = _consume_tile(q_rows, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, it, r0, lo,
                                              n_blocks, lo_full, hi_full, Nk, Nk - Nq, LEFT, RIGHT, qk_scale, ROWS,
                                              BLOCK_N, HEAD_DIM, STAGES, HAS_LEFT, HAS_RIGHT)
                it += n_blocks
                out, lse, offs_m = _finish(acc, m_i, l_i, r0, ROWS, BLOCK_N, HEAD_DIM)
                q_rows.store(out.to(dtype))
                fence_async_shared()
                _tma_store(desc_o, [b, h, r0, 0], q_rows._reinterpret(dtype, [1, 1, ROWS, HEAD_DIM], q4))
                lse_row = LSE + b.to(gl.int64) * slb + h.to(gl.int64) * slh
                gl.store(lse_row + offs_m.to(gl.int64) * slm, lse, mask=offs_m < Nq)
                tma.store_wait(0)  # the copy has read the buffer: the producer may refill it
                mbarrier.arrive(q_empty.index(qs), count=1)
                done += 1

    @gluon.jit
    def _pws_consumer_0(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                        v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT,
                        RIGHT, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                        STAGES: gl.constexpr, Q_STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
                        HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, LONGEST_FIRST: gl.constexpr):
        _pws_consumer(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                      v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT, RIGHT,
                      qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, Q_STAGES, CONSUMERS, HAS_LEFT, HAS_RIGHT,
                      LONGEST_FIRST, 0)

    @gluon.jit
    def _pws_consumer_1(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                        v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT,
                        RIGHT, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                        STAGES: gl.constexpr, Q_STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
                        HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, LONGEST_FIRST: gl.constexpr):
        _pws_consumer(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                      v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT, RIGHT,
                      qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, Q_STAGES, CONSUMERS, HAS_LEFT, HAS_RIGHT,
                      LONGEST_FIRST, 1)

    @gluon.jit
    def _pws_consumer_2(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                        v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT,
                        RIGHT, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                        STAGES: gl.constexpr, Q_STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
                        HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, LONGEST_FIRST: gl.constexpr):
        _pws_consumer(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                      v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT, RIGHT,
                      qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, Q_STAGES, CONSUMERS, HAS_LEFT, HAS_RIGHT,
                      LONGEST_FIRST, 2)

    @gluon.jit
    def _gluon_fwd_persistent_kernel(Q, K, V, O, LSE, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                                     slb, slh, slm, B, H, Hkv, Nq, Nk, G, D, NUM_M, SECTION, qk_scale, LEFT, RIGHT,
                                     HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                     STAGES: gl.constexpr, Q_STAGES: gl.constexpr, HAS_LEFT: gl.constexpr,
                                     HAS_RIGHT: gl.constexpr, LONGEST_FIRST: gl.constexpr,
                                     CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
        """Persistent and warp-specialised: grid = min(tiles, SMs); a producer warp, CONSUMERS (2 or 3)
        consumer warpgroups of 64 rows; Q_STAGES query buffers (each also the output tile)."""
        dtype: gl.constexpr = Q.dtype.element_ty
        ROWS: gl.constexpr = BLOCK_M // CONSUMERS
        q4: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, ROWS, HEAD_DIM], dtype)
        kv4: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_N, HEAD_DIM], dtype)
        desc_q = tma.make_tensor_descriptor(Q, shape=[B, H, Nq, D], strides=[sqb, sqh, sqm, 1],
                                            block_shape=[1, 1, ROWS, HEAD_DIM], layout=q4)
        desc_k = tma.make_tensor_descriptor(K, shape=[B, Hkv, Nk, D], strides=[skb, skh, skn, 1],
                                            block_shape=[1, 1, BLOCK_N, HEAD_DIM], layout=kv4)
        desc_v = tma.make_tensor_descriptor(V, shape=[B, Hkv, Nk, D], strides=[svb, svh, svn, 1],
                                            block_shape=[1, 1, BLOCK_N, HEAD_DIM], layout=kv4)
        desc_o = tma.make_tensor_descriptor(O, shape=[B, H, Nq, D], strides=[sob, soh, som, 1],
                                            block_shape=[1, 1, ROWS, HEAD_DIM], layout=q4)
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_smem = gl.allocate_shared_memory(dtype, [Q_STAGES * CONSUMERS, ROWS, HEAD_DIM], q_layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [Q_STAGES, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [Q_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(Q_STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=CONSUMERS)
        k_ready, k_empty, v_ready, v_empty = _ring_barriers(STAGES, CONSUMERS)
        num_tiles = B * H * NUM_M
        BH = B * H
        if CONSUMERS == 3:
            gl.warp_specialize([
                (_pws_consumer_0, (
                    desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                    v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT, RIGHT,
                    qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, Q_STAGES, CONSUMERS, HAS_LEFT, HAS_RIGHT,
                    LONGEST_FIRST)),
                (_pws_consumer_1, (
                    desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                    v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT, RIGHT,
                    qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, Q_STAGES, CONSUMERS, HAS_LEFT, HAS_RIGHT,
                    LONGEST_FIRST)),
                (_pws_consumer_2, (
                    desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                    v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT, RIGHT,
                    qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, Q_STAGES, CONSUMERS, HAS_LEFT, HAS_RIGHT,
                    LONGEST_FIRST)),
                (_pws_producer, (
                    desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                    v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT, RIGHT,
                    qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, Q_STAGES, CONSUMERS, HAS_LEFT, HAS_RIGHT,
                    LONGEST_FIRST)),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])
        else:
            gl.warp_specialize([
                (_pws_consumer_0, (
                    desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                    v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT, RIGHT,
                    qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, Q_STAGES, CONSUMERS, HAS_LEFT, HAS_RIGHT,
                    LONGEST_FIRST)),
                (_pws_consumer_1, (
                    desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                    v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT, RIGHT,
                    qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, Q_STAGES, CONSUMERS, HAS_LEFT, HAS_RIGHT,
                    LONGEST_FIRST)),
                (_pws_producer, (
                    desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                    v_ready, v_empty, LSE, slb, slh, slm, num_tiles, NUM_M, BH, H, G, SECTION, Nq, Nk, LEFT, RIGHT,
                    qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, Q_STAGES, CONSUMERS, HAS_LEFT, HAS_RIGHT,
                    LONGEST_FIRST)),
            ], [4, 1], [CONSUMER_REGS, 24])


def gluon_supported(q, k, v) -> bool:
    """Shapes this kernel takes (the caller has checked sm_90 and TMA strides): Dv == D, 32 < D <= 256, 16-bit."""
    return HAVE_GLUON and gluon_kernel_takes(q, k, v) and pow2(q.shape[-1]) in GLUON_FWD


def _launch_config(config: dict) -> tuple[str, dict]:
    """A GLUON_FWD-style tile -> (kernel: "one", "ws" or "persistent", its constants and options), checked."""
    cfg = dict(config)
    ws = cfg.pop("WS", False)
    persistent = cfg.pop("PERSISTENT", False)
    if persistent and not ws:
        raise ValueError("PERSISTENT=True is a warp-specialised kernel: add WS=True to the config")
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
    if persistent:  # Q_STAGES (1 or 2 query buffers) is set per head dim by _q_stages unless given
        if cfg.get("Q_STAGES", 1) not in (1, 2):
            raise ValueError(f"Q_STAGES must be 1 or 2, got {cfg['Q_STAGES']}")
    elif "Q_STAGES" in cfg:
        raise ValueError("Q_STAGES is an option of the persistent kernel: add PERSISTENT=True and WS=True")
    return ("persistent" if persistent else "ws") if ws else "one", cfg


# The persistent kernel's shared memory: Q_STAGES x BLOCK_M x D + 2 x STAGES x BLOCK_N x D (16-bit),
# below the 227 KB an sm_90 block may take (a few KB stay for barriers and layout conversions).
_SMEM_LIMIT = 220 * 1024


def _q_stages(cfg: dict, width: int) -> dict:
    """Q_STAGES for the persistent kernel at head-dim bound `width`: two query buffers (the next tile's Q
    loads under this tile's loop) where they fit beside the K / V ring; D = 256's 128 x 64 tile has room
    for one (the producer then loads the next Q once this tile's output has left the buffer)."""
    if "Q_STAGES" in cfg:
        return cfg
    ring = 2 * cfg["STAGES"] * cfg["BLOCK_N"] * width * 2
    two = 2 * cfg["BLOCK_M"] * width * 2 + ring <= _SMEM_LIMIT
    return dict(cfg, Q_STAGES=2 if two else 1)


_SMS: dict = {}  # CUDA device index -> SM count (asked once per device)


def _sm_count(t: torch.Tensor) -> int:
    index = t.get_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


# Causal persistent order: heads in sections whose K and V together take about this much of the L2
# (50 MB on the H100 / H200), so that a section's query blocks find their keys there.
L2_SECTION_BYTES = 24 * 1024 * 1024


def _section(hq: int, hkv: int, nk: int, d: int, elem: int) -> int:
    per_head = 2 * nk * d * elem * hkv / hq  # K and V bytes per query head (GQA: G heads share them)
    return max(1, int(L2_SECTION_BYTES // max(per_head, 1)))


def _box_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and token strides of a (B, H, N, D) tensor for the persistent kernel's 4-d
    descriptors: a dimension of size 1 is never stepped, so its stride (which torch may report as
    anything) becomes the token stride times N, a valid TMA stride."""
    sb, sh, sn = t.stride()[:3]
    safe = sn * max(t.shape[2], 1)
    return (sb if t.shape[0] > 1 else safe), (sh if t.shape[1] > 1 else safe), sn


def _box_strides_ok(t: torch.Tensor) -> bool:
    """A broadcast (stride 0) batch or head dimension of size > 1 is left to the per-head descriptors
    of the non-persistent kernel."""
    return all(stride > 0 or size == 1 for stride, size in zip(t.stride()[:2], t.shape[:2]))


if HAVE_GLUON:  # direct launches after the first of each signature (kernels/launch.py: ~30 us a call less)
    _LAUNCH = {"ws": KernelLaunch(_gluon_fwd_ws_kernel), "one": KernelLaunch(_gluon_fwd_kernel),
               "persistent": KernelLaunch(_gluon_fwd_persistent_kernel)}

# Call signature (shapes, strides, dtype, device, scale, window, tile) -> what _plan derived from it: a
# repeated call (every layer of a model, every step of a benchmark) skips the tile checks, the stride
# and grid arithmetic and the dict building, ~15 us of host time at a 1k-token prefill's shapes.
_PLANS: dict = {}
_PLAN_MEMORY = 256  # all plans are forgotten past this many


def _default_tile(width: int, left: int, right: int) -> dict:
    """The table's tile: causal / window calls take GLUON_FWD_MASKED's where it has one."""
    tile = GLUON_FWD_MASKED.get(width) if left >= 0 or right >= 0 else None
    return tile or GLUON_FWD[width]


def _plan(q, k, v, out, lse, scale, left, right, tile, width):
    """(kernel name, grid, scalar arguments, constants and options) for one call signature."""
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    kind, cfg = _launch_config(tile)
    if kind == "persistent" and not all(_box_strides_ok(t) for t in (q, k, v)):
        kind, cfg = _launch_config({name: x for name, x in tile.items() if name not in ("PERSISTENT", "Q_STAGES")})
    if kind == "persistent":
        cfg = _q_stages(cfg, width)
    num_m = triton.cdiv(nq, cfg["BLOCK_M"])
    causal_order = right >= 0 and left < 0
    constants = dict(HEAD_DIM=width, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, LONGEST_FIRST=causal_order, **cfg)
    tail = (scale * LOG2E, max(left, 0), max(right, 0))
    if kind == "persistent":
        section = _section(h, hkv, nk, d, q.element_size()) if causal_order else 1
        strides = (*_box_strides(q), *_box_strides(k), *_box_strides(v), *_box_strides(out), *lse.stride())
        return kind, (min(num_m * b * h, _sm_count(q)),), (*strides, b, h, hkv, nq, nk, h // hkv, d, num_m, section,
                                                            *tail), constants
    sq, sk, sv, so = q.stride(), k.stride(), v.stride(), out.stride()
    strides = (sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], so[0], so[1], so[2], *lse.stride())
    return kind, (num_m * b * h,), (*strides, h, nq, nk, h // hkv, d, num_m, *tail), constants


def gluon_fwd(q, k, v, *, scale, left, right, config=None):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, D) -> out (B, Hq, Nq, D), lse (B, Hq, Nq) fp32."""
    from fa2lab.kernels.hopper_fwd import ensure_allocator

    ensure_allocator()
    b, h, nq, d = q.shape
    if q.stride(1) < q.stride(2):  # q is a (B, Nq, Hq, D) tensor seen as (B, Hq, Nq, D): write out the same way
        out = torch.empty(b, nq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty(b, h, nq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or nq == 0:
        return out, lse.fill_(float("-inf"))
    width = pow2(d)
    tile = _default_tile(width, left, right) if config is None else config
    # the tile's items, not the dict: a table entry edited in place (a benchmark's sweep) is a new plan
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.get_device(), scale, left, right,
           tuple(tile.items()))
    plan = _PLANS.get(key)
    if plan is None:
        kind, grid, scalars, constants = _plan(q, k, v, out, lse, scale, left, right, tile, width)
        # the launch signature's call-independent part, built once (kernels/launch.py)
        static = (kind, grid, scalars, tuple(map(type, scalars)), tuple(constants.items()))
        plan = kind, grid, scalars, constants, static
        if len(_PLANS) >= _PLAN_MEMORY:
            _PLANS.clear()
        _PLANS[key] = plan
    kind, grid, scalars, constants, static = plan
    _LAUNCH[kind].launch(grid, (q, k, v, out, lse), scalars, constants, static)
    return out, lse


__all__ = ["GLUON_FWD", "GLUON_FWD_ONE_PARTITION", "HAVE_GLUON", "gluon_fwd", "gluon_supported"]
