"""Split-K decode in Triton (Flash-Decoding), partials and merge in one launch.

One program per (batch x K/V head x query-row tile, split). The G query heads of a K/V head and the
Nq new tokens are packed as rows (row r: query r // G of head hk*G + r % G), so each K/V byte is
read once per split for the whole group; rows are tiled by BLOCK_M, so a chunked prefill (Nq in the
thousands) never asks for more shared memory than one tile. Each split takes an equal share of the
keys its rows can see, computed on the device from cache_seqlens: the split count is fixed at
launch (planned from the cache's capacity), the split sizes follow the lengths, and nothing is
read back to the host.

Fused merge: with more than one split, every program writes its partial (out, lse) to a workspace
and increments its tile's counter (an atomic with acquire-release order); the program that sees
the counter reach S - 1 is the last one of its tile, merges the S partials by their LSEs, writes
the output and resets the counter to 0 for the next call (so a captured CUDA graph can replay).

Memory safety for any cache_seqlens: lengths are clamped to [0, capacity] and page numbers to
[0, num_pages) on the device. `append_kv_triton` writes new K/V at each sequence's length, dropping
positions past the capacity or on pages outside the pool.

Readable twin: fa2lab/decode/splitk.py (and merge.py). Tests: tests/test_decode_plan.py,
tests/test_triton.py, tests/test_triton_gpu.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fa2lab.kernels.common import LOG2E, LOG2E_K, dot, ieee_dot, online_softmax_step, pow2
from fa2lab.kernels.launch import bind_compiled, capturing
from fa2lab.kernels.variants import _variant_logits



@triton.jit
def _sink(lse2, sink2):
    """exp(sink) joins the denominator (log2 units): -> (e^(lse - lse'), lse' = logaddexp(lse, sink)),
    the output's factor and the new lse. A row that saw no key (lse = -inf) keeps out = 0 and gets
    lse' = sink."""
    top = tl.maximum(lse2, sink2)
    lse_s = top + tl.math.log2(tl.math.exp2(lse2 - top) + tl.math.exp2(sink2 - top))
    return tl.math.exp2(lse2 - lse_s), lse_s


@triton.jit
def _pages(bt_base, start, j1, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """The physical page of each key of the tile at `start`: one table entry when the tile lies in
    one page, else BLOCK_N // PAGE_SIZE entries (neighbours in one cache line), one per key."""
    # One return after a compile-time if/else: the compiler (not the interpreter) refuses a
    # function whose returns differ in shape, even when a branch is pruned.
    if PAGE_SIZE % BLOCK_N == 0:
        pages = tl.load(bt_base + start // PAGE_SIZE, mask=start < j1, other=0)
    else:
        cols = start + tl.arange(0, BLOCK_N)
        pages = tl.load(bt_base + cols // PAGE_SIZE, mask=cols < j1, other=0)
    return pages


@triton.jit
def _decode_tiles(acc, l_i, m_i, q, k_base, v_base, bt_base, b, t0, t1, j1, qi, qpos, row_ok, offs_d, offs_dv,
                  skb, skn, skd, svb, svn, svd, NUM_PAGES, Nq, L, qk_scale, cap_in, cap_out, slope2, bias_dummy,
                  LEFT, RIGHT, D: tl.constexpr, D_V: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                  PAGED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, IEEE_DOT: tl.constexpr,
                  SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASKED: tl.constexpr,
                  PREFETCH_PAGES: tl.constexpr):
    """FA2's online softmax over the key tiles [t0, t1) of one split (keys < j1): Algorithm 1,
    lines 6-10. MASKED tiles check every column against j1 and the window; the others are inside
    both (and D, D_V are the padded widths or their loads are masked by columns only).
    PREFETCH_PAGES reads the next tile's page-table entries one iteration ahead, so that a K/V load
    never waits for the table read that gives its address."""
    if PAGED and PREFETCH_PAGES:
        nxt = _pages(bt_base, t0, j1, BLOCK_N, PAGE_SIZE)
    else:
        nxt = 0
    for start in range(t0, t1, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < j1
        if PAGED:
            if PREFETCH_PAGES:
                page = nxt
                nxt = _pages(bt_base, start + BLOCK_N, j1, BLOCK_N, PAGE_SIZE)
            else:
                page = _pages(bt_base, start, j1, BLOCK_N, PAGE_SIZE)
            if PAGE_SIZE % BLOCK_N == 0:
                off = start % PAGE_SIZE + tl.arange(0, BLOCK_N)
            else:
                off = cols % PAGE_SIZE
            page = tl.minimum(tl.maximum(page, 0), NUM_PAGES - 1).to(tl.int64)  # memory-safe for any table
            k_row = page * skb + off * skn
            v_row = page * svb + off * svn
        else:
            k_row = b.to(tl.int64) * skb + cols.to(tl.int64) * skn
            v_row = b.to(tl.int64) * svb + cols.to(tl.int64) * svn
        k_mask = offs_d[None, :] < D
        v_mask = offs_dv[None, :] < D_V
        if MASKED:
            k_mask = k_mask & col_ok[:, None]
            v_mask = v_mask & col_ok[:, None]
        k = tl.load(k_base + k_row[:, None] + offs_d[None, :] * skd, mask=k_mask, other=0.0)  # (BLOCK_N, HEAD_DIM)
        v = tl.load(v_base + v_row[:, None] + offs_dv[None, :] * svd, mask=v_mask, other=0.0)  # (BLOCK_N, HEAD_DIM_V)
        # (BLOCK_M, BLOCK_N) logits in log2 units; soft-capping and ALiBi as the dense kernels
        # (kernels/variants.py), ALiBi's distance |i + L - Nq - j| = |qpos - j| with Nk = L.
        s, _ = _variant_logits(dot(q, tl.trans(k), IEEE_DOT), qi[:, None], cols[None, :], False, Nq, L, qk_scale,
                               cap_in, cap_out, slope2, bias_dummy, 0, 0, SOFTCAP, HAS_ALIBI, False)
        if MASKED:
            valid = col_ok[None, :] & row_ok[:, None]
            if HAS_LEFT:
                valid = valid & (cols[None, :] >= qpos[:, None] - LEFT)
            if HAS_RIGHT:
                valid = valid & (cols[None, :] <= qpos[:, None] + RIGHT)
            s = tl.where(valid, s, float("-inf"))
        p, alpha, l_i, m_i = online_softmax_step(s, m_i, l_i)  # Algorithm 1, lines 8-10
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE_DOT)
    return acc, l_i, m_i


@triton.jit
def _decode_kernel(
    Q, K, V, SEQLENS, BT, O, LSE, OP, LP, LOCKS, ALIBI, SINKS,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbt_b, sab, sah,
    sob, soh, som, sod, slb, slh, slm,
    HKV, Nq, G, NEW, CAPACITY, NUM_PAGES, qk_scale, LEFT, RIGHT, M_TILES, S, cap_in, cap_out,
    D: tl.constexpr, D_V: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, SPLIT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    IEEE_DOT: tl.constexpr, STORE_LSE: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, PREFETCH_PAGES: tl.constexpr,
):
    tile = tl.program_id(0)  # (b, hk, row tile)
    split = tl.program_id(1)
    mt = tile % M_TILES
    b = tile // (M_TILES * HKV)
    hk = (tile // M_TILES) % HKV
    # The step's new tokens were appended at [seqlens[b], seqlens[b] + NEW): attend over all of it.
    L = tl.minimum(tl.maximum(tl.load(SEQLENS + b) + NEW, 0), CAPACITY)
    r = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < G * Nq
    qi = r // G  # query position among the Nq new tokens
    h = hk * G + r % G
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q = tl.load(Q + b.to(tl.int64) * sqb + h[:, None] * sqh + qi[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_M, HEAD_DIM)
    qpos = L - Nq + qi  # absolute position of each query row (bottom-right alignment)
    slope2 = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if HAS_ALIBI:  # each row has its own head: (BLOCK_M, 1) slopes, log2 units
        slope2 = (tl.load(ALIBI + b * sab + h * sah, mask=row_ok, other=0.0) * LOG2E_K)[:, None]

    # Keys any row of this tile can see: [lo, hi), then an equal, tile-aligned share per split.
    first_q = L - Nq + (mt * BLOCK_M) // G
    last_q = L - Nq + tl.minimum((mt * BLOCK_M + BLOCK_M - 1) // G, Nq - 1)
    hi = L
    if HAS_RIGHT:
        hi = tl.maximum(tl.minimum(hi, last_q + RIGHT + 1), 0)
    lo = 0
    if HAS_LEFT:
        lo = tl.minimum(tl.maximum(first_q - LEFT, 0), hi)
    lo = (lo // BLOCK_N) * BLOCK_N
    chunk = tl.cdiv(tl.cdiv(hi - lo, S), BLOCK_N) * BLOCK_N
    j0 = lo + split * chunk
    j1 = tl.minimum(j0 + chunk, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    # Tiles every row of this tile sees in full need no mask: [u0, u1), inside [j0, j1). Only the
    # ragged last tile and the tiles on a window's edge pay for element-wise masking.
    u1 = j0 + ((j1 - j0) // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        u1 = tl.minimum(u1, j0 + (tl.maximum(first_q + RIGHT + 1 - j0, 0) // BLOCK_N) * BLOCK_N)
    u0 = j0
    if HAS_LEFT:
        u0 = tl.minimum(j0 + tl.cdiv(tl.maximum(last_q - LEFT - j0, 0), BLOCK_N) * BLOCK_N, u1)
    u1 = tl.maximum(u1, u0)
    k_base = K + hk * skh
    v_base = V + hk * svh
    bt_base = BT + b.to(tl.int64) * sbt_b
    acc, l_i, m_i = _decode_tiles(acc, l_i, m_i, q, k_base, v_base, bt_base, b, j0, u0, j1, qi, qpos, row_ok, offs_d,
                                  offs_dv, skb, skn, skd, svb, svn, svd, NUM_PAGES, Nq, L, qk_scale, cap_in, cap_out,
                                  slope2, Q, LEFT, RIGHT, D, D_V, BLOCK_N, PAGE_SIZE, PAGED, HAS_LEFT, HAS_RIGHT,
                                  IEEE_DOT, SOFTCAP, HAS_ALIBI, True, PREFETCH_PAGES)
    acc, l_i, m_i = _decode_tiles(acc, l_i, m_i, q, k_base, v_base, bt_base, b, u0, u1, j1, qi, qpos, row_ok, offs_d,
                                  offs_dv, skb, skn, skd, svb, svn, svd, NUM_PAGES, Nq, L, qk_scale, cap_in, cap_out,
                                  slope2, Q, LEFT, RIGHT, D, D_V, BLOCK_N, PAGE_SIZE, PAGED, HAS_LEFT, HAS_RIGHT,
                                  IEEE_DOT, SOFTCAP, HAS_ALIBI, False, PREFETCH_PAGES)
    acc, l_i, m_i = _decode_tiles(acc, l_i, m_i, q, k_base, v_base, bt_base, b, u1, j1, j1, qi, qpos, row_ok, offs_d,
                                  offs_dv, skb, skn, skd, svb, svn, svd, NUM_PAGES, Nq, L, qk_scale, cap_in, cap_out,
                                  slope2, Q, LEFT, RIGHT, D, D_V, BLOCK_N, PAGE_SIZE, PAGED, HAS_LEFT, HAS_RIGHT,
                                  IEEE_DOT, SOFTCAP, HAS_ALIBI, True, PREFETCH_PAGES)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]  # 0 for rows that saw no key
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))  # log2 units

    if not SPLIT:
        if HAS_SINKS:
            factor, lse2 = _sink(lse2, tl.load(SINKS + h, mask=row_ok, other=0.0) * LOG2E_K)
            out = out * factor[:, None]
        o_ptr = O + b.to(tl.int64) * sob + h[:, None] * soh + qi[:, None] * som + offs_dv[None, :] * sod
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < D_V))
        if STORE_LSE:
            tl.store(LSE + b * slb + h * slh + qi * slm, lse2 / LOG2E_K, mask=row_ok)
    else:
        n_tiles = tl.num_programs(0)
        part = (split * n_tiles + tile).to(tl.int64) * BLOCK_M  # workspace (S, tiles, BLOCK_M[, HEAD_DIM_V])
        rr = tl.arange(0, BLOCK_M)
        tl.store(OP + (part + rr[:, None]) * HEAD_DIM_V + offs_dv[None, :], out)
        tl.store(LP + part + rr, lse2)
        # Release our partial, acquire everyone else's: the last of the S programs merges.
        done = tl.atomic_add(LOCKS + tile, 1, sem="acq_rel")
        if done == S - 1:
            offs_s = tl.arange(0, BLOCK_S)
            s_ok = offs_s < S
            rows = tl.minimum(G * Nq - mt * BLOCK_M, BLOCK_M)
            for i in range(0, rows):
                ws = (offs_s * n_tiles + tile).to(tl.int64) * BLOCK_M + i  # (BLOCK_S,) this row in each split
                lse_s = tl.load(LP + ws, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
                m = tl.max(lse_s, 0)
                m_ref = tl.where(m == float("-inf"), 0.0, m)
                w = tl.math.exp2(lse_s - m_ref)  # 0 for splits that saw no key (their partial is 0)
                total = tl.sum(w, 0)
                parts = tl.load(OP + ws[:, None] * HEAD_DIM_V + offs_dv[None, :], mask=s_ok[:, None], other=0.0,
                                cache_modifier=".cg")  # (BLOCK_S, HEAD_DIM_V)
                o_row = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
                ri = mt * BLOCK_M + i
                qr, hr = ri // G, hk * G + ri % G
                lse_row = tl.where(total == 0.0, float("-inf"), m_ref + tl.math.log2(tl.where(total == 0.0, 1.0, total)))
                if HAS_SINKS:
                    factor, lse_row = _sink(lse_row, tl.load(SINKS + hr) * LOG2E_K)
                    o_row = o_row * factor
                tl.store(O + b.to(tl.int64) * sob + hr * soh + qr * som + offs_dv * sod,
                         o_row.to(O.dtype.element_ty), mask=offs_dv < D_V)
                if STORE_LSE:
                    tl.store(LSE + b * slb + hr * slh + qr * slm, lse_row / LOG2E_K)
            tl.atomic_xchg(LOCKS + tile, 0)


@triton.jit
def _append_kernel(KN, VN, K, V, SEQLENS, BT,
                   snb, snh, snn, snd, svnb, svnh, svnn, svnd, skb, skh, skn, skd, svb, svh, svn, svd, sbt_b,
                   HKV, NEW, CAPACITY, NUM_PAGES,
                   D: tl.constexpr, D_V: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   BLOCK: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // HKV
    hk = pid % HKV
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pos = tl.load(SEQLENS + b) + i  # (BLOCK,) where the new tokens go
    ok = (i < NEW) & (pos >= 0) & (pos < CAPACITY)
    if PAGED:
        page = tl.load(BT + b.to(tl.int64) * sbt_b + pos // PAGE_SIZE, mask=ok, other=-1)
        ok = ok & (page >= 0) & (page < NUM_PAGES)
        k_row = page.to(tl.int64) * skb + (pos % PAGE_SIZE) * skn
        v_row = page.to(tl.int64) * svb + (pos % PAGE_SIZE) * svn
    else:
        k_row = b.to(tl.int64) * skb + pos.to(tl.int64) * skn
        v_row = b.to(tl.int64) * svb + pos.to(tl.int64) * svn
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    mk = ok[:, None] & (offs_d[None, :] < D)
    mv = ok[:, None] & (offs_dv[None, :] < D_V)
    kn = tl.load(KN + b * snb + hk * snh + i[:, None] * snn + offs_d[None, :] * snd, mask=mk)
    vn = tl.load(VN + b * svnb + hk * svnh + i[:, None] * svnn + offs_dv[None, :] * svnd, mask=mv)
    tl.store(K + hk * skh + k_row[:, None] + offs_d[None, :] * skd, kn.to(K.dtype.element_ty), mask=mk)
    tl.store(V + hk * svh + v_row[:, None] + offs_dv[None, :] * svd, vn.to(V.dtype.element_ty), mask=mv)


DECODE_BLOCK_N = 64  # keys per tile; its split count: fa2lab.decode.splits.kernel_num_splits
MAX_SPLITS = 128  # the fused merge holds (splits x Dv) fp32 values of one row in registers (= splits.MAX_SPLITS)


# Decode tiles for 2-byte dtypes at D <= 128: the best geometric mean over the dense cases of
# `python -m fa2lab.bench.decode_gpu --tune` on the H200 (2026-12-02, BENCHMARKS.md; kernel-only),
# with 2 programs per SM (fa2lab.decode.splits.KERNEL_PROGRAMS_PER_SM).
DECODE_TILES = dict(BLOCK_N=DECODE_BLOCK_N, num_warps=8, num_stages=3)
# Kernel options (bench.decode_gpu flips them in one process): page-table reads one tile ahead,
# on since the H200 run of 2026-12-02 09:27 UTC measured every paged row (paged 16 / dense 0.94-0.97
# with it, 0.78-0.92 without; BENCHMARKS.md).
DECODE_OPTIONS = dict(prefetch_pages=True)


def decode_config(group_rows: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles from the shape: BLOCK_M rows of (query, head) pairs, at least 16 (tl.dot's minimum),
    at most 64 so that q, K and V tiles fit in shared memory at any Nq; 4-byte and 256-wide tiles
    take fewer keys and pipeline stages (fp32 at D=256: 64*256*4*2 per stage)."""
    block_m = min(64, pow2(group_rows))
    if head_dim > 128 or dtype == torch.float32:
        return dict(BLOCK_M=block_m, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=block_m, BLOCK_N=DECODE_TILES["BLOCK_N"] if block_m <= 16 else DECODE_BLOCK_N,
                num_warps=DECODE_TILES["num_warps"], num_stages=DECODE_TILES["num_stages"])


def row_tiles(heads_q: int, heads_kv: int, nq: int, config: dict) -> int:
    return -(-max(1, (heads_q // heads_kv) * nq) // config["BLOCK_M"])


def decode_workspace(b, heads_q, heads_kv, nq, dv, num_splits, config, device):
    """(partial outputs, partial LSEs, counters) for `decode_triton`; counters start at 0 and are
    left at 0 by every call, so one workspace serves any number of calls on one stream."""
    tiles = b * heads_kv * row_tiles(heads_q, heads_kv, nq, config)
    if num_splits <= 1:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return empty, empty, torch.zeros(0, dtype=torch.int32, device=device)
    o_part = torch.empty(num_splits * tiles * config["BLOCK_M"] * pow2(dv), dtype=torch.float32, device=device)
    l_part = torch.empty(num_splits * tiles * config["BLOCK_M"], dtype=torch.float32, device=device)
    return o_part, l_part, torch.zeros(tiles, dtype=torch.int32, device=device)


class DecodeLaunch:
    """Everything of one decode launch that the shapes fix, computed once: grid, scalar arguments,
    compile-time constants, output strides and the workspace. A `fa2lab.decode_plan` holds one, so
    that a planned call only reads its tensors' strides and launches.

    Launch cost: Triton's `kernel[grid](...)` binds and specialises all 57 arguments on every call
    (~10-20 us of host time). After the first launch compiles the kernel, later launches whose
    tensors have the same strides and 16-byte alignment (the only things Triton specialises on
    that a plan does not fix) call the compiled kernel directly (`CompiledKernel[grid]`, bound by
    `fa2lab.kernels.launch.bind_compiled`); any other call goes through Triton's binder again.
    BIND = False turns the direct call off; a launch used once (keep=False, `decode_triton`) never
    binds, and nothing binds while a CUDA graph is captured."""

    BIND = True

    def __init__(self, q_shape, k_shape, v_shape, dtype, device, *, paged: bool, table_cols: int, scale: float,
                 left: int, right: int, num_splits: int, n_new: int, config: dict | None = None, workspace=None,
                 softcap: float = 0.0, alibi: bool = False, sinks: bool = False, keep: bool = True):
        b, hq, nq, d = q_shape
        hkv, dv = k_shape[1], v_shape[-1]
        group = hq // hkv
        self.out_shape, self.lse_shape = (b, hq, nq, dv), (b, hq, nq)
        self.dtype, self.device, self.paged = dtype, device, paged
        self.empty = b * hq * nq == 0
        cfg = dict(config or decode_config(group * nq, max(d, dv), dtype))
        splits = max(1, min(int(num_splits), MAX_SPLITS))
        self.num_splits = splits
        m_tiles = row_tiles(hq, hkv, nq, cfg)
        self.workspace = tuple(workspace) if workspace is not None else decode_workspace(
            b, hq, hkv, nq, dv, splits, cfg, device)
        capacity = table_cols * k_shape[2] if paged else k_shape[2]
        self.grid = (b * hkv * m_tiles, splits, 1)  # 3-d: a compiled kernel's launcher reads grid[2]
        out_strides = (hq * nq * dv, nq * dv, dv, 1)  # contiguous (B, Hq, Nq, Dv)
        lse_strides = (hq * nq, nq, 1)  # contiguous (B, Hq, Nq)
        cap_in, cap_out = (2.0 * scale / softcap * LOG2E, softcap * LOG2E) if softcap > 0 else (0.0, 0.0)
        self.tail = (*out_strides, *lse_strides, hkv, nq, group, n_new, capacity, k_shape[0], scale * LOG2E,
                     max(left, 0), max(right, 0), m_tiles, splits, cap_in, cap_out)
        self.alibi, self.sinks = alibi, sinks
        self.options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        self.constexprs = dict(
            D=d, D_V=dv, HEAD_DIM=pow2(d), HEAD_DIM_V=pow2(dv), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            BLOCK_S=max(2, 1 << (splits - 1).bit_length()), PAGE_SIZE=k_shape[2] if paged else 1, PAGED=paged,
            SPLIT=splits > 1, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, IEEE_DOT=ieee_dot(dtype),
            SOFTCAP=softcap > 0, HAS_ALIBI=alibi, HAS_SINKS=sinks,
            PREFETCH_PAGES=bool(paged and DECODE_OPTIONS["prefetch_pages"]))
        self.keep = keep  # False: used once (decode_triton), never bound
        self._bound = {}  # (input strides, STORE_LSE) -> (CompiledKernel[grid], constants)

    def __call__(self, q, k_cache, v_cache, seqlens, block_table=None, return_lse=True, alibi_slopes=None,
                 sinks=None):
        """-> out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) fp32 (None unless return_lse).
        alibi_slopes fp32 (B, Hq) (any strides, 0 where broadcast), sinks fp32 (Hq,) contiguous: given
        exactly when this launch was made with alibi / sinks."""
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device) if return_lse else None
        if self.empty:
            return out, lse
        bt = block_table if self.paged else seqlens
        slopes = alibi_slopes if self.alibi else seqlens  # placeholders: their flags keep them out of the code
        sink = sinks if self.sinks else seqlens
        strides = (*q.stride(), *k_cache.stride(), *v_cache.stride(), bt.stride(0) if self.paged else 0,
                   *(slopes.stride() if self.alibi else (0, 0)))
        args = (q, k_cache, v_cache, seqlens, bt, out, out if lse is None else lse, *self.workspace, slopes, sink,
                *strides, *self.tail)
        key = None
        # Triton specialises pointers on 16-byte alignment: bind only the common, all-aligned case.
        if self.BIND and self.keep and not ((q.data_ptr() | k_cache.data_ptr() | v_cache.data_ptr() | seqlens.data_ptr()
                               | bt.data_ptr() | slopes.data_ptr() | sink.data_ptr()) & 15):
            key = (strides, return_lse)  # the input strides; everything else the shapes fix
            bound = self._bound.get(key)
            if bound:
                runner, constants = bound
                try:
                    runner(*args, *constants)
                    return out, lse
                except TypeError:  # refused before launching: a calling convention of another Triton
                    self._bound[key] = None
        compiled = _decode_kernel[self.grid](*args, STORE_LSE=return_lse, **self.constexprs, **self.options)
        if key is not None and key not in self._bound and not capturing(self.device):
            self._bound[key] = bind_compiled(_decode_kernel, compiled, self.grid, len(args),
                                             dict(self.constexprs, STORE_LSE=return_lse))
        return out, lse


def decode_launch(q, k_cache, v_cache, *, scale, left, right, num_splits, block_table=None, n_new=0,
                  workspace=None, config=None, softcap=0.0, alibi=False, sinks=False, keep=True) -> DecodeLaunch:
    """The `DecodeLaunch` of these tensors' shapes."""
    return DecodeLaunch(tuple(q.shape), tuple(k_cache.shape), tuple(v_cache.shape), q.dtype, q.device,
                        paged=block_table is not None,
                        table_cols=block_table.shape[1] if block_table is not None else 0, scale=scale, left=left,
                        right=right, num_splits=num_splits, n_new=n_new, config=config, workspace=workspace,
                        softcap=softcap, alibi=alibi, sinks=sinks, keep=keep)


def decode_triton(q, k_cache, v_cache, seqlens, *, scale, left, right, num_splits, block_table=None,
                  n_new=0, workspace=None, config=None, return_lse=True, softcap=0.0, alibi_slopes=None,
                  sinks=None):
    """q (B, Hq, Nq, D); dense cache (B, Hkv, Nmax, D) or pages (P, Hkv, page, D) + block_table;
    seqlens int32 (B,): keys [0, seqlens[b] + n_new) of sequence b are attended (clamped to the
    capacity on the device) -> out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) fp32.

    No host-device sync: a call launches asynchronously and can be captured in a CUDA graph.
    workspace: from `decode_workspace` for these shapes and num_splits (None: allocated here).
    Variants (fa2lab.variants' semantics, sequence b as the dense call on its first seqlens[b] keys):
    softcap > 0, alibi_slopes fp32 (B, Hq), sinks fp32 (Hq,).
    A plan keeps the `decode_launch(...)` object instead and calls it."""
    launch = decode_launch(q, k_cache, v_cache, scale=scale, left=left, right=right, num_splits=num_splits,
                           block_table=block_table, n_new=n_new, workspace=workspace, config=config, softcap=softcap,
                           alibi=alibi_slopes is not None, sinks=sinks is not None, keep=False)
    return launch(q, k_cache, v_cache, seqlens, block_table, return_lse, alibi_slopes, sinks)


def append_kv_triton(k_cache, v_cache, k_new, v_new, seqlens, block_table=None) -> None:
    """Write k_new (B, Hkv, Nnew, D), v_new (B, Hkv, Nnew, Dv) at positions seqlens[b] + i of each
    sequence (dense or paged); positions outside [0, capacity) or on pages outside the pool are
    dropped, on the device. seqlens is not modified."""
    b, hkv, n, d = k_new.shape
    dv = v_new.shape[-1]
    if b * hkv * n == 0:
        return
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    bt = block_table if paged else seqlens
    block = min(64, max(16, 1 << (n - 1).bit_length()))
    _append_kernel[(b * hkv, triton.cdiv(n, block))](
        k_new, v_new, k_cache, v_cache, seqlens, bt, *k_new.stride(), *v_new.stride(), *k_cache.stride(),
        *v_cache.stride(), bt.stride(0) if paged else 0, hkv, n, capacity, k_cache.shape[0],
        D=d, D_V=dv, HEAD_DIM=pow2(d), HEAD_DIM_V=pow2(dv), BLOCK=block, PAGE_SIZE=k_cache.shape[2] if paged else 1,
        PAGED=paged, num_warps=4)
