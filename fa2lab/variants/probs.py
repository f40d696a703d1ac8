"""`attention_probs`: the attention probabilities P of chosen query rows, recomputed tile by tile.

FlashAttention never forms P, so it cannot return it; but P is what a researcher inspects (which
keys a head attends to, how a sink or ALiBi moves mass). Given the rows' log-sum-exp (from
`attention(..., return_lse=True)`, or computed here in a first pass over the keys), each key tile's
probabilities are exp(S - lse) - the backward pass's recomputation - written straight into the
(B, Hq, R, Nk) result. Only that result has Nk columns; nothing Nq x Nk is formed for rows not asked for.
"""

from __future__ import annotations

import torch

from fa2lab import _checks
from fa2lab.variants import dropout as _dropout
from fa2lab.variants.options import check_variants
from fa2lab.variants.scores import TileIndex, logits, mod_visible

MAX_PROBS_BYTES = 1 << 30  # refuse larger results unless allow_large=True
BLOCK_K = 256


def attention_probs(q, k, *, lse=None, rows=None, causal=False, window_size=(-1, -1), softmax_scale=None,
                    softcap=0.0, alibi_slopes=None, attn_bias=None, sinks=None, dropout_p=0.0, generator=None,
                    score_mod=None, mask_mod=None, block_mask=None, allow_large=False):
    """P (B, Hq, R, Nk) float32 (float64 for float64 inputs) for query rows `rows` (ints in [0, Nq),
    a list or 1-D tensor; None: all Nq rows), with the options of `fa2lab.attention`.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D); lse (B, Hq, Nq) of the same call, or None to compute it.
    Each row sums to 1 (to 1 - exp(sinks[h] - lse) with sinks: the sink's share; to 0 for a row that
    sees no key). With dropout_p > 0 it is the dropped and rescaled P that multiplies V in the
    call that gets the same generator state. Refuses results over 1 GiB unless allow_large=True.
    """
    _checks.check_tensor("q", q, 4, "(B, Hq, Nq, D)")
    _checks.check_tensor("k", k, 4, "(B, Hkv, Nk, D)")
    _checks.check_same_dtype_device(q=q, k=k)
    _checks.check_head_dims(q.shape[-1], k.shape[-1])
    _checks.check_heads(q.shape[1], k.shape[1], k.shape[1])
    left, right = _window(causal, _checks.check_window(window_size))
    scale = _checks.resolve_scale(softmax_scale, q.shape[-1])
    var = check_variants(q, k, softcap=softcap, alibi_slopes=alibi_slopes, attn_bias=attn_bias, sinks=sinks,
                         dropout_p=dropout_p, generator=generator, score_mod=score_mod, mask_mod=mask_mod,
                         block_mask=block_mask)
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    rows = _check_rows(rows, nq, q.device)  # (R,)
    acc_t = torch.float64 if q.dtype == torch.float64 else torch.float32
    size = b * hq * rows.numel() * nk * torch.finfo(acc_t).bits // 8
    if size > MAX_PROBS_BYTES and not allow_large:
        raise ValueError(f"attention_probs would return B*Hq*R*Nk = {b}*{hq}*{rows.numel()}*{nk} values "
                         f"({size / 2 ** 30:.2f} GiB > {MAX_PROBS_BYTES / 2 ** 30:.0f} GiB); ask for fewer rows "
                         f"(rows=[...]) or pass allow_large=True")
    if lse is not None:
        if not isinstance(lse, torch.Tensor) or lse.shape != (b, hq, nq):
            raise ValueError(f"expected lse of shape (B, Hq, Nq) = ({b}, {hq}, {nq}) from attention(..., "
                             f"return_lse=True), got {getattr(lse, 'shape', lse)}")
        lse = lse[:, :, rows].to(acc_t)  # (B, Hq, R)
    seed = _dropout.draw_seed(var.generator) if var.dropout_p > 0 else 0
    q_r = q[:, :, rows].to(acc_t) * scale  # (B, Hq, R, D)
    group = hq // hkv

    def tiles():
        for j0 in range(0, nk, BLOCK_K):
            j1 = min(nk, j0 + BLOCK_K)
            k_j = k[:, :, j0:j1].to(acc_t).repeat_interleave(group, dim=1)  # (B, Hq, Bc, D)
            idx = TileIndex(torch.arange(b, device=q.device).view(-1, 1, 1, 1),
                            torch.arange(hq, device=q.device).view(1, -1, 1, 1), rows.view(1, 1, -1, 1),
                            torch.arange(j0, j1, device=q.device).view(1, 1, 1, -1))
            s = q_r @ k_j.transpose(-1, -2)  # (B, Hq, R, Bc)
            s = logits(s, var, idx, nq, nk)[0] if var.any else s
            visible = _visible(idx, nq, nk, left, right)
            keep = mod_visible(var, idx)
            visible = visible if keep is None else visible & keep
            yield j0, j1, idx, s.masked_fill(~visible, float("-inf"))

    if lse is None:  # first pass: each row's log-sum-exp over all key tiles (and the sink)
        lse = torch.full((b, hq, rows.numel()), float("-inf"), dtype=acc_t, device=q.device)
        for _, _, _, s in tiles():
            lse = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))
        if var.sinks is not None:
            lse = torch.logaddexp(lse, var.sinks.to(acc_t).view(1, hq, 1))
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # rows without keys: P = 0
    probs = torch.empty(b, hq, rows.numel(), nk, dtype=acc_t, device=q.device)
    for j0, j1, idx, s in tiles():
        p = torch.exp(s - lse[..., None])
        if var.dropout_p > 0:
            p = p * _dropout.keep_mask(seed, idx, hq, var.dropout_p).to(acc_t) / (1 - var.dropout_p)
        probs[..., j0:j1] = p
    return probs


def _window(causal, window_size):
    from fa2lab.masks import effective_window

    return effective_window(causal, window_size)


def _visible(idx, nq, nk, left, right):
    """Causal / window visibility of (rows, keys): the rule of fa2lab.masks on index tensors."""
    pos = idx.q + (nk - nq)
    visible = torch.ones_like(pos - idx.kv, dtype=torch.bool)
    if left >= 0:
        visible = visible & (idx.kv >= pos - left)
    if right >= 0:
        visible = visible & (idx.kv <= pos + right)
    return visible


def _check_rows(rows, nq, device):
    if rows is None:
        return torch.arange(nq, device=device)
    rows_t = torch.as_tensor(rows, device=device)
    if rows_t.dim() != 1 or rows_t.dtype not in (torch.int32, torch.int64) or rows_t.numel() == 0:
        raise ValueError(f"expected rows to be a non-empty list or 1-D int tensor of query rows, got {rows!r}")
    bad = rows_t[(rows_t < 0) | (rows_t >= nq)]
    if bad.numel():
        raise ValueError(f"rows must lie in [0, Nq) = [0, {nq}), got {bad.tolist()[:5]}")
    return rows_t.long()
