"""Rotary position embeddings (RoPE) as Qwen3 and Qwen3-VL use them.

A pair of channels (c, c + D/2) of q and k is rotated by the angle position * inv_freq[c], so
q_i . k_j depends on positions only through i - j. Three variants:

    text RoPE       position_ids (B, N): one angle per (token, frequency)
    multimodal      position_ids (3, B, N) of (t, h, w): Qwen3-VL interleaves the frequencies -
                    frequency c takes its position from h if c % 3 == 1 (c < 3 * sections[1]),
                    from w if c % 3 == 2 (c < 3 * sections[2]), else from t
    vision (2-D)    Qwen3-VL's patch encoder: cos/sin per patch are computed by the vision tower
                    and applied in float32 (`apply_rotary_vision`)
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim split in halves."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, Hq, N, D), k (B, Hkv, N, D), cos/sin (B, N, D) -> rotated q, k (same shapes)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, N, D): shared by all heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def apply_rotary_vision(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Packed patches: q, k (total, H, D), cos/sin (total, D); computed in float32 like Qwen3-VL."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()  # (total, 1, D)
    qf, kf = q.float(), k.float()
    q_out = qf * cos + rotate_half(qf) * sin
    k_out = kf * cos + rotate_half(kf) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


class RotaryEmbedding(nn.Module):
    """cos, sin (B, N, D) for integer positions; plain or multimodal (`mrope_section`)."""

    def __init__(self, head_dim: int, theta: float = 10000.0, mrope_section: tuple[int, ...] | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"expected an even head_dim for RoPE (channel pairs), got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self.mrope_section = tuple(mrope_section) if mrope_section else None
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (D/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32):
        """position_ids (B, N) or, multimodal, (3, B, N) -> cos, sin (B, N, D) in `dtype`."""
        if position_ids.dim() == 2 and self.mrope_section:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)  # text tokens: t = h = w
        # float32 angles whatever the module's dtype, as transformers computes them
        inv_freq = self.inv_freq.to(position_ids.device, torch.float32)
        freqs = position_ids[..., None].float() * inv_freq  # (..., B, N, D/2)
        if self.mrope_section:
            freqs = self._interleave(freqs)  # (B, N, D/2)
        elif freqs.dim() != 3:
            raise ValueError(f"expected position_ids (B, N) for plain RoPE, got shape {tuple(position_ids.shape)}; "
                             f"(3, B, N) needs a config with mrope_section")
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, N, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _interleave(self, freqs: torch.Tensor) -> torch.Tensor:
        """(3, B, N, D/2) -> (B, N, D/2): frequency c from axis h or w where Qwen3-VL puts it."""
        out = freqs[0].clone()
        for axis in (1, 2):  # h, w
            idx = slice(axis, self.mrope_section[axis] * 3, 3)
            out[..., idx] = freqs[axis, ..., idx]
        return out
