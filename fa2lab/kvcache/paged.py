"""PagedKVCache: a pool of fixed-size pages shared by sequences that grow and finish at will.

Storage is (num_pages, Hkv, page_size, D) for K and for V; each sequence owns a list of pages
(its row of the block table, logical page -> physical page). Pages come from a free list as a
sequence grows and go back when it is freed, so memory follows the tokens actually held instead
of B x max_len. Any page size >= 1 (FlashAttention-2 needs multiples of 256).
"""

from __future__ import annotations

import math

import torch

from fa2lab import _checks
from fa2lab.decode.api import decode_attention
from fa2lab.kvcache.base import check_append, check_sizes


class UnknownSequence(KeyError, ValueError):
    """A sequence id the cache does not hold: a KeyError (a lookup) and a ValueError (bad input)."""


class PagedKVCache:
    def __init__(self, num_pages: int, page_size: int, heads_kv: int, head_dim: int, *,
                 head_dim_v: int | None = None, dtype=torch.float16, device="cpu"):
        check_sizes(num_pages=num_pages, page_size=page_size, heads_kv=heads_kv, head_dim=head_dim,
                    head_dim_v=head_dim_v)
        _checks.check_float_dtype("the cache's dtype", dtype)
        self.num_pages, self.page_size, self.heads_kv, self.head_dim = num_pages, page_size, heads_kv, head_dim
        self.head_dim_v = head_dim_v or head_dim
        self.k_pages = torch.zeros(num_pages, heads_kv, page_size, head_dim, dtype=dtype, device=device)
        self.v_pages = torch.zeros(num_pages, heads_kv, page_size, self.head_dim_v, dtype=dtype, device=device)
        self.dtype, self.device = dtype, self.k_pages.device
        self.free_pages: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self.pages: dict = {}  # seq_id -> [physical page, ...]
        self.lengths: dict = {}  # seq_id -> tokens held

    def add_sequence(self, seq_id) -> None:
        if seq_id in self.pages:
            raise ValueError(f"sequence {seq_id!r} already exists; free it first or pick another id")
        self.pages[seq_id], self.lengths[seq_id] = [], 0

    def _known(self, seq_id) -> None:
        if seq_id not in self.pages:
            raise UnknownSequence(f"unknown sequence {seq_id!r}; known: {sorted(map(repr, self.pages))}; "
                           f"call add_sequence first")

    def append(self, seq_id, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add n tokens to one sequence: k (Hkv, n, D), v (Hkv, n, Dv) in the cache's dtype. Takes
        pages as needed; if the pool cannot supply them nothing is written and nothing is taken."""
        self._known(seq_id)
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"expected {name} to be a torch.Tensor (Hkv, n, D), got {type(x).__name__}")
        if k.dim() != 3 or k.shape[0] != self.heads_kv or k.shape[2] != self.head_dim:
            raise ValueError(f"expected k of shape (Hkv={self.heads_kv}, n, D={self.head_dim}), got {tuple(k.shape)}")
        if v.shape != (self.heads_kv, k.shape[1], self.head_dim_v):
            raise ValueError(f"expected v of shape {(self.heads_kv, k.shape[1], self.head_dim_v)}, got {tuple(v.shape)}")
        check_append(self, k[None], v[None], batch=1)  # dtype and device: the policy of every cache
        n, start = k.shape[1], self.lengths[seq_id]
        need = math.ceil((start + n) / self.page_size) - len(self.pages[seq_id])
        if need > len(self.free_pages):
            raise RuntimeError(f"page pool exhausted: sequence {seq_id!r} needs {need} more pages of "
                               f"{self.page_size} tokens, {len(self.free_pages)} are free; free finished "
                               f"sequences or make the pool larger (num_pages={self.num_pages})")
        pages = self.pages[seq_id] + self.free_pages[len(self.free_pages) - need:][::-1]  # the pages pop() would give
        pos = torch.arange(start, start + n)
        phys = torch.tensor(pages, dtype=torch.long)[pos // self.page_size].to(self.k_pages.device)  # (n,)
        off = (pos % self.page_size).to(self.k_pages.device)  # (n,)
        self.k_pages[phys, :, off] = k.transpose(0, 1)  # (n, Hkv, D)
        self.v_pages[phys, :, off] = v.transpose(0, 1)
        # Pages change hands only after the writes succeeded: a failed write takes nothing.
        del self.free_pages[len(self.free_pages) - need:]
        self.pages[seq_id] = pages
        self.lengths[seq_id] = start + n

    def free(self, seq_id) -> None:
        """Forget a finished sequence and return its pages to the pool."""
        self._known(seq_id)
        self.free_pages.extend(reversed(self.pages.pop(seq_id)))
        del self.lengths[seq_id]

    def block_table(self, seq_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_table int32 (B, max_pages), cache_seqlens int32 (B,)) for these sequences, in
        order; unused entries are 0 (never read: they lie past the sequence's length)."""
        for s in seq_ids:
            self._known(s)
        width = max([len(self.pages[s]) for s in seq_ids] + [1])
        table = torch.zeros(len(seq_ids), width, dtype=torch.int32)
        for row, s in enumerate(seq_ids):
            table[row, : len(self.pages[s])] = torch.tensor(self.pages[s], dtype=torch.int32)
        seqlens = torch.tensor([self.lengths[s] for s in seq_ids], dtype=torch.int32)
        device = self.k_pages.device
        return table.to(device), seqlens.to(device)

    def attend(self, q: torch.Tensor, seq_ids, **kwargs):
        """decode_attention of q (B, Hq, Nq, D) against sequences seq_ids (len B)."""
        _checks.check_tensor("q", q, 4, "(B, Hq, Nq, D)")
        _checks.check_floating("q", q)
        if not isinstance(seq_ids, (list, tuple)):
            raise ValueError(f"expected seq_ids to be a list of sequence ids (one per query row), got {seq_ids!r}")
        if q.shape[0] != len(seq_ids):
            raise ValueError(f"expected one query row per sequence: q has B={q.shape[0]}, seq_ids {len(seq_ids)}")
        table, seqlens = self.block_table(seq_ids)
        return decode_attention(q, self.k_pages, self.v_pages, cache_seqlens=seqlens, block_table=table, **kwargs)

    def memory_bytes(self) -> int:
        return self.k_pages.numel() * self.k_pages.element_size() + self.v_pages.numel() * self.v_pages.element_size()

    def used_pages(self) -> int:
        return self.num_pages - len(self.free_pages)

    def utilisation(self) -> float:
        """Tokens held / token slots in pages in use (the last page of a sequence is partly empty)."""
        used = self.used_pages() * self.page_size
        return sum(self.lengths.values()) / used if used else 1.0
