"""The ring schedule, planned once per shape: which K/V shard each rank holds at each step, and
which (query segment x key segment) blocks it computes there.

With W ranks, rank r holds its own K/V shard at step 0 and the shard of rank (r - s) mod W at
step s: every step each rank sends the shard it holds to rank r + 1 and receives one from r - 1.

Layouts (how the global sequence is cut into the ranks' shards; N_local = N / W):

    contiguous   rank r holds positions [r*N_local, (r+1)*N_local)           (the input layout)
    zigzag       the sequence is cut into 2W chunks; rank r holds chunks r and 2W-1-r

With a causal mask the contiguous layout gives rank W-1 all of its keys' work and rank 0 almost
none; zig-zag pairs an early chunk with a late one, so every rank sees the same number of
(query, key) pairs. W = 2, 4 chunks c0..c3, zigzag: rank 0 = (c0, c3), rank 1 = (c1, c2).

A block is one query segment against one key segment, cropped to the rows that see a key and the
keys that a row sees. After the crop the mask is always a bottom-right-aligned window of the
cropped block (the last kept row sees the last kept key, and the band's edges stay on the
block's own diagonals), so `fa2lab.tiled` runs it unchanged. A pair with nothing visible is
skipped: it is not computed and costs no FLOPs, only the ring hop that brings its K/V.

What runs is a step's *launches*: its blocks merged into one when their union is a single
rectangle of local rows with a bottom-right window (`merge_blocks`). Local positions keep the
global order within a shard, so zig-zag's step 0 (two chunks against themselves) is one causal
block and every later step one full block: one kernel call per step instead of two or three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fa2lab import _checks, masks

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Block:
    """One computed block of a ring step: local query rows against local rows of the K/V shard
    held at that step, with the mask as a window of the cropped block."""

    q_rows: tuple[int, int]  # [a, b) rows of this rank's q shard
    k_rows: tuple[int, int]  # [a, b) rows of the K/V shard held at this step
    window: tuple[int, int]  # (left, right), bottom-right aligned in the cropped block; -1 unbounded
    pairs: int  # visible (query, key) pairs: the block's work is 4 * B * Hq * pairs * D FLOPs


@dataclass(frozen=True)
class RingStep:
    rank: int
    step: int
    kv_rank: int  # whose K/V shard this rank holds at this step: (rank - step) mod W
    blocks: tuple[Block, ...]  # computed, one per (query segment, key segment): what the figures draw
    skipped: int  # segment pairs left out because the mask hides all of them
    launches: tuple[Block, ...] = ()  # what runs: `blocks` merged where exact (`merge_blocks`)


@dataclass(frozen=True)
class RingPlan:
    """Everything `ring_attention` decides before it touches a tensor."""

    world_size: int
    nq_local: int
    nk_local: int
    causal: bool
    window_size: tuple[int, int]
    layout: str  # "contiguous" or "zigzag"; see the module docstring
    steps: tuple[tuple[RingStep, ...], ...]  # steps[rank][step]

    def segments(self, rank: int, n_local: int) -> list[tuple[int, int, int]]:
        return _segments(self.layout, rank, self.world_size, n_local)

    def schedule(self) -> list[dict]:
        """One row per (rank, step): the K/V shard held, blocks computed and skipped, work."""
        return [dict(rank=st.rank, step=st.step, kv_rank=st.kv_rank, computed=len(st.blocks),
                     skipped=st.skipped, launches=len(st.launches), pairs=sum(b.pairs for b in st.blocks),
                     windows=[b.window for b in st.blocks])
                for per_rank in self.steps for st in per_rank]

    def global_blocks(self) -> list[dict]:
        """Every computed block in global positions: rank, step, query rows [q0, q1), keys
        [k0, k1) of the gathered sequence, window and pairs - rectangles to draw on the mask."""
        def to_global(rank, n_local, a, b):
            for g, local, n in self.segments(rank, n_local):
                if local <= a < local + n:
                    return g + a - local, g + b - local  # a block never straddles two segments
            raise AssertionError("block outside its shard")

        rows = []
        for per_rank in self.steps:
            for st in per_rank:
                for blk in st.blocks:
                    q0, q1 = to_global(st.rank, self.nq_local, *blk.q_rows)
                    k0, k1 = to_global(st.kv_rank, self.nk_local, *blk.k_rows)
                    rows.append(dict(rank=st.rank, step=st.step, kv_rank=st.kv_rank, q0=q0, q1=q1, k0=k0, k1=k1,
                                     window=blk.window, pairs=blk.pairs))
        return rows

    def balance(self) -> list[dict]:
        """Per rank: blocks computed and skipped over the whole ring, visible pairs, and the
        pairs as a share of the busiest rank's (1.0 everywhere = perfectly balanced)."""
        rows = [dict(rank=r, computed=sum(len(st.blocks) for st in per_rank),
                     skipped=sum(st.skipped for st in per_rank),
                     pairs=sum(b.pairs for st in per_rank for b in st.blocks))
                for r, per_rank in enumerate(self.steps)]
        busiest = max(row["pairs"] for row in rows) or 1
        for row in rows:
            row["share_of_busiest"] = round(row["pairs"] / busiest, 3)
        return rows

    def comm_volume(self, batch: int, heads_q: int, heads_kv: int, head_dim: int, head_dim_v: int | None = None,
                    itemsize: int = 2, grad_itemsize: int = 4, backward: bool = True) -> list[dict]:
        """Bytes one rank sends at each ring step (every rank sends the same). Forward: W-1 hops
        of a K/V shard, bytes = B * Hkv * Nk_local * (D + Dv) * itemsize; backward: W-1 K/V hops
        again and W hops of the dK/dV accumulators (the last one brings them home), at
        `grad_itemsize` (their travel dtype). heads_q is unused: queries never move. A ring of one
        rank sends nothing (`ring_backward` posts no hop when W == 1)."""
        dv = head_dim if head_dim_v is None else head_dim_v
        kv = batch * heads_kv * self.nk_local * (head_dim + dv)
        w = self.world_size
        rows = [dict(schedule="ring", phase="forward", step=s, what="K/V shard", bytes_sent=kv * itemsize)
                for s in range(w - 1)]
        if backward and w > 1:
            for s in range(w):
                sent = (kv * itemsize if s < w - 1 else 0) + kv * grad_itemsize
                rows.append(dict(schedule="ring", phase="backward", step=s,
                                 what="K/V shard, dK/dV" if s < w - 1 else "dK/dV home", bytes_sent=sent))
        for r in rows:
            r["world_size"] = w
        return rows

    def critical_path_pairs(self) -> int:
        """Sum over steps of the busiest rank's pairs: the ring waits for its slowest member at
        every step, so this (not the total) is what the wall time follows."""
        return sum(max(sum(b.pairs for b in self.steps[r][s].blocks) for r in range(self.world_size))
                   for s in range(self.world_size))


def _segments(layout: str, rank: int, world: int, n_local: int) -> list[tuple[int, int, int]]:
    """(global start, local start, length) of each contiguous piece of a rank's shard."""
    if layout == "contiguous":
        return [(rank * n_local, 0, n_local)]
    c = n_local // 2  # zig-zag chunk length
    return [(rank * c, 0, c), ((2 * world - 1 - rank) * c, c, c)]


def zigzag_shard(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s zig-zag shard of a gathered sequence x (B, H, N, ...): chunks rank and
    2W-1-rank of 2W, concatenated (B, H, N / W, ...). What `ring_attention(..., layout="zigzag")`
    takes; the ring's own `simulate.shard` does the same for any plan."""
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        raise ValueError(f"expected a gathered sequence (B, H, N, ...), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"expected world_size to be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"expected rank in [0, {world_size}), got {rank!r}")
    if x.shape[2] % (2 * world_size):
        raise ValueError(f"a zig-zag shard is two of 2W = {2 * world_size} equal chunks; the sequence has "
                         f"{x.shape[2]} positions: pad it to {-(-x.shape[2] // (2 * world_size)) * 2 * world_size}")
    c = x.shape[2] // (2 * world_size)
    return torch.cat([x[:, :, g:g + c] for g, _, _ in _segments("zigzag", rank, world_size, 2 * c)], dim=2)


def default_layout(world_size: int, nq_local: int, nk_local: int, causal: bool,
                   window_size: tuple[int, int]) -> str:
    """zigzag where the mask hides the future but not the past (causal, or a right-bounded window
    with no left bound) - the masks that leave contiguous shards unbalanced - and both shard
    lengths split into two chunks; contiguous otherwise (already balanced, or impossible)."""
    left, right = masks.effective_window(causal, window_size)
    even = nq_local % 2 == 0 and nk_local % 2 == 0 and nq_local > 0 and nk_local > 0
    return "zigzag" if world_size > 1 and left < 0 and right >= 0 and even else "contiguous"


def crop_block(qa: int, lq: int, ka: int, lk: int, off: int, left: int, right: int):
    """Crop the block of global query rows [qa, qa+lq) x keys [ka, ka+lk) to its visible part.

    Globally query i sees key j iff off - left <= j - i <= off + right (off = Nk - Nq, -1 =
    unbounded). Returns None if nothing is visible, else (i0, i1, j0, j1, (left_s, right_s), pairs)
    with rows/keys relative to the block and the window relative to the cropped block.
    """
    inf = float("inf")
    lo_d = off - left - (ka - qa) if left >= 0 else -inf  # bounds on j' - i' in block coordinates
    hi_d = off + right - (ka - qa) if right >= 0 else inf
    i0 = int(max(0, -hi_d))  # rows that see at least one key of [0, lk)
    i1 = int(min(lq, lk - lo_d))
    if i1 <= i0 or lk == 0:
        return None
    j0 = int(max(0, i0 + lo_d))  # keys seen by at least one kept row
    j1 = int(min(lk, i1 + hi_d))
    nq_s, nk_s = i1 - i0, j1 - j0
    off_s, shift = nk_s - nq_s, j0 - i0
    # The crop keeps the last row's view ending at the last key, so both bounds are >= 0 here.
    left_s = -1 if lo_d == -inf else int(off_s - (lo_d - shift))
    right_s = -1 if hi_d == inf else int((hi_d - shift) - off_s)
    if left_s >= nk_s - 1:
        left_s = -1  # the bound cuts nothing inside the block
    if right_s >= nq_s - 1:
        right_s = -1
    rows = torch.arange(i0, i1, dtype=torch.int64)
    hi = (rows + hi_d + 1).clamp(max=lk) if hi_d != inf else torch.full_like(rows, lk)
    lo = (rows + lo_d).clamp(min=0) if lo_d != -inf else torch.zeros_like(rows)
    pairs = int((hi - lo).clamp(min=0).sum())
    return i0, i1, j0, j1, (left_s, right_s), pairs


def _row_intervals(blk: Block, qa: int, ka: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (in a box starting at local row qa, key ka) of `blk` and each row's visible keys [lo, hi)."""
    (a, b), (c, d) = blk.q_rows, blk.k_rows
    nq_s, nk_s = b - a, d - c
    i = torch.arange(nq_s, dtype=torch.int64)
    off = nk_s - nq_s
    lo = (i + off - blk.window[0]).clamp(min=0) if blk.window[0] >= 0 else torch.zeros_like(i)
    hi = (i + off + blk.window[1] + 1).clamp(max=nk_s) if blk.window[1] >= 0 else torch.full_like(i, nk_s)
    hi = torch.maximum(hi, lo)  # an empty row: lo == hi
    return i + a - qa, lo + c - ka, hi + c - ka


def merge_blocks(blocks: tuple[Block, ...]) -> tuple[Block, ...]:
    """One block equal to the union of `blocks` (disjoint), if that union is exactly a rectangle
    of local rows whose mask is a bottom-right window of it; else the blocks unchanged.

    The test is exact, row by row: each row of the bounding box must see one interval of keys
    (the blocks' pieces adjacent), and those intervals must be the ones the inferred window gives.
    """
    if len(blocks) < 2:
        return tuple(blocks)
    qa, qb = min(b.q_rows[0] for b in blocks), max(b.q_rows[1] for b in blocks)
    ka, kb = min(b.k_rows[0] for b in blocks), max(b.k_rows[1] for b in blocks)
    nq, nk = qb - qa, kb - ka
    lo = torch.full((nq,), nk, dtype=torch.int64)
    hi = torch.zeros(nq, dtype=torch.int64)
    count = torch.zeros(nq, dtype=torch.int64)
    for blk in blocks:
        rows, b_lo, b_hi = _row_intervals(blk, qa, ka)
        seen = b_hi > b_lo
        rows, b_lo, b_hi = rows[seen], b_lo[seen], b_hi[seen]
        lo.scatter_reduce_(0, rows, b_lo, "amin")
        hi.scatter_reduce_(0, rows, b_hi, "amax")
        count.index_add_(0, rows, b_hi - b_lo)
    seen = count > 0
    if not torch.equal((hi - lo)[seen], count[seen]):
        return tuple(blocks)  # some row sees two separate pieces: not one window
    i = torch.arange(nq, dtype=torch.int64)
    off = nk - nq
    cut_right = seen & (hi < nk)
    cut_left = seen & (lo > 0)
    right = int((hi - 1 - i - off)[cut_right].max()) if bool(cut_right.any()) else -1
    left = int((i + off - lo)[cut_left].max()) if bool(cut_left.any()) else -1
    if (right < 0 and bool(cut_right.any())) or (left < 0 and bool(cut_left.any())):
        return tuple(blocks)  # the diagonal would sit outside the box
    merged = Block((qa, qb), (ka, kb), (-1 if left >= nk - 1 else left, -1 if right >= nq - 1 else right),
                   sum(b.pairs for b in blocks))
    _, m_lo, m_hi = _row_intervals(merged, qa, ka)
    m_seen = m_hi > m_lo
    if not (torch.equal(m_seen, seen) and torch.equal(m_lo[seen], lo[seen]) and torch.equal(m_hi[seen], hi[seen])):
        return tuple(blocks)
    return (merged,)


def plan_ring(world_size: int, nq_local: int, nk_local: int | None = None, *, causal: bool = False,
              window_size: tuple[int, int] = (-1, -1), layout: str | None = None) -> RingPlan:
    """Plan ring attention over `world_size` ranks holding `nq_local` queries and `nk_local` keys
    each (nk_local defaults to nq_local). Masks as in `fa2lab.attention`, on the global sequence
    (Nq = W * nq_local, Nk = W * nk_local, bottom-right aligned). `layout=None` picks
    `default_layout`. Pure arithmetic: no process group needed, so a notebook can draw it.
    """
    nk_local = nq_local if nk_local is None else nk_local
    for name, value, low in (("world_size", world_size, 1), ("nq_local", nq_local, 0), ("nk_local", nk_local, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"expected {name} to be an int >= {low}, got {value!r}")
    window_size = _checks.check_window(window_size)
    if not isinstance(causal, bool):
        raise ValueError(f"expected causal to be True or False, got {causal!r}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS} or None (chosen for the mask)")
    layout = layout or default_layout(world_size, nq_local, nk_local, causal, window_size)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if layout == "zigzag" and (nq_local % 2 or nk_local % 2):
        raise ValueError(
            f"the zigzag layout cuts each shard into two equal chunks; got nq_local={nq_local}, "
            f"nk_local={nk_local}; use even shard lengths or layout='contiguous'"
        )
    left, right = masks.effective_window(causal, window_size)
    off = world_size * (nk_local - nq_local)  # global Nk - Nq
    steps = []
    for rank in range(world_size):
        q_segs = _segments(layout, rank, world_size, nq_local)
        per_rank = []
        for step in range(world_size):
            kv_rank = (rank - step) % world_size
            blocks, skipped = [], 0
            for qa, q_local, lq in q_segs:
                for ka, k_local, lk in _segments(layout, kv_rank, world_size, nk_local):
                    crop = crop_block(qa, lq, ka, lk, off, left, right) if lq and lk else None
                    if crop is None:
                        skipped += 1
                        continue
                    i0, i1, j0, j1, window, pairs = crop
                    blocks.append(Block((q_local + i0, q_local + i1), (k_local + j0, k_local + j1), window, pairs))
            per_rank.append(RingStep(rank, step, kv_rank, tuple(blocks), skipped, merge_blocks(tuple(blocks))))
        steps.append(tuple(per_rank))
    return RingPlan(world_size, nq_local, nk_local, bool(causal), tuple(window_size), layout, tuple(steps))
