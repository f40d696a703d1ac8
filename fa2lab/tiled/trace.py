"""A recorder of the tiled schedule, for notebooks and teaching. Off by default, free when off.

Pass a `TileTracer` to `tiled_attention(..., tracer=t)`; after the call `t.steps` holds one
`TileStep` per (query tile, key tile) pair in visit order, skipped tiles included, with the
running max m and sum l of each row after the step (both (B, Hq, rows of the tile)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TileStep:
    order: int  # visit order within the pass; skipped tiles get -1 (never visited)
    q_tile: int
    k_tile: int
    q_range: tuple[int, int]  # [i0, i1) query positions
    k_range: tuple[int, int]  # [j0, j1) key positions
    state: str  # "full", "partial" or "skipped" (fa2lab.masks.TileState values)
    m: torch.Tensor | None = None  # (B, Hq, i1 - i0) running max after this step
    l: torch.Tensor | None = None  # (B, Hq, i1 - i0) running sum after this step


@dataclass
class TileTracer:
    record_stats: bool = True  # keep m and l per step (costs a copy per tile)
    steps: list[TileStep] = field(default_factory=list)
    shape: dict = field(default_factory=dict)  # Nq, Nk, Br, Bc of the traced call
    _visited: int = 0

    def start(self, nq: int, nk: int, block_q: int, block_k: int) -> None:
        self.steps.clear()
        self._visited = 0
        self.shape = {"Nq": nq, "Nk": nk, "Br": block_q, "Bc": block_k}

    def record(self, q_tile, k_tile, q_range, k_range, state, m=None, l=None) -> None:
        order = -1
        if state != "skipped":
            order, self._visited = self._visited, self._visited + 1
        keep = self.record_stats and m is not None
        self.steps.append(
            TileStep(order, q_tile, k_tile, tuple(q_range), tuple(k_range), state,
                     m.clone() if keep else None, l.clone() if keep else None)
        )

    def grid(self) -> list[list[str]]:
        """States as a (query tiles x key tiles) grid of strings."""
        nqt = 1 + max((s.q_tile for s in self.steps), default=-1)
        nkt = 1 + max((s.k_tile for s in self.steps), default=-1)
        grid = [["skipped"] * nkt for _ in range(nqt)]
        for s in self.steps:
            grid[s.q_tile][s.k_tile] = s.state
        return grid

    def to_records(self) -> list[dict]:
        """One plain dict per step (no tensors), e.g. for pandas.DataFrame."""
        return [
            {"order": s.order, "q_tile": s.q_tile, "k_tile": s.k_tile, "q_start": s.q_range[0],
             "q_end": s.q_range[1], "k_start": s.k_range[0], "k_end": s.k_range[1], "state": s.state}
            for s in self.steps
        ]

    def counts(self) -> dict[str, int]:
        out = {"full": 0, "partial": 0, "skipped": 0}
        for s in self.steps:
            out[s.state] += 1
        return out
