"""Where decode reads K/V from: a tile [j0, j1) of every sequence's cache, in compute dtype.

A reader hides the cache's storage (dense, paged, int8, low-rank) from the split-K loop, so the
loop is the same for every cache and each cache decodes, dequantises or reconstructs one tile at a
time: no full-precision copy of a whole cache is ever made.
"""

from __future__ import annotations

from typing import Protocol

import torch


class KVReader(Protocol):
    batch: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    capacity: int  # positions addressable per sequence

    def read(self, j0: int, j1: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K (B, Hkv, j1 - j0, D) and V (B, Hkv, j1 - j0, Dv) for positions [j0, j1)."""
        ...


class DenseReader:
    """k_cache, v_cache: (B, Hkv, Nmax, D) / (B, Hkv, Nmax, Dv)."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor):
        self.k, self.v = k_cache, v_cache
        self.batch, self.heads_kv, self.capacity, self.head_dim = k_cache.shape
        self.head_dim_v = v_cache.shape[-1]

    def read(self, j0, j1, dtype):
        return self.k[:, :, j0:j1].to(dtype), self.v[:, :, j0:j1].to(dtype)


class PagedReader:
    """k_cache, v_cache: (num_pages, Hkv, page_size, D); block_table int32 (B, max_pages_per_seq)
    maps a sequence's logical page to a physical page. Any page size >= 1."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor):
        self.k, self.v = k_cache, v_cache
        self.block_table = block_table  # int32, as the Triton kernel takes it
        self.table = block_table.long()  # for indexing
        num_pages, self.heads_kv, self.page_size, self.head_dim = k_cache.shape
        self.head_dim_v = v_cache.shape[-1]
        self.batch, pages_per_seq = block_table.shape
        self.capacity = pages_per_seq * self.page_size
        self.num_pages = num_pages

    def read(self, j0, j1, dtype):
        pos = torch.arange(j0, j1, device=self.k.device)  # (Bc,)
        # Positions past a sequence's length may point at unused table entries: clamp them to a
        # valid page; the length mask discards what they read.
        phys = self.table[:, pos // self.page_size].clamp(0, self.num_pages - 1)  # (B, Bc)
        off = pos % self.page_size  # (Bc,)
        k = self.k[phys, :, off]  # (B, Bc, Hkv, D): advanced indices first
        v = self.v[phys, :, off]  # (B, Bc, Hkv, Dv)
        return k.transpose(1, 2).to(dtype), v.transpose(1, 2).to(dtype)
