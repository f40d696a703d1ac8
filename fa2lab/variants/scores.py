"""From scores to logits: the variants' transform of a tile of scaled scores, and its backward.

Both the naive reference (one tile: the whole (B, Hq, Nq, Nk) matrix) and the tiled FA2 (one
(B*Hkv, Br*G, Bc) GQA-packed tile at a time) call these functions with index tensors that give,
for every element of the tile, its batch b, query head h, query row i and key column j
(broadcastable, FlexAttention's `score_mod(score, b, h, q_idx, kv_idx)` convention). So the
variants have one definition, whatever the layout. `var` is always a checked
`fa2lab.variants.options.Variants` (not imported here: options imports blockmask, which imports this).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileIndex:
    """Broadcastable int64 index tensors of one tile's elements."""

    b: torch.Tensor
    h: torch.Tensor
    q: torch.Tensor
    kv: torch.Tensor


def dense_index(b: int, hq: int, i0: int, i1: int, j0: int, j1: int, device) -> TileIndex:
    """Natural layout (B, Hq, Br, Bc): the reference's whole matrix or any rectangle of it."""
    ar = lambda a, z: torch.arange(a, z, device=device)  # noqa: E731
    return TileIndex(ar(0, b).view(-1, 1, 1, 1), ar(0, hq).view(1, -1, 1, 1), ar(i0, i1).view(1, 1, -1, 1),
                     ar(j0, j1).view(1, 1, 1, -1))


def packed_index(b: int, hkv: int, group: int, i0: int, i1: int, j0: int, j1: int, device) -> TileIndex:
    """GQA-packed layout (B*Hkv, Br*G, Bc) of fa2lab.tiled: packed row r of block bh is position
    i0 + r // G of query head (bh % Hkv) * G + r % G."""
    bh = torch.arange(b * hkv, device=device)
    r = torch.arange((i1 - i0) * group, device=device)
    return TileIndex((bh // hkv).view(-1, 1, 1), ((bh % hkv)[:, None] * group + r[None, :] % group)[..., None],
                     (i0 + r // group).view(1, -1, 1), torch.arange(j0, j1, device=device).view(1, 1, -1))


def logits(s: torch.Tensor, var, idx: TileIndex, nq: int, nk: int):
    """Scaled scores s -> the variant's logits (same shape), and tanh(s / softcap) for the
    backward (None without soft-capping). Out of place: autograd (the reference) sees every step."""
    t = None
    if var.softcap > 0:
        t = torch.tanh(s / var.softcap)
        s = var.softcap * t
    if var.alibi_slopes is not None:  # -slope * |i + Nk - Nq - j|: distance to the aligned diagonal
        slope = var.alibi_slopes.to(s.dtype)[idx.b, idx.h]
        s = s - slope * (idx.q + (nk - nq) - idx.kv).abs().to(s.dtype)
    if var.attn_bias is not None:
        s = s + bias_tile(var.attn_bias, idx).to(s.dtype)
    if var.score_mod is not None:
        s = var.score_mod(s, idx.b, idx.h, idx.q, idx.kv)
    return s, t


def bias_tile(bias: torch.Tensor, idx: TileIndex) -> torch.Tensor:
    """The bias elements of a tile, read from the 4-d bias as given (a broadcast dim of size 1 is
    read at index 0): one tile-sized gather, never an Nq x Nk copy."""
    at = lambda i, d: i.clamp(max=bias.shape[d] - 1)  # noqa: E731
    return bias[at(idx.b, 0), at(idx.h, 1), at(idx.q, 2), at(idx.kv, 3)]


def mod_visible(var, idx: TileIndex) -> torch.Tensor | None:
    """mask_mod's verdict on the tile (broadcastable bool), or None without a mask_mod."""
    if var.mask_mod is None:
        return None
    keep = var.mask_mod(idx.b, idx.h, idx.q, idx.kv)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise ValueError(f"mask_mod must return a bool tensor (True = attend), got "
                         f"{getattr(keep, 'dtype', type(keep).__name__)}")
    return keep


def logits_backward(ds: torch.Tensor, s_scaled: torch.Tensor, tanh: torch.Tensor | None, var,
                    idx: TileIndex, nq: int, nk: int):
    """dL/d(logits) -> (dL/d(scaled scores), dL/d(bias elements) or None), for one tile.
    score_mod is differentiated by autograd on the tile (FlexAttention's rule: gradients reach the
    scores, not tensors the function captures); the rest by hand."""
    ds_bias = None
    if var.score_mod is not None:
        with torch.enable_grad():
            pre = _pre_mod(s_scaled, tanh, var, idx, nq, nk).detach().requires_grad_()
            out = var.score_mod(pre, idx.b, idx.h, idx.q, idx.kv)
            (ds,) = torch.autograd.grad(out, pre, ds, allow_unused=True)
        ds = torch.zeros_like(pre) if ds is None else ds
    if var.attn_bias is not None:
        ds_bias = ds
    if tanh is not None:  # d/dx softcap * tanh(x / softcap) = 1 - tanh^2
        ds = ds * (1 - tanh * tanh)
    return ds, ds_bias


def _pre_mod(s, tanh, var, idx, nq, nk):
    """The logits just before score_mod (what score_mod was called with in the forward)."""
    without = dataclasses.replace(var, sinks=None, dropout_p=0.0, generator=None, score_mod=None, mask_mod=None,
                                  block_mask=None)
    return logits(s, without, idx, nq, nk)[0]
