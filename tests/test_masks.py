"""Tile classification must agree with the element mask it summarises."""

import itertools

import pytest

from fa2lab import draw_mask, masks
from fa2lab.masks import TileState

WINDOWS = [(-1, -1), (0, 0), (3, -1), (-1, 2), (2, 5), (0, -1)]


@pytest.mark.parametrize("nq,nk", [(7, 7), (5, 11), (11, 5), (1, 9), (9, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
def test_tile_state_and_ranges_match_elements(nq, nk, causal, window):
    left, right = masks.effective_window(causal, window)
    full = masks.dense_mask(nq, nk, causal, window)
    for bq, bk in [(1, 1), (2, 3), (4, 4)]:
        for i0, j0 in itertools.product(range(0, nq, bq), range(0, nk, bk)):
            i1, j1 = min(i0 + bq, nq), min(j0 + bk, nk)
            block = full[i0:i1, j0:j1]
            expected = (TileState.SKIPPED if not block.any() else
                        TileState.FULL if block.all() else TileState.PARTIAL)
            assert masks.tile_state(i0, i1, j0, j1, nq, nk, left, right) is expected
            assert (masks.tile_mask(i0, i1, j0, j1, nq, nk, left, right) == block).all()
        for i0 in range(0, nq, bq):
            i1 = min(i0 + bq, nq)
            cols = full[i0:i1].any(0).nonzero().flatten().tolist()
            lo, hi = masks.key_range(i0, i1, nq, nk, left, right)
            assert (lo, hi) == ((cols[0], cols[-1] + 1) if cols else (lo, lo))
        for j0 in range(0, nk, bk):
            j1 = min(j0 + bk, nk)
            rows = full[:, j0:j1].any(1).nonzero().flatten().tolist()
            lo, hi = masks.query_range(j0, j1, nq, nk, left, right)
            assert (lo, hi) == ((rows[0], rows[-1] + 1) if rows else (lo, lo))


def test_causal_is_bottom_right_aligned():
    m = masks.dense_mask(2, 4, True, (-1, -1))
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    m = masks.dense_mask(4, 2, True, (-1, -1))  # the first two rows see nothing
    assert m.tolist() == [[False, False], [False, False], [True, False], [True, True]]


def test_draw_mask():
    assert draw_mask(3, 5, causal=True).splitlines()[1:] == [
        "q0   x x x . .", "q1   x x x x .", "q2   x x x x x"]
    assert draw_mask(3, 5, window_size=(1, 0)).splitlines()[1] == "q0   . x x . ."
