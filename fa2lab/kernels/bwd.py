"""FA2 backward in Triton (Algorithm 2): dK/dV and dQ kernels, P recomputed from the saved LSE.

dK/dV: one program per (key block, batch x K/V head); it loops over the G query heads that share
the K/V head and over the query blocks that can see its keys, so GQA gradients are summed in
registers, without atomics or a per-query-head copy. dQ: one program per (query block, batch x
query head), looping over visible key blocks. Delta = rowsum(dO * O) - dLSE is precomputed.
Everything in the log2 domain as in the forward kernel. Variants (kernels/variants.py) recompute
the forward's logits and dropout mask; dS goes back through soft-capping (times 1 - tanh^2); ALiBi
and the bias are constants here (no bias.grad), the sinks' gradient is an O(N) sum in PyTorch.

Readable twin: fa2lab/tiled/backward.py. Tests: tests/test_triton.py, tests/test_triton_gpu.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fa2lab.kernels.common import LOG2E, LOG2E_K, dot, ieee_dot, pow2, seq_offsets
from fa2lab.kernels.variants import PLAIN_FLAGS, _dropout_keep, _variant_logits, plain_args


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DKEY, DVAL, CU_Q, CU_K,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    slb, slh, slm, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    HKV, Nq, Nk, G, qk_scale, sm_scale, LEFT, RIGHT,
    ALIBI, BIAS, SINKS, sab, sah, sbb, sbh, sbm, sbn, cap_in, cap_out, dropout_p, seed,
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, IS_VARLEN: tl.constexpr, IEEE_DOT: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    q_start, nq, k_start, nk = seq_offsets(CU_Q, CU_K, b, Nq, Nk, IS_VARLEN)
    j0 = pid_n * BLOCK_N
    if j0 >= nk:
        return
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
    cols = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k = tl.load(K + bk + hk * skh + cols[:, None] * skn + offs_d[None, :] * skd,
                mask=(cols[:, None] < nk) & (offs_d[None, :] < D), other=0.0)  # (BLOCK_N, HEAD_DIM)
    v = tl.load(V + bv + hk * svh + cols[:, None] * svn + offs_dv[None, :] * svd,
                mask=(cols[:, None] < nk) & (offs_dv[None, :] < DV), other=0.0)  # (BLOCK_N, HEAD_DIM_V)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype=tl.float32)

    off = nk - nq
    lo = 0
    hi = nq
    if HAS_RIGHT:  # rows that see at least one key of [j0, j0 + BLOCK_N)
        lo = tl.maximum(0, j0 - off - RIGHT)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(nq, tl.minimum(j0 + BLOCK_N, nk) - 1 - off + LEFT + 1)
    for g in range(0, G):
        h = hk * G + g
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(ALIBI + b * sab + h * sah) * LOG2E_K
        bias_base = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = rows < nq
            q = tl.load(Q + bq + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd,
                        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_M, HEAD_DIM)
            do = tl.load(DO + bdo + h * sdoh + rows[:, None] * sdom + offs_dv[None, :] * sdod,
                         mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # (BLOCK_M, HEAD_DIM_V)
            lse2 = tl.load(LSE + bl + h * slh + rows * slm, mask=row_ok, other=float("inf")) * LOG2E_K
            lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows with no key: P = 0
            delta = tl.load(DELTA + bl + h * slh + rows * slm, mask=row_ok, other=0.0)
            valid = (cols[:, None] < nk) & row_ok[None, :]
            s_t, t_t = _variant_logits(dot(k, tl.trans(q), IEEE_DOT), rows[None, :], cols[:, None], valid, nq, nk,
                                       qk_scale, cap_in, cap_out, slope2, bias_base, sbm, sbn, SOFTCAP, HAS_ALIBI,
                                       HAS_BIAS)  # (BLOCK_N, BLOCK_M) = S^T
            if HAS_LEFT:
                valid = valid & (cols[:, None] >= rows[None, :] + off - LEFT)
            if HAS_RIGHT:
                valid = valid & (cols[:, None] <= rows[None, :] + off + RIGHT)
            p_t = tl.where(valid, tl.math.exp2(s_t - lse2[None, :]), 0.0)  # P^T
            dp_t = dot(v, tl.trans(do), IEEE_DOT)  # (BLOCK_N, BLOCK_M) = dP^T
            if HAS_DROPOUT:  # the forward's mask, regenerated: dV += (P Z)^T dO, dP *= Z
                keep = _dropout_keep(seed, b * (HKV * G) + h, rows[None, :], cols[:, None], nq, nk, dropout_p)
                dv += dot(tl.where(keep, p_t / (1.0 - dropout_p), 0.0).to(do.dtype), do, IEEE_DOT)
                dp_t = tl.where(keep, dp_t / (1.0 - dropout_p), 0.0)
            else:
                dv += dot(p_t.to(do.dtype), do, IEEE_DOT)
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:  # back through softcap * tanh(x / softcap): times 1 - tanh^2
                ds_t = ds_t * (1.0 - t_t * t_t)
            dk += dot(ds_t.to(q.dtype), q, IEEE_DOT)
    dk = dk * sm_scale
    tl.store(DKEY + bdk + hk * sdkh + cols[:, None] * sdkn + offs_d[None, :] * sdkd, dk.to(DKEY.dtype.element_ty),
             mask=(cols[:, None] < nk) & (offs_d[None, :] < D))
    tl.store(DVAL + bdv + hk * sdvh + cols[:, None] * sdvn + offs_dv[None, :] * sdvd, dv.to(DVAL.dtype.element_ty),
             mask=(cols[:, None] < nk) & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    slb, slh, slm, sdqb, sdqh, sdqm, sdqd,
    H, Nq, Nk, G, qk_scale, sm_scale, LEFT, RIGHT,
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
    hk = h // G
    q_start, nq, k_start, nk = seq_offsets(CU_Q, CU_K, b, Nq, Nk, IS_VARLEN)
    i0 = pid_m * BLOCK_M
    if i0 >= nq:
        return
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
    rows = i0 + tl.arange(0, BLOCK_M)
    row_ok = rows < nq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q = tl.load(Q + bq + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + bdo + h * sdoh + rows[:, None] * sdom + offs_dv[None, :] * sdod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse2 = tl.load(LSE + bl + h * slh + rows * slm, mask=row_ok, other=float("inf")) * LOG2E_K
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(DELTA + bl + h * slh + rows * slm, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + b * sab + h * sah) * LOG2E_K
    bias_base = BIAS + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh

    off = nk - nq
    lo = 0
    hi = nk
    if HAS_LEFT:
        lo = tl.maximum(0, i0 + off - LEFT)
        lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(nk, tl.minimum(i0 + BLOCK_M, nq) - 1 + off + RIGHT + 1)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K + bk + hk * skh + cols[:, None] * skn + offs_d[None, :] * skd,
                    mask=(cols[:, None] < nk) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + bv + hk * svh + cols[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(cols[:, None] < nk) & (offs_dv[None, :] < DV), other=0.0)
        valid = (cols[None, :] < nk) & row_ok[:, None]
        s, t = _variant_logits(dot(q, tl.trans(k), IEEE_DOT), rows[:, None], cols[None, :], valid, nq, nk, qk_scale,
                               cap_in, cap_out, slope2, bias_base, sbm, sbn, SOFTCAP, HAS_ALIBI,
                               HAS_BIAS)  # (BLOCK_M, BLOCK_N)
        if HAS_LEFT:
            valid = valid & (cols[None, :] >= rows[:, None] + off - LEFT)
        if HAS_RIGHT:
            valid = valid & (cols[None, :] <= rows[:, None] + off + RIGHT)
        p = tl.where(valid, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = dot(do, tl.trans(v), IEEE_DOT)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, pid_bh, rows[:, None], cols[None, :], nq, nk, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += dot(ds.to(k.dtype), k, IEEE_DOT)
    dq = dq * sm_scale
    tl.store(DQ + bdq + h * sdqh + rows[:, None] * sdqm + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, so_b, so_h, so_m, so_d, sdo_b, sdo_h, sdo_m, sdo_d, sd_b, sd_h, sd_m,
                           H, N, DV: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta = rowsum(dO * O) in fp32, one (BLOCK_M rows, head) tile per program: FA2's backward
    preprocess, without the fp32 copies of dO and O that an eager upcast would allocate."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_V)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < DV)
    o = tl.load(O + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d, mask=mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_m + offs_d[None, :] * sdo_d, mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + b * sd_b + h * sd_h + offs_m * sd_m, delta, mask=offs_m < N)


def _delta(do, out, varlen: bool) -> torch.Tensor:
    """rowsum(dO * O) in fp32: (B, Hq, Nq) dense, (Hq, total_q) varlen (lse's layouts)."""
    if varlen:  # (total_q, Hq, Dv): one "batch" of total_q rows per head
        total, h, dv = out.shape
        delta = torch.empty(h, total, dtype=torch.float32, device=out.device)
        st = lambda t: (0, t.stride(1), t.stride(0), t.stride(2))  # noqa: E731
        sd, batch, n = (0, delta.stride(0), delta.stride(1)), 1, total
    else:
        batch, h, n, dv = out.shape
        delta = torch.empty(batch, h, n, dtype=torch.float32, device=out.device)
        st = lambda t: t.stride()  # noqa: E731
        sd = delta.stride()
    if delta.numel():
        block = 64 if dv <= 128 else 32
        _bwd_preprocess_kernel[(triton.cdiv(n, block), batch * h)](
            out, do, delta, *st(out), *st(do), *sd, h, n, DV=dv, HEAD_DIM_V=pow2(dv), BLOCK_M=block)
    return delta


def bwd_config(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Per-kernel tiles (BLOCK_M, BLOCK_N, num_warps, num_stages): dK/dV keeps BLOCK_N key rows and
    steps through queries, dQ the reverse. From `python -m fa2lab.bench.tune_gpu` on the H100
    (2026-11-22, bf16, N=4096): D=128 346 / 273 (causal) TFLOP/s, D=64 294; (64, 64) tiles gave 150-160."""
    if dtype == torch.float32:  # 4-byte tiles: keep shared memory within the 227 KB of an H100
        return dict(dkdv=(32, 64, 4, 1), dq=(64, 32, 4, 1))
    if head_dim <= 64:
        return dict(dkdv=(32, 128, 4, 3), dq=(128, 32, 4, 3))
    if head_dim <= 128:
        return dict(dkdv=(64, 128, 8, 3), dq=(128, 64, 8, 3))
    # Head dim 256: with 4 warps the 64 x 256 fp32 dK and dV accumulators need 256 registers a
    # thread and spill; 8 warps halve that. H200, 2026-12-02 (python -m fa2lab.bench.hopper_sweep,
    # bf16, N=4096): 146 TFLOP/s against 99 with 4 warps.
    return dict(dkdv=(32, 64, 8, 2), dq=(64, 32, 8, 2))


def flash_bwd_triton(do, dlse, q, k, v, out, lse, *, scale, left, right, cu_q=None, cu_k=None, max_q=0, max_k=0,
                     config=None, variants=None, deterministic=False):
    """Dense: q (B, Hq, Nq, D) etc., lse (B, Hq, Nq). Varlen (cu_q given): q (total_q, Hq, D),
    lse (Hq, total_q). Returns dq, dk, dv in the dtypes and layouts of q, k, v; with variants
    (dense only, a kernels.variants.KernelVariants) also dsinks (Hq,) or None. deterministic: taken
    as hopper_bwd takes it; these two passes add nothing in a run-dependent order, so always are."""
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
    cfg = dict(config or bwd_config(max(d, dvd), q.dtype))
    if variants is not None and variants.var.attn_bias is not None and config is None:  # see fwd._launch
        cfg = {name: (*tiles[:3], min(tiles[3], 2)) for name, tiles in cfg.items()}
    if varlen:
        batch, h, hkv = cu_q.numel() - 1, q.shape[1], k.shape[1]
        nq = nk = 0
        st = lambda t: (0, t.stride(1), t.stride(0), t.stride(2))  # noqa: E731 (token-major layout)
        sl = (0, lse.stride(0), lse.stride(1))
        grid_q, grid_k = max_q, max_k
    else:
        batch, h, nq, _ = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        st = lambda t: t.stride()  # noqa: E731
        sl = lse.stride()
        grid_q, grid_k = nq, nk
        cu_q = cu_k = torch.zeros(1, dtype=torch.int32, device=q.device)
    common = dict(D=d, DV=dvd, HEAD_DIM=pow2(d), HEAD_DIM_V=pow2(dvd), HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
                  IS_VARLEN=varlen, IEEE_DOT=ieee_dot(q.dtype), **(variants.flags() if variants else PLAIN_FLAGS))
    var_args = variants.args() if variants else plain_args(q)
    group = h // hkv
    bm, bn, warps, stages = cfg["dkdv"]
    _bwd_dkdv_kernel[(triton.cdiv(grid_k, bn), batch * hkv)](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, *st(q), *st(k), *st(v), *st(do), *sl, *st(dk), *st(dv),
        hkv, nq, nk, group, scale * LOG2E, scale, max(left, 0), max(right, 0), *var_args, **common,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    bm, bn, warps, stages = cfg["dq"]
    _bwd_dq_kernel[(triton.cdiv(grid_q, bm), batch * h)](
        q, k, v, do, lse, delta, dq, cu_q, cu_k, *st(q), *st(k), *st(v), *st(do), *sl, *st(dq),
        h, nq, nk, group, scale * LOG2E, scale, max(left, 0), max(right, 0), *var_args, **common,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return (dq, dk, dv) if variants is None else (dq, dk, dv, dsinks)
