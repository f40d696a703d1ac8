"""Which keys a query may see: causal and sliding-window semantics, per element and per tile.

Semantics are FlashAttention-2's (>= 2.3). With off = Nk - Nq the causal diagonal is aligned to
the bottom right, and query i may see key j iff

    i + off - left  <=  j  <=  i + off + right        (a bound of -1 means unbounded)

`causal=True` is the window (left, 0). Example, Nq=3, Nk=5, causal (x = visible):

    keys  0 1 2 3 4
    q0    x x x . .
    q1    x x x x .
    q2    x x x x x

The tiled algorithms ask three questions of a (query tile x key tile) block: is it empty (skip),
fully visible (no mask needed), or partial (mask needed)? Everything here is O(1) per tile, except
`tile_mask`, which builds a Br x Bc boolean only for partial tiles.
"""

from __future__ import annotations

import enum

import torch


class TileState(enum.Enum):
    SKIPPED = "skipped"  # no (query, key) pair of the tile is visible
    FULL = "full"  # every pair is visible: computed without a mask
    PARTIAL = "partial"  # computed, then masked element by element


def effective_window(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    """(left, right) after folding `causal` in; -1 means unbounded."""
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def key_range(i0: int, i1: int, nq: int, nk: int, left: int, right: int) -> tuple[int, int]:
    """Half-open range [lo, hi) of keys seen by at least one query row of [i0, i1)."""
    off = nk - nq
    lo = 0 if left < 0 else max(0, i0 + off - left)
    hi = nk if right < 0 else min(nk, i1 - 1 + off + right + 1)
    return lo, max(lo, hi)


def query_range(j0: int, j1: int, nq: int, nk: int, left: int, right: int) -> tuple[int, int]:
    """Half-open range [lo, hi) of query rows that see at least one key of [j0, j1)."""
    off = nk - nq
    lo = 0 if right < 0 else max(0, j0 - off - right)
    hi = nq if left < 0 else min(nq, j1 - 1 - off + left + 1)
    return lo, max(lo, hi)


def tile_state(i0: int, i1: int, j0: int, j1: int, nq: int, nk: int, left: int, right: int) -> TileState:
    """Classify the block rows [i0, i1) x keys [j0, j1) (both non-empty)."""
    off = nk - nq
    # Empty: even the most permissive corner is outside the window.
    if left >= 0 and j1 - 1 < i0 + off - left:
        return TileState.SKIPPED
    if right >= 0 and j0 > i1 - 1 + off + right:
        return TileState.SKIPPED
    # Full: even the strictest corner is inside it.
    left_ok = left < 0 or j0 >= i1 - 1 + off - left
    right_ok = right < 0 or j1 - 1 <= i0 + off + right
    return TileState.FULL if left_ok and right_ok else TileState.PARTIAL


def tile_mask(
    i0: int, i1: int, j0: int, j1: int, nq: int, nk: int, left: int, right: int, device=None
) -> torch.Tensor:
    """Boolean (i1 - i0, j1 - j0), True where query i may see key j."""
    off = nk - nq
    rows = torch.arange(i0, i1, device=device)[:, None] + off
    cols = torch.arange(j0, j1, device=device)[None, :]
    visible = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= cols >= rows - left
    if right >= 0:
        visible &= cols <= rows + right
    return visible


def dense_mask(nq: int, nk: int, causal: bool, window_size: tuple[int, int], device=None) -> torch.Tensor:
    """The full (Nq, Nk) boolean mask. Only the naive reference may build this."""
    left, right = effective_window(causal, window_size)
    return tile_mask(0, nq, 0, nk, nq, nk, left, right, device=device)


def draw_mask(nq: int, nk: int, causal: bool = False, window_size: tuple[int, int] = (-1, -1)) -> str:
    """ASCII picture of the mask: 'x' visible, '.' hidden; one line per query row."""
    mask = dense_mask(nq, nk, causal, window_size)
    header = "keys " + " ".join(str(j % 10) for j in range(nk))
    rows = [f"q{i:<3} " + " ".join("x" if v else "." for v in mask[i].tolist()) for i in range(nq)]
    return "\n".join([header, *rows])
