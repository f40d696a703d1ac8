"""GQA packing: the G query heads that share one K/V head become extra rows of one tile.

(B, Hq, N, D) -> (B*Hkv, N*G, D), row r holding position r // G of query head r % G of its group.
A query tile of Br positions is then the contiguous row block [i0*G, i1*G), and each K/V tile is
read once for all G heads (the packing FlashAttention and FlashInfer use for GQA decode). For
G == 1 packing is a free view.
"""

from __future__ import annotations

import torch


def pack_rows(x: torch.Tensor, hkv: int) -> torch.Tensor:
    b, hq, n, d = x.shape
    g = hq // hkv
    x = x.view(b, hkv, g, n, d).permute(0, 1, 3, 2, 4)  # (B, Hkv, N, G, D)
    return x.reshape(b * hkv, n * g, d)


def unpack_rows(xp: torch.Tensor, b: int, hq: int, hkv: int) -> torch.Tensor:
    g = hq // hkv
    n, d = xp.shape[1] // g, xp.shape[-1]
    x = xp.view(b, hkv, n, g, d).permute(0, 1, 3, 2, 4)  # (B, Hkv, G, N, D)
    return x.reshape(b, hq, n, d)


def pack_lse(lse: torch.Tensor, hkv: int) -> torch.Tensor:
    b, hq, n = lse.shape
    return lse.view(b, hkv, hq // hkv, n).permute(0, 1, 3, 2).reshape(b * hkv, n * (hq // hkv))


def unpack_lse(lsep: torch.Tensor, b: int, hq: int, hkv: int) -> torch.Tensor:
    return unpack_rows(lsep.unsqueeze(-1), b, hq, hkv).squeeze(-1)
