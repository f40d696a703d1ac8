"""SlidingWindowKVCache: a ring buffer holding only the last tokens that a sliding window can see.

With a window of W keys (window_size=(W-1, 0): a query sees itself and the W-1 keys before it) and
up to Nq new queries per step, the oldest query of a step still needs the W-1 tokens before it, so
the cache keeps C = W + max_new_tokens - 1 tokens per sequence and memory stays bounded however
long generation runs. Decode results equal full-cache attention with window_size=(W-1, 0), because
the mask only depends on the distance between query and key: the reader presents the kept tokens
in logical order (oldest first), positions relative to the oldest kept token.

Ring layout for one sequence with C = 5, after 7 tokens t0..t6 (slot = absolute position % C):

    slot      0   1   2   3   4
    token     t5  t6  t2  t3  t4        kept: t2..t6, oldest at slot total % C = 2
    logical   3   4   0   1   2
"""

from __future__ import annotations

import torch

from fa2lab import _checks
from fa2lab.kvcache.base import KVCache, check_append, check_sizes


class SlidingWindowKVCache(KVCache):
    def __init__(self, batch: int, heads_kv: int, window: int, head_dim: int, *, max_new_tokens: int = 1,
                 head_dim_v: int | None = None, dtype=torch.float16, device="cpu"):
        """Keeps the last window + max_new_tokens - 1 tokens of each sequence, so that each of up to
        max_new_tokens queries of a step still sees `window` keys (itself included)."""
        check_sizes(batch=batch, heads_kv=heads_kv, window=window, head_dim=head_dim, max_new_tokens=max_new_tokens,
                    head_dim_v=head_dim_v)
        _checks.check_float_dtype("the cache's dtype", dtype)
        self.batch, self.heads_kv, self.head_dim = batch, heads_kv, head_dim
        self.head_dim_v = head_dim_v or head_dim
        self.window, self.max_new_tokens = window, max_new_tokens
        self.capacity = window + max_new_tokens - 1  # C: ring slots per sequence
        self.dtype = dtype
        self.k = torch.zeros(batch, heads_kv, self.capacity, head_dim, dtype=dtype, device=device)  # (B, Hkv, C, D)
        self.device = self.k.device  # "cuda" resolved to "cuda:0": compared with inputs' devices
        self.v = torch.zeros(batch, heads_kv, self.capacity, self.head_dim_v, dtype=dtype, device=device)
        # Tokens ever appended (absolute positions), int64: a long generation outgrows no counter.
        self.total = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)

    def seqlens(self) -> torch.Tensor:
        """int32 (B,) tokens kept: min(tokens appended, C)."""
        return self.total.clamp(max=self.capacity).to(torch.int32)

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Write n new tokens per sequence: k (B, Hkv, n, D), v (B, Hkv, n, Dv) in the cache's dtype.
        With `lengths` (int (B,), each <= n) sequence b takes only its first lengths[b] tokens. A step
        longer than C keeps only its last C tokens; older ones are overwritten in place."""
        _, take = check_append(self, k, v, lengths)
        # Stage: every (sequence, slot) written this step, the new tokens and the tokens they
        # replace. Writing in place destroys tokens that are still visible, so the commit below
        # puts the old ones back if it fails at any point (an interrupt, out of memory).
        rows, slots, new_k, new_v = [], [], [], []
        for b in range(self.batch):
            t = int(take[b])
            kept = min(t, self.capacity)
            first = int(self.total[b]) + t - kept  # absolute position of the first token written
            slots.append((first + torch.arange(kept, device=self.device)) % self.capacity)  # (kept,) distinct
            rows.append(torch.full((kept,), b, dtype=torch.long, device=self.device))
            new_k.append(k[b, :, t - kept:t].transpose(0, 1))  # (kept, Hkv, D)
            new_v.append(v[b, :, t - kept:t].transpose(0, 1))  # (kept, Hkv, Dv)
        rows, slots = torch.cat(rows), torch.cat(slots)  # (M,) each, M = sum of kept
        new_k, new_v = torch.cat(new_k), torch.cat(new_v)  # (M, Hkv, D), (M, Hkv, Dv)
        old_k, old_v, old_total = self.k[rows, :, slots], self.v[rows, :, slots], self.total.clone()
        try:
            self.k[rows, :, slots] = new_k
            self.v[rows, :, slots] = new_v
            self.total += take
        except BaseException:
            self.k[rows, :, slots] = old_k
            self.v[rows, :, slots] = old_v
            self.total.copy_(old_total)
            raise

    def reader(self):
        return RingReader(self.k, self.v, self.total)

    def attend(self, q: torch.Tensor, **kwargs):
        """decode of q (B, Hq, Nq, D), Nq <= max_new_tokens, over the window: window_size=(W-1, 0)
        and causal=True unless given. A wider left bound would need tokens that were dropped."""
        kwargs.setdefault("causal", True)
        kwargs.setdefault("window_size", (self.window - 1, 0))
        left, _ = _checks.check_window(kwargs["window_size"])
        if not 0 <= left <= self.window - 1:
            raise ValueError(f"expected window_size left in [0, {self.window - 1}] for a cache of window "
                             f"{self.window}, got {left}; this cache keeps no older tokens (-1 is unbounded)")
        if q.dim() == 4 and q.shape[2] > self.max_new_tokens:
            raise ValueError(f"expected at most max_new_tokens={self.max_new_tokens} queries, got Nq={q.shape[2]}; "
                             f"the oldest would miss part of its window: build the cache with "
                             f"max_new_tokens={q.shape[2]}")
        return super().attend(q, **kwargs)

    def reset(self) -> None:
        """Forget every sequence; buffers are kept (and their addresses)."""
        self.total.zero_()

    def memory_bytes(self) -> int:
        """Fixed by (B, Hkv, C, D): independent of how many tokens were appended."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def bytes_per_token(self) -> float:
        """Bytes per kept slot of one sequence (all heads, K and V)."""
        return self.memory_bytes() / (self.batch * self.capacity)


class RingReader:
    """Reads logical positions [j0, j1) (0 = oldest kept token) of ring buffers k, v (B, Hkv, C, D/Dv)
    whose sequence b has seen total[b] tokens: slot = (oldest + p) % C, gathered per tile."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, total: torch.Tensor):
        self.k, self.v = k, v
        self.batch, self.heads_kv, self.capacity, self.head_dim = k.shape
        self.head_dim_v = v.shape[-1]
        kept = total.clamp(max=self.capacity)
        self.oldest = (total - kept) % self.capacity  # (B,) slot of logical position 0

    def read(self, j0, j1, dtype):
        pos = torch.arange(j0, j1, device=self.k.device)  # (Bc,)
        slots = (self.oldest[:, None] + pos[None, :]) % self.capacity  # (B, Bc)
        idx = slots[:, None, :, None]  # (B, 1, Bc, 1)
        k = self.k.gather(2, idx.expand(-1, self.heads_kv, -1, self.head_dim))  # (B, Hkv, Bc, D)
        v = self.v.gather(2, idx.expand(-1, self.heads_kv, -1, self.head_dim_v))  # (B, Hkv, Bc, Dv)
        return k.to(dtype), v.to(dtype)
