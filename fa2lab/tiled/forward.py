"""FlashAttention-2 forward (Algorithm 1 of Dao, 2023) in plain PyTorch.

For each query tile Q_i (Br rows) the key/value tiles K_j, V_j (Bc rows) stream past once, and an
online softmax keeps per row a running max m_i, a running sum l_i and an unnormalised output acc:

    S    = Q_i K_j^T * scale                         (Br, Bc) - the only score tile in memory
    m'   = max(m_i, rowmax(S))
    P    = exp(S - m')                               unnormalised probabilities of this tile
    l_i  = exp(m_i - m') l_i + rowsum(P)             rescale the old sum, add the new one
    acc  = exp(m_i - m') acc + P V_j                 rescale the old output (line 10)
    O_i  = acc / l_i,  LSE_i = m_i + log(l_i)        once, after the last tile (lines 12-13)

Tiles that the causal / window mask leaves empty are never visited; fully visible tiles are
computed without a mask; only tiles that straddle a mask edge are masked element by element.
All heads of the batch go through each step together (one bmm), GQA groups packed as rows.
Attention variants (`fa2lab.variants`) change S before the online softmax (soft-capping, ALiBi,
bias, score_mod; mask_mod skips the tiles it leaves empty), scale P by the dropout mask before
P V_j (l_i sums the undropped P) and add the sinks to l_i after the last tile (tiled/variants.py).

Fast twin: fa2lab/kernels/fwd.py. Tests: tests/test_tiled.py, tests/test_properties.py.
"""

from __future__ import annotations

import torch

from fa2lab import masks
from fa2lab.masks import TileState
from fa2lab.tiled.layout import pack_rows, unpack_lse, unpack_rows
from fa2lab.tiled.softmax import online_softmax_step
from fa2lab.tiled.variants import apply_sinks

NEG_INF = float("-inf")


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp16/bf16/fp32; float64 stays float64 (the oracle's precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def packed_row_mask(i0, i1, j0, j1, nq, nk, left, right, group, device) -> torch.Tensor:
    """Tile mask for GQA-packed rows: (Br*G, Bc), each position's row repeated G times."""
    mask = masks.tile_mask(i0, i1, j0, j1, nq, nk, left, right, device=device)  # (Br, Bc)
    return mask.repeat_interleave(group, dim=0) if group > 1 else mask


def flash_forward(q, k, v, *, scale, causal, window_size, block_q, block_k, tracer=None, variants=None):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv)
    -> out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) in the accumulation dtype.
    variants: a `fa2lab.tiled.variants.TileVariants` or None (plain FA2)."""
    b, hq, nq, _ = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    left, right = masks.effective_window(causal, window_size)
    acc_t = accum_dtype(q.dtype)

    # One O(N) copy each: upcast, fold the scale into Q, pack GQA groups as rows.
    q_p = pack_rows(q.to(acc_t) * scale, hkv)  # (B*Hkv, Nq*G, D)
    k_p = k.reshape(b * hkv, nk, k.shape[-1]).to(acc_t)  # (B*Hkv, Nk, D)
    v_p = v.reshape(b * hkv, nk, dv).to(acc_t)  # (B*Hkv, Nk, Dv)
    out_p = torch.empty(b * hkv, nq * group, dv, dtype=acc_t, device=q.device)
    lse_p = torch.empty(b * hkv, nq * group, dtype=acc_t, device=q.device)
    if tracer is not None:
        tracer.start(nq, nk, block_q, block_k)

    for qt, i0 in enumerate(range(0, nq, block_q)):
        i1 = min(i0 + block_q, nq)
        rows = slice(i0 * group, i1 * group)
        q_i = q_p[:, rows]  # (B*Hkv, Br*G, D)
        m_i = torch.full((b * hkv, (i1 - i0) * group, 1), NEG_INF, dtype=acc_t, device=q.device)
        l_i = torch.zeros_like(m_i)  # (B*Hkv, Br*G, 1)
        acc = torch.zeros(b * hkv, (i1 - i0) * group, dv, dtype=acc_t, device=q.device)
        lo, hi = masks.key_range(i0, i1, nq, nk, left, right)

        for kt, j0 in enumerate(range(0, nk, block_k)):
            j1 = min(j0 + block_k, nk)
            state = masks.tile_state(i0, i1, j0, j1, nq, nk, left, right) if j0 < hi and j1 > lo else TileState.SKIPPED
            visible = None
            if variants is not None:
                window = (packed_row_mask(i0, i1, j0, j1, nq, nk, left, right, group, q.device)
                          if state is TileState.PARTIAL else None)
                state, visible = variants.visibility(state, window, qt, kt, i0, i1, j0, j1)
            if state is TileState.SKIPPED:
                if tracer is not None:
                    tracer.record(qt, kt, (i0, i1), (j0, j1), state.value)
                continue
            s = torch.bmm(q_i, k_p[:, j0:j1].transpose(1, 2))  # (B*Hkv, Br*G, Bc)
            if variants is not None:
                s = variants.logits(s, i0, i1, j0, j1)[0]
                if visible is not None:
                    s = s.masked_fill(~visible, NEG_INF)
            elif state is TileState.PARTIAL:
                s.masked_fill_(~packed_row_mask(i0, i1, j0, j1, nq, nk, left, right, group, q.device), NEG_INF)
            drop = variants.dropout_scale(i0, i1, j0, j1, acc_t) if variants is not None else None
            m_i, l_i, acc, _ = online_softmax_step(s, m_i, l_i, acc, v_p[:, j0:j1], drop)  # acc (B*Hkv, Br*G, Dv)
            if tracer is not None:
                tracer.record(qt, kt, (i0, i1), (j0, j1), state.value,
                              unpack_lse(m_i.squeeze(-1), b, hq, hkv) if tracer.record_stats else None,
                              unpack_lse(l_i.squeeze(-1), b, hq, hkv) if tracer.record_stats else None)

        # Lines 12-13: normalise once; rows that saw no key give 0 and lse = -inf.
        empty = l_i == 0
        out_p[:, rows] = acc / l_i.masked_fill(empty, 1.0)
        lse_p[:, rows] = (m_i + l_i.log()).masked_fill(empty, NEG_INF).squeeze(-1)

    if variants is not None and variants.var.sinks is not None:
        out_p, lse_p = apply_sinks(out_p, lse_p, variants.sinks_packed(acc_t))
    out = unpack_rows(out_p, b, hq, hkv).to(q.dtype)  # (B, Hq, Nq, Dv)
    return out, unpack_lse(lse_p, b, hq, hkv)  # (B, Hq, Nq)
