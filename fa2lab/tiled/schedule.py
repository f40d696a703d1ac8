"""The tile schedule of the FA2 forward, counted without running it.

`tile_schedule` walks the (query tile x key tile) grid exactly as fa2lab/tiled/forward.py does
(the same `masks.key_range` shortcut and `masks.tile_state` test), so its counts equal what a
`TileTracer` records; tests/test_cost.py checks that. Counts are per (batch, head): multiply by
B*Hq for a whole call.

    visible_elements    (query, key) pairs the mask lets through: the useful work
    computed_elements   Br*Bc summed over computed tiles: the work a tiled kernel does
                        (partial tiles are computed whole, then masked)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fa2lab import masks


@dataclass(frozen=True)
class Schedule:
    nq: int
    nk: int
    block_q: int  # Br
    block_k: int  # Bc
    window: tuple[int, int]  # (left, right) after folding causal in; -1 unbounded
    full: int  # computed without a mask
    partial: int  # computed, then masked
    skipped: int  # never visited
    computed_elements: int  # sum of Br_i * Bc_j over full + partial tiles
    partial_elements: int  # sum of Br_i * Bc_j over partial tiles: the ones masked element by element
    kv_rows: int  # sum of Bc_j over computed tiles: K/V rows streamed by the FA2 forward
    q_rows: int  # sum of Br_i over computed tiles: Q/O rows touched by FA1 and the FA2 backward
    visible_elements: int  # exact count of visible (query, key) pairs

    @property
    def computed(self) -> int:
        return self.full + self.partial

    @property
    def q_tiles(self) -> int:
        return math.ceil(self.nq / self.block_q)

    @property
    def k_tiles(self) -> int:
        return math.ceil(self.nk / self.block_k)

    def counts(self) -> dict[str, int]:
        """Same keys as TileTracer.counts()."""
        return {"full": self.full, "partial": self.partial, "skipped": self.skipped}


def tile_schedule(nq: int, nk: int, block_q: int, block_k: int, causal: bool = False,
                  window_size: tuple[int, int] = (-1, -1)) -> Schedule:
    """Counts of the FA2 forward's tile grid for one (batch, head)."""
    for name, v in (("nq", nq), ("nk", nk), ("block_q", block_q), ("block_k", block_k)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"expected {name} to be a positive int, got {v!r}")
    left, right = masks.effective_window(causal, window_size)
    n_kt = math.ceil(nk / block_k)
    full = partial = computed_el = partial_el = kv_rows = q_rows = 0
    unbounded = left < 0 and right < 0
    for i0 in range(0, nq, block_q):
        i1 = min(i0 + block_q, nq)
        if unbounded:  # every tile full: no loop over key tiles needed
            full += n_kt
            computed_el += (i1 - i0) * nk
            kv_rows += nk
            q_rows += (i1 - i0) * n_kt
            continue
        lo, hi = masks.key_range(i0, i1, nq, nk, left, right)
        if hi <= lo:
            continue
        # Key tiles with j0 < hi and j1 > lo, the only ones forward.py asks tile_state about.
        for j0 in range((lo // block_k) * block_k, hi, block_k):
            j1 = min(j0 + block_k, nk)
            state = masks.tile_state(i0, i1, j0, j1, nq, nk, left, right)
            if state is masks.TileState.SKIPPED:
                continue
            full += state is masks.TileState.FULL
            partial += state is masks.TileState.PARTIAL
            computed_el += (i1 - i0) * (j1 - j0)
            partial_el += (i1 - i0) * (j1 - j0) if state is masks.TileState.PARTIAL else 0
            kv_rows += j1 - j0
            q_rows += i1 - i0
    total = math.ceil(nq / block_q) * n_kt
    return Schedule(nq, nk, block_q, block_k, (left, right), full, partial, total - full - partial,
                    computed_el, partial_el, kv_rows, q_rows, visible_pairs(nq, nk, causal, window_size))


def visible_pairs(nq: int, nk: int, causal: bool = False, window_size: tuple[int, int] = (-1, -1)) -> int:
    """Exact number of (query, key) pairs the mask lets through, in O(Nq) without an Nq x Nk mask."""
    left, right = masks.effective_window(causal, window_size)
    i = torch.arange(nq, dtype=torch.int64) + (nk - nq)  # each row's diagonal key
    lo = (i - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
    hi = (i + right + 1).clamp(max=nk) if right >= 0 else torch.full_like(i, nk)
    return int((hi - lo).clamp(min=0).sum())
