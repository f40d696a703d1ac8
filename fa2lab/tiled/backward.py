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


def flash_backward(do, dlse, q, k, v, out, lse, *, scale, causal, window_size, block_q, block_k):
    """Gradients (dq, dk, dv) in the dtypes of q, k, v. dlse may be None."""
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

    for j0 in range(0, nk, block_k):
        j1 = min(j0 + block_k, nk)
        k_j, v_j = k_p[:, j0:j1], v_p[:, j0:j1]  # (B*Hkv, Bc, D), (B*Hkv, Bc, Dv)
        dk_j, dv_j = dk_p[:, j0:j1], dv_p[:, j0:j1]  # views: accumulate in place
        lo, hi = masks.query_range(j0, j1, nq, nk, left, right)
        for i0 in range(lo - lo % block_q, hi, block_q):
            i1 = min(i0 + block_q, nq)
            state = masks.tile_state(i0, i1, j0, j1, nq, nk, left, right)
            if state is TileState.SKIPPED:
                continue
            rows = slice(i0 * group, i1 * group)
            q_i, do_i = q_p[:, rows], do_p[:, rows]  # (B*Hkv, Br*G, D), (B*Hkv, Br*G, Dv)
            s = torch.bmm(q_i, k_j.transpose(1, 2))  # (B*Hkv, Br*G, Bc)
            if state is TileState.PARTIAL:
                s.masked_fill_(~packed_row_mask(i0, i1, j0, j1, nq, nk, left, right, group, q.device), NEG_INF)
            p = s.sub_(lse_p[:, rows, None]).exp_()  # recomputed probabilities
            dv_j.baddbmm_(p.transpose(1, 2), do_i)
            dp = torch.bmm(do_i, v_j.transpose(1, 2))  # (B*Hkv, Br*G, Bc)
            ds = dp.sub_(delta[:, rows, None]).mul_(p)  # dS, in place over dP
            dq_p[:, rows].baddbmm_(ds, k_j, alpha=scale)
            dk_j.baddbmm_(ds.transpose(1, 2), q_i)  # q_i carries the scale

    dq = unpack_rows(dq_p, b, hq, hkv).to(q.dtype)  # (B, Hq, Nq, D)
    dk = dk_p.view(b, hkv, nk, d).to(k.dtype)  # (B, Hkv, Nk, D)
    dv = dv_p.view(b, hkv, nk, dv_dim).to(v.dtype)  # (B, Hkv, Nk, Dv)
    return dq, dk, dv
