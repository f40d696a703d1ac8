"""StaticKVCache: preallocated (B, Hkv, max_len, D) buffers per layer, appended in place.

The persistent buffers of the CUDA decode design fa2lab grew from: allocated once on their device (GPU-resident on CUDA) and
written in place, so a decode step allocates no cache memory and its addresses never change.
"""

from __future__ import annotations

import torch

from fa2lab.decode.readers import DenseReader
from fa2lab import _checks
from fa2lab.kvcache.base import KVCache, check_append, check_sizes


class StaticKVCache(KVCache):
    def __init__(self, batch: int, heads_kv: int, max_len: int, head_dim: int, *, head_dim_v: int | None = None,
                 dtype=torch.float16, device="cpu"):
        check_sizes(batch=batch, heads_kv=heads_kv, max_len=max_len, head_dim=head_dim, head_dim_v=head_dim_v)
        _checks.check_float_dtype("the cache's dtype", dtype)
        self.batch, self.heads_kv, self.max_len, self.head_dim = batch, heads_kv, max_len, head_dim
        self.head_dim_v = head_dim_v or head_dim
        self.k = torch.zeros(batch, heads_kv, max_len, head_dim, dtype=dtype, device=device)
        self.dtype, self.device = dtype, self.k.device  # "cuda" resolved to "cuda:0": compared with inputs'
        self.v = torch.zeros(batch, heads_kv, max_len, self.head_dim_v, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)

    def seqlens(self) -> torch.Tensor:
        return self.lengths

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Write n new tokens per sequence: k (B, Hkv, n, D), v (B, Hkv, n, Dv) in the cache's dtype
        (refused otherwise: a silent cast could overflow or lose precision). With `lengths`
        (int (B,), each <= n) sequence b takes only its first lengths[b] tokens (ragged steps)."""
        _, take = check_append(self, k, v, lengths, capacity=self.max_len,
                               fix="allocate a larger cache or use SlidingWindowKVCache / PagedKVCache")
        new_len = self.lengths + take.to(torch.int32)
        for b in range(self.batch):  # only after every check: an error above changes nothing
            start, t = int(self.lengths[b]), int(take[b])
            self.k[b, :, start:start + t] = k[b, :, :t]
            self.v[b, :, start:start + t] = v[b, :, :t]
        self.lengths.copy_(new_len)

    def reader(self):
        return DenseReader(self.k, self.v)

    def reset(self) -> None:
        """Forget every sequence; buffers are kept (and their addresses)."""
        self.lengths.zero_()

    def memory_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def bytes_per_token(self) -> float:
        return self.memory_bytes() / (self.batch * self.max_len)
