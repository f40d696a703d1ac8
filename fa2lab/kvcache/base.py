"""What every KV cache offers: append new tokens, say how long each sequence is, hand decode a
reader of its contents (one tile at a time), report its memory, and attend a query to itself.

Contract for subclasses: `append` validates everything before it writes anything, so an error
(capacity, shapes, unknown sequence) leaves the cache exactly as it was.
"""

from __future__ import annotations

import torch

from fa2lab import _checks
from fa2lab.decode.api import decode_with_reader


class KVCache:
    batch: int
    heads_kv: int
    head_dim: int
    head_dim_v: int

    def seqlens(self) -> torch.Tensor:
        """int32 (B,) valid tokens per sequence."""
        raise NotImplementedError

    def reader(self):
        """A `fa2lab.decode.readers.KVReader` over positions [0, seqlens[b]) in order."""
        raise NotImplementedError

    def memory_bytes(self) -> int:
        """Bytes held by the cache's storage (allocated, not only used)."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, **kwargs):
        """decode_attention of q (B, Hq, Nq, D) against this cache; kwargs as decode_attention
        (num_splits, softmax_scale, causal, window_size, return_lse, backend, unified_max)."""
        _checks.check_tensor("q", q, 4, "(B, Hq, Nq, D)")
        _checks.check_floating("q", q)
        if q.dim() != 4 or q.shape[0] != self.batch or q.shape[-1] != self.head_dim:
            raise ValueError(f"expected q of shape (B={self.batch}, Hq, Nq, D={self.head_dim}), got {tuple(q.shape)}")
        if q.shape[1] % self.heads_kv:
            raise ValueError(f"expected Hq to be a multiple of the cache's Hkv={self.heads_kv}, got {q.shape[1]}")
        return decode_with_reader(q, self.reader(), self.seqlens(), **kwargs)


def check_append(cache, k, v, lengths=None, capacity: int | None = None,
                 fix: str = "allocate a larger cache or use SlidingWindowKVCache", *,
                 batch: int | None = None) -> tuple[int, torch.Tensor]:
    """Every check of an append, before anything is written: k (B, Hkv, n, D), v (B, Hkv, n, Dv) in
    the cache's dtype and device, `lengths` int (B,) in [0, n], and (with `capacity`) room for them.
    Returns n and take, int64 (B,) tokens taken per sequence. `cache` has batch (or give `batch`),
    heads_kv, head_dim, head_dim_v, dtype, device and (with `capacity`) lengths int32 (B,).

    The one dtype policy of every cache: K/V arrive in the cache's dtype. A silent cast would hide
    a precision loss (float32 -> float16) or an overflow (1e5 -> inf in float16)."""
    batch = cache.batch if batch is None else batch
    n = check_new_tokens("k", k, batch, cache.heads_kv, cache.head_dim)
    if check_new_tokens("v", v, batch, cache.heads_kv, cache.head_dim_v) != n:
        raise ValueError(f"expected k and v to bring the same number of tokens, got {n} and {v.shape[2]}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != cache.dtype:
            raise ValueError(f"expected {name} in the cache's dtype {cache.dtype}, got {x.dtype}; "
                             f"convert it with {name}.to({cache.dtype})")
        if x.device != cache.device:
            raise ValueError(f"expected {name} on the cache's device {cache.device}, got {x.device}; "
                             f"move it with {name}.to({str(cache.device)!r})")
    if lengths is None:
        take = torch.full((batch,), n, dtype=torch.long, device=cache.device)
    else:
        if isinstance(lengths, (list, tuple)):
            lengths = torch.as_tensor(lengths)
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (batch,) \
                or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise ValueError(f"expected lengths to be an integer tensor of shape ({batch},), got "
                             f"{getattr(lengths, 'dtype', type(lengths).__name__)} "
                             f"{tuple(getattr(lengths, 'shape', ()))}; e.g. torch.tensor([...], dtype=torch.int32)")
        take = lengths.to(device=cache.device, dtype=torch.long)  # int64: 2**32 + 1 stays itself
        if bool((take < 0).any()) or bool((take > n).any()):
            raise ValueError(f"expected lengths in [0, n={n}] (tokens taken from this step), got {lengths.tolist()}")
    if capacity is not None:
        new_len = cache.lengths.long() + take  # (B,)
        if bool((new_len > capacity).any()):
            b = int((new_len > capacity).nonzero()[0])
            raise ValueError(f"sequence {b} would grow to {int(new_len[b])} tokens, past max_len={capacity} "
                             f"(it holds {int(cache.lengths[b])}, this step adds {int(take[b])}); {fix}")
    return n, take


def check_sizes(**sizes) -> None:
    """Every size of a cache is a positive int (head_dim_v may be None: head_dim)."""
    for name, value in sizes.items():
        if name == "head_dim_v" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"expected {name} to be a positive int, got {value!r}; the cache's sizes are "
                             f"{', '.join(f'{k}={v!r}' for k, v in sizes.items())}")


def check_new_tokens(name: str, x: torch.Tensor, batch: int, heads: int, dim: int) -> int:
    """Validate new K or V tokens (B, Hkv, n, D); returns n."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != batch or x.shape[1] != heads \
            or x.shape[3] != dim:
        raise ValueError(f"expected {name} of shape (B={batch}, Hkv={heads}, n, D={dim}), got "
                         f"{tuple(getattr(x, 'shape', ()))}")
    return x.shape[2]
