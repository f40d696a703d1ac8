"""Dropout on the attention probabilities without storing a mask: a counter-based hash.

Whether entry (b, h, i, j) is kept is a pure function of (seed, b, h, i, j): the backward, and a
debug call, regenerate exactly the forward's mask tile by tile, so nothing of size Nq x Nk is ever
kept. The seed is one draw from the caller's torch.Generator per call: the same generator state
gives bit-identical outputs and gradients, and successive calls draw fresh masks.

The hash (PyTorch backends) is four rounds of a 32-bit integer mixer (Chris Wellons' "lowbias32"),
written with int64 tensor arithmetic that never overflows. The Triton kernels use Triton's Philox
(fa2lab/kernels/variants.py) instead: deterministic too, but a different mask.
"""

from __future__ import annotations

import torch

from fa2lab.variants.scores import TileIndex, dense_index

M32 = 0xFFFFFFFF


def draw_seed(generator: torch.Generator | None) -> int:
    """One 62-bit seed per call from the generator (the default CPU generator when None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=device).item())


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32 in int64, split in 16-bit halves so nothing overflows."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keep_mask(seed: int, idx: TileIndex, hq: int, p: float) -> torch.Tensor:
    """Bool tile (broadcast of idx's shapes): True where the entry is kept (probability 1 - p)."""
    key = _mix((idx.b * hq + idx.h) ^ (seed & M32))
    key = _mix(key ^ ((seed >> 32) & M32))
    x = _mix(key ^ (idx.q & M32))
    x = _mix(x ^ (idx.kv & M32))
    u = (x >> 8).to(torch.float64) * 2.0 ** -24  # uniform on [0, 1) with 24 bits
    return u >= p


def dense_keep_mask(seed: int, b: int, hq: int, nq: int, nk: int, p: float, device) -> torch.Tensor:
    """The PyTorch backends' keep mask (B, Hq, Nq, Nk) bool for one seed (see fa2lab.dropout_mask)."""
    return keep_mask(seed, dense_index(b, hq, 0, nq, 0, nk, device), hq, p).expand(b, hq, nq, nk)
