"""StaticKVCache: preallocated (B, Hkv, max_len, D) buffers per layer, appended in place.

The persistent buffers of the CUDA decode design fa2lab grew from: allocated once on their device (GPU-resident on CUDA) and
written in place, so a decode step allocates no cache memory and its addresses never change.
"""

from __future__ import annotations

import torch

from fa2lab.decode.readers import DenseReader
from fa2lab.kvcache.base import KVCache, check_new_tokens


class StaticKVCache(KVCache):
    def __init__(self, batch: int, heads_kv: int, max_len: int, head_dim: int, *, head_dim_v: int | None = None,
                 dtype=torch.float16, device="cpu"):
        if min(batch, heads_kv, max_len, head_dim) < 1:
            raise ValueError(f"expected positive sizes, got batch={batch}, heads_kv={heads_kv}, "
                             f"max_len={max_len}, head_dim={head_dim}")
        self.batch, self.heads_kv, self.max_len, self.head_dim = batch, heads_kv, max_len, head_dim
        self.head_dim_v = head_dim_v or head_dim
        self.k = torch.zeros(batch, heads_kv, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, heads_kv, max_len, self.head_dim_v, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)

    def seqlens(self) -> torch.Tensor:
        return self.lengths

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Write n new tokens per sequence: k (B, Hkv, n, D), v (B, Hkv, n, Dv). With `lengths`
        (int (B,), each <= n) sequence b takes only its first lengths[b] tokens (ragged steps)."""
        n = check_new_tokens("k", k, self.batch, self.heads_kv, self.head_dim)
        if check_new_tokens("v", v, self.batch, self.heads_kv, self.head_dim_v) != n:
            raise ValueError(f"expected k and v to bring the same number of tokens, got {n} and {v.shape[2]}")
        for name, x in (("k", k), ("v", v)):
            if not x.dtype.is_floating_point:
                raise ValueError(f"expected floating-point {name}, got {x.dtype}; it is stored as {self.k.dtype}")
        if lengths is None:
            take = torch.full((self.batch,), n, dtype=torch.int32, device=self.lengths.device)
        else:
            take = torch.as_tensor(lengths)
            if take.dtype.is_floating_point or take.dtype == torch.bool or take.shape != (self.batch,):
                raise ValueError(f"expected lengths to be integers of shape ({self.batch},), got {lengths!r}")
            take = take.to(device=self.lengths.device, dtype=torch.int32)
        if bool((take < 0).any()) or bool((take > n).any()):
            raise ValueError(f"expected lengths with values in [0, {n}] (the tokens this step brings), got {take.tolist()}")
        new_len = self.lengths + take
        if bool((new_len > self.max_len).any()):
            b = int((new_len > self.max_len).nonzero()[0])
            raise ValueError(f"sequence {b} would grow to {int(new_len[b])} tokens, past max_len={self.max_len}; "
                             f"allocate a larger cache or use SlidingWindowKVCache / PagedKVCache")
        for b in range(self.batch):  # only after every check: an error above changes nothing
            start, t = int(self.lengths[b]), int(take[b])
            self.k[b, :, start:start + t] = k[b, :, :t].to(self.k.dtype)
            self.v[b, :, start:start + t] = v[b, :, :t].to(self.v.dtype)
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
