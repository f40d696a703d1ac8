"""FlashAttention-2 backward (Algorithm 2 of Dao, 2023) in plain PyTorch.

Only q, k, v, O and LSE were saved. Each probability tile is recomputed from the saved LSE,
P = exp(S - LSE), so no (Nq, Nk) tensor exists here either. Key/value tiles form the outer loop
(dK_j, dV_j stay on chip), query tiles the inner one:

    D_i   = rowsum(dO_i * O_i)                    preprocessing, once ("Delta")
    P     = exp(Q_i K_j^T * scale - LSE_i)
    dV_j += P^T dO_i
    dP    = dO_i V_j^T
    dS    = P * (dP - D_i + dLSE_i)               dLSE_i is non-zero only when lse is used
    dQ_i += dS K_j * scale                        accumulated across the outer loop
    dK_j += dS^T Q_i * scale

Variants (tiled/variants.py): the tile's logits are recomputed as in the forward, dropout's mask
is regenerated from the call's seed (dV_j += (P Z)^T dO_i, dP is multiplied by Z), dS goes back
through soft-capping and score_mod to the scores, its tiles summed into dBias, and the sinks get
dL/dsink = -sum_i exp(sink - LSE_i) D_i. D_i = rowsum(dO_i * O_i) holds with dropout and sinks too.

With GQA packing (see layout.py) the rows of the G query heads that share a K/V head sit in one
tile, so dK and dV come out already summed over the group.

Fast twin: fa2lab/kernels/bwd.py. Tests: tests/test_tiled.py.
"""

from __future__ import annotations

import torch

from fa2lab import masks
from fa2lab.masks import TileState
from fa2lab.tiled.forward import NEG_INF, accum_dtype, packed_row_mask
from fa2lab.tiled.layout import pack_lse, pack_rows, unpack_rows
from fa2lab.tiled.variants import sinks_grad


def flash_backward(do, dlse, q, k, v, out, lse, *, scale, causal, window_size, block_q, block_k, variants=None,
                   bias_grad=False):
    """Gradients (dq, dk, dv, dbias, dsinks) in the dtypes of q, k, v (dbias: the bias's shape,
    when bias_grad; dsinks (Hq,) with sinks; else None). dlse may be None."""
    b, hq, nq, d = q.shape
    hkv, nk, dv_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    left, right = masks.effective_window(causal, window_size)
    acc_t = accum_dtype(q.dtype)

    q_p = pack_rows(q.to(acc_t) * scale, hkv)  # (B*Hkv, Nq*G, D), scale folded in as in forward
    do_p = pack_rows(do.to(acc_t), hkv)  # (B*Hkv, Nq*G, Dv)
    k_p = k.reshape(b * hkv, nk, d).to(acc_t)  # (B*Hkv, Nk, D)
    v_p = v.reshape(b * hkv, nk, dv_dim).to(acc_t)  # (B*Hkv, Nk, Dv)
    delta = (do_p * pack_rows(out.to(acc_t), hkv)).sum(-1)  # (B*Hkv, Nq*G)
    if dlse is not None:
        delta = delta - pack_lse(dlse.to(acc_t), hkv)
    # Rows that saw no key have lse = -inf and P = 0; +inf makes exp(S - lse) = 0 for them.
    lse_p = pack_lse(lse.to(acc_t), hkv)  # (B*Hkv, Nq*G)
    lse_p = lse_p.masked_fill(lse_p == NEG_INF, float("inf"))
    dq_p = torch.zeros_like(q_p)  # (B*Hkv, Nq*G, D)
    dk_p = torch.zeros(b * hkv, nk, d, dtype=acc_t, device=q.device)
    dv_p = torch.zeros(b * hkv, nk, dv_dim, dtype=acc_t, device=q.device)
    var = variants.var if variants is not None else None
    dbias = torch.zeros(var.attn_bias.shape, dtype=acc_t, device=q.device) if bias_grad else None

    for j0 in range(0, nk, block_k):
        j1 = min(j0 + block_k, nk)
        k_j, v_j = k_p[:, j0:j1], v_p[:, j0:j1]  # (B*Hkv, Bc, D), (B*Hkv, Bc, Dv)
        dk_j, dv_j = dk_p[:, j0:j1], dv_p[:, j0:j1]  # views: accumulate in place
        lo, hi = masks.query_range(j0, j1, nq, nk, left, right)
        for i0 in range(lo - lo % block_q, hi, block_q):
            i1 = min(i0 + block_q, nq)
            state = masks.tile_state(i0, i1, j0, j1, nq, nk, left, right)
            visible = None
            if variants is not None:
                window = (packed_row_mask(i0, i1, j0, j1, nq, nk, left, right, group, q.device)
                          if state is TileState.PARTIAL else None)
                state, visible = variants.visibility(state, window, i0 // block_q, j0 // block_k, i0, i1, j0, j1)
            if state is TileState.SKIPPED:
                continue
            rows = slice(i0 * group, i1 * group)
            q_i, do_i = q_p[:, rows], do_p[:, rows]  # (B*Hkv, Br*G, D), (B*Hkv, Br*G, Dv)
            s = torch.bmm(q_i, k_j.transpose(1, 2))  # (B*Hkv, Br*G, Bc)
            if variants is not None:
                s_scaled = s
                s, tanh = variants.logits(s, i0, i1, j0, j1)
                s = s.masked_fill(~visible, NEG_INF) if visible is not None else s.clone()
            elif state is TileState.PARTIAL:
                s.masked_fill_(~packed_row_mask(i0, i1, j0, j1, nq, nk, left, right, group, q.device), NEG_INF)
            p = s.sub_(lse_p[:, rows, None]).exp_()  # recomputed probabilities
            drop = variants.dropout_scale(i0, i1, j0, j1, acc_t) if variants is not None else None
            dv_j.baddbmm_((p if drop is None else p * drop).transpose(1, 2), do_i)
            dp = torch.bmm(do_i, v_j.transpose(1, 2))  # (B*Hkv, Br*G, Bc)
            if drop is not None:
                dp.mul_(drop)
            ds = dp.sub_(delta[:, rows, None]).mul_(p)  # dS, in place over dP
            if variants is not None:
                ds, ds_bias = variants.logits_backward(ds, s_scaled, tanh, i0, i1, j0, j1)
                if dbias is not None:
                    variants.add_bias_grad(dbias, ds_bias, i0, i1, j0, j1)
            dq_p[:, rows].baddbmm_(ds, k_j, alpha=scale)
            dk_j.baddbmm_(ds.transpose(1, 2), q_i)  # q_i carries the scale

    dq = unpack_rows(dq_p, b, hq, hkv).to(q.dtype)  # (B, Hq, Nq, D)
    dk = dk_p.view(b, hkv, nk, d).to(k.dtype)  # (B, Hkv, Nk, D)
    dv = dv_p.view(b, hkv, nk, dv_dim).to(v.dtype)  # (B, Hkv, Nk, Dv)
    dsinks = None
    if var is not None and var.sinks is not None:
        dsinks = sinks_grad(variants.sinks_packed(acc_t), lse_p.masked_fill(lse_p == float("inf"), NEG_INF), delta,
                            b, hq, hkv).to(var.sinks.dtype)
    return dq, dk, dv, dbias, dsinks
