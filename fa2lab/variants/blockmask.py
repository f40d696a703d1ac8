"""Block masks: which (query tile x key tile) blocks a mask_mod leaves empty, full or partial,
computed once and reused (FlexAttention's `create_block_mask`).

The tiled backend evaluates a mask_mod on every tile it visits and skips the tiles it leaves
empty; a `BlockMask` moves that work out of the call: empty tiles are skipped without evaluating
anything and full tiles run without a mask, only partial ones evaluate mask_mod element by element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fa2lab.masks import TileState
from fa2lab.variants.scores import dense_index

_STATES = (TileState.SKIPPED, TileState.PARTIAL, TileState.FULL)


@dataclass(frozen=True, eq=False)
class BlockMask:
    mask_mod: Callable
    batch: int
    heads: int
    q_len: int
    kv_len: int
    block_q: int  # Br of the tiles it describes (the tiled backend uses these tile sizes)
    block_k: int  # Bc
    states: torch.Tensor  # (ceil(Nq / Br), ceil(Nk / Bc)) int8: 0 empty, 1 partial, 2 full

    def state(self, q_tile: int, k_tile: int) -> TileState:
        return _STATES[int(self.states[q_tile, k_tile])]

    def grid(self) -> list[list[str]]:
        """States as strings, the layout of `TileTracer.grid()`."""
        return [[_STATES[int(x)].value for x in row] for row in self.states.tolist()]

    def sparsity(self) -> float:
        """Fraction of tiles skipped."""
        return float((self.states == 0).float().mean()) if self.states.numel() else 0.0


def create_block_mask(mask_mod: Callable, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,
                      BLOCK_SIZE: int | tuple[int, int] = 128, device="cpu") -> BlockMask:
    """Evaluate mask_mod(b, h, q_idx, kv_idx) -> bool tile by tile over (B, H, Q_LEN, KV_LEN) and
    classify each (Br x Bc) block. B or H None: the mask does not depend on it (evaluated at 0),
    as in FlexAttention. A tile is empty only if it is empty for every (b, h)."""
    if not callable(mask_mod):
        raise ValueError(f"expected mask_mod to be a function (b, h, q_idx, kv_idx) -> bool tensor, got {mask_mod!r}")
    bq, bk = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    if bq < 1 or bk < 1 or Q_LEN < 0 or KV_LEN < 0:
        raise ValueError(f"expected positive BLOCK_SIZE and lengths >= 0, got BLOCK_SIZE={BLOCK_SIZE}, "
                         f"Q_LEN={Q_LEN}, KV_LEN={KV_LEN}")
    b, h = B or 1, H or 1
    nqt, nkt = -(-Q_LEN // bq), -(-KV_LEN // bk)
    states = torch.zeros(nqt, nkt, dtype=torch.int8)
    for qt in range(nqt):
        i0, i1 = qt * bq, min(Q_LEN, (qt + 1) * bq)
        for kt in range(nkt):
            j0, j1 = kt * bk, min(KV_LEN, (kt + 1) * bk)
            idx = dense_index(b, h, i0, i1, j0, j1, device)
            keep = mask_mod(idx.b, idx.h, idx.q, idx.kv).expand(b, h, i1 - i0, j1 - j0)
            states[qt, kt] = 2 if bool(keep.all()) else 1 if bool(keep.any()) else 0
    return BlockMask(mask_mod, b, h, Q_LEN, KV_LEN, bq, bk, states)
