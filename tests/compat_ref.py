"""A float64 oracle in flash-attn's layout and with flash-attn's definitions (bottom-right masks,
ALiBi -slope * |i + Nk - Nq - j|, soft-capping, +inf lse for rows that see no key), written from
flash-attn's tests/test_flash_attn.py, independent of fa2lab."""

from __future__ import annotations

import math

import torch


def ref_attention(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, alibi_slopes=None, scale=None,
                  upcast=True):
    """q (B, Nq, H, D), k/v (B, Nk, Hkv, D) -> out (B, Nq, H, Dv) in q's dtype, lse (B, H, Nq) float64.
    upcast=False computes in q's dtype: what plain PyTorch gets at that precision."""
    dt = torch.float64 if upcast else q.dtype
    qh, kh, vh = (t.to(dt).transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    g = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
    nq, nk = qh.shape[2], kh.shape[2]
    s = (qh @ kh.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(nq, device=q.device)[:, None] + nk - nq
    j = torch.arange(nk, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dt)
        slopes = slopes[None] if slopes.dim() == 1 else slopes  # (1 or B, H)
        s = s - slopes[:, :, None, None] * (i - j).abs().to(dt)
    left, right = window
    right = 0 if causal else right
    visible = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    s = s.masked_fill(~visible, float("-inf"))
    has_key = visible.any(-1)[:, None]  # (Nq, 1)
    p = torch.softmax(s, -1).masked_fill(~has_key, 0.0)
    lse = torch.logsumexp(s.double(), -1).masked_fill(~has_key[:, 0], float("inf"))  # flash-attn: +inf
    return (p @ vh).transpose(1, 2).to(q.dtype), lse


def ref_rotary(x, cos, sin, positions, interleaved):
    """flash_attn.layers.rotary.apply_rotary_emb, in float64: x (B, S, H, D), cos/sin
    (seqlen_ro, R/2), positions (B, S) -> x with its first R channels rotated, in x's dtype."""
    r = 2 * cos.shape[1]
    c, s = cos[positions].double()[:, :, None], sin[positions].double()[:, :, None]  # (B, S, 1, R/2)
    x64 = x.double()
    out = x64.clone()
    if interleaved:
        x1, x2 = x64[..., 0:r:2], x64[..., 1:r:2]
        out[..., 0:r:2], out[..., 1:r:2] = x1 * c - x2 * s, x1 * s + x2 * c
    else:
        x1, x2 = x64[..., : r // 2], x64[..., r // 2:r]
        out[..., : r // 2], out[..., r // 2:r] = x1 * c - x2 * s, x1 * s + x2 * c
    return out.to(x.dtype)


def err(a, b):
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
    return (a - b).masked_fill(both_inf, 0.0).abs().max().item() if a.numel() else 0.0
