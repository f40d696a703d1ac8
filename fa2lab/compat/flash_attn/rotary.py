"""Rotary embeddings as flash_attn_with_kvcache applies them (flash_attn.layers.rotary semantics).

cos, sin: (seqlen_ro, R / 2); the first R channels of each head are rotated, the rest pass
through. Token s of sequence b takes angle row positions[b, s]. Pairs of channels:

    rotary_interleaved=True    (0, 1), (2, 3), ...            GPT-J style
    rotary_interleaved=False   (c, c + R/2) for c < R/2        GPT-NeoX style, as fa2lab.models

Computed in float32 (float64 for float64) and rounded once, as flash-attn's rotary kernel does.
"""

from __future__ import annotations

import torch

from fa2lab.models.rotary import rotate_half


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the interleaved partner of each channel."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """x (B, S, H, D), cos/sin (seqlen_ro, R/2), positions (B, S) long -> x rotated (same shape and dtype)."""
    r = 2 * cos.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    c, s = cos[positions].to(acc), sin[positions].to(acc)  # (B, S, R/2)
    if interleaved:
        c, s = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)  # (B, S, R): c0 c0 c1 c1 ...
        turn = rotate_every_two
    else:
        c, s = torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)  # (B, S, R): c0 c1 ... c0 c1 ...
        turn = rotate_half
    c, s = c.unsqueeze(2), s.unsqueeze(2)  # (B, S, 1, R): shared by every head
    xr = x[..., :r].to(acc)
    rotated = (xr * c + turn(xr) * s).to(x.dtype)
    return torch.cat((rotated, x[..., r:]), dim=-1) if r < x.shape[-1] else rotated
