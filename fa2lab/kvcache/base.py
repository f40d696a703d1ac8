"""What every KV cache offers: append new tokens, say how long each sequence is, hand decode a
reader of its contents (one tile at a time), report its memory, and attend a query to itself.

Contract for subclasses: `append` validates everything before it writes anything, so an error
(capacity, shapes, unknown sequence) leaves the cache exactly as it was.
"""

from __future__ import annotations

import torch

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
        if q.dim() != 4 or q.shape[0] != self.batch or q.shape[-1] != self.head_dim:
            raise ValueError(f"expected q of shape (B={self.batch}, Hq, Nq, D={self.head_dim}), got {tuple(q.shape)}")
        if q.shape[1] % self.heads_kv:
            raise ValueError(f"expected Hq to be a multiple of the cache's Hkv={self.heads_kv}, got {q.shape[1]}")
        return decode_with_reader(q, self.reader(), self.seqlens(), **kwargs)


def check_new_tokens(name: str, x: torch.Tensor, batch: int, heads: int, dim: int) -> int:
    """Validate new K or V tokens (B, Hkv, n, D); returns n."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != batch or x.shape[1] != heads \
            or x.shape[3] != dim:
        raise ValueError(f"expected {name} of shape (B={batch}, Hkv={heads}, n, D={dim}), got "
                         f"{tuple(getattr(x, 'shape', ()))}")
    return x.shape[2]
