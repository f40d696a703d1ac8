"""QuantizedKVCache: int8 K/V with one scale per (sequence, head, token), dequantised tile by tile.

Symmetric per-token quantisation of a vector x (D,):

    s = amax(|x|) / 127          x_q = round(x / s) in [-127, 127]          x_hat = x_q * s

so every element is off by at most s / 2, half a quantisation step of its own token: one outlier
token spoils no other. Scales are float32 (B, Hkv, max_len, 1): they cost 4 bytes per token and
head against D bytes of int8 (3% at D = 128), and buy exactness that float16 scales lack: a
float16 scale overflows for bfloat16 inputs above 65504 * 127, goes subnormal (losing precision)
for tokens with amax < 127 * 2^-14 ~ 0.008 and underflows to 0 below ~1e-5.

Memory per token and head, K and V: 2 * (D + 4) bytes against 2 * 2 * D for float16, a ratio of
(D + 4) / (2 D) ~ 0.52 at D = 128. The reader dequantises one tile at a time into the decode's
accumulation dtype; no full-precision copy of the cache is ever made.
"""

from __future__ import annotations

import torch

from fa2lab import _checks
from fa2lab.kvcache.base import KVCache, check_append, check_sizes

QMAX = 127  # symmetric: -128 is left unused so that x_q = -x_q stays representable


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) float -> x_q int8 (..., D), s float32 (..., 1) with x ~ x_q * s, |error| <= s / 2."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xw = x.to(work)
    s = (xw.abs().amax(dim=-1, keepdim=True) / QMAX).to(torch.float32)  # (..., 1)
    # Quantise with the stored (rounded) scale so that dequantisation uses the same one; an
    # all-zero token has s = 0 and quantises to 0. The clamp covers amax / s rounding to 127.5.
    x_q = (xw / s.to(work).masked_fill(s == 0, 1.0)).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return x_q, s


def dequantize(x_q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x_q int8 (..., D), s (..., 1) -> x_hat (..., D) in dtype."""
    work = torch.float64 if dtype == torch.float64 else torch.float32  # one rounding, at the end
    return (x_q.to(work) * s.to(work)).to(dtype)


class QuantizedKVCache(KVCache):
    def __init__(self, batch: int, heads_kv: int, max_len: int, head_dim: int, *, head_dim_v: int | None = None,
                 dtype=torch.float16, device="cpu"):
        """dtype: the dtype of the K/V you append and of the queries (compute/output dtype); the
        storage is int8 plus float32 scales whatever it is."""
        check_sizes(batch=batch, heads_kv=heads_kv, max_len=max_len, head_dim=head_dim, head_dim_v=head_dim_v)
        _checks.check_float_dtype("the compute dtype", dtype)
        self.batch, self.heads_kv, self.max_len, self.head_dim = batch, heads_kv, max_len, head_dim
        self.head_dim_v = head_dim_v or head_dim
        self.dtype = dtype
        self.k_q = torch.zeros(batch, heads_kv, max_len, head_dim, dtype=torch.int8, device=device)  # (B, Hkv, N, D)
        self.device = self.k_q.device  # "cuda" resolved to "cuda:0": compared with inputs' devices
        self.v_q = torch.zeros(batch, heads_kv, max_len, self.head_dim_v, dtype=torch.int8, device=device)
        self.k_scale = torch.zeros(batch, heads_kv, max_len, 1, dtype=torch.float32, device=device)  # (B, Hkv, N, 1)
        self.v_scale = torch.zeros(batch, heads_kv, max_len, 1, dtype=torch.float32, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)

    def seqlens(self) -> torch.Tensor:
        return self.lengths

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Quantise and write n new tokens per sequence: k (B, Hkv, n, D), v (B, Hkv, n, Dv) in the
        cache's dtype. With `lengths` (int (B,), each <= n) sequence b takes its first lengths[b]."""
        _, take = check_append(self, k, v, lengths, capacity=self.max_len,
                               fix="allocate a larger cache or use SlidingWindowKVCache / PagedKVCache")
        for name, x in (("k", k), ("v", v)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"expected finite {name}: int8 with a per-token scale cannot hold inf or nan; "
                                 f"check the model for overflow (e.g. run it in bfloat16 or float32)")
        k_q, k_s = quantize(k)  # (B, Hkv, n, D), (B, Hkv, n, 1)
        v_q, v_s = quantize(v)
        for b in range(self.batch):  # only after every check: an error above changes nothing
            start, t = int(self.lengths[b]), int(take[b])
            self.k_q[b, :, start:start + t] = k_q[b, :, :t]
            self.v_q[b, :, start:start + t] = v_q[b, :, :t]
            self.k_scale[b, :, start:start + t] = k_s[b, :, :t]
            self.v_scale[b, :, start:start + t] = v_s[b, :, :t]
        self.lengths += take.to(torch.int32)

    def reader(self):
        return QuantizedReader(self.k_q, self.k_scale, self.v_q, self.v_scale)

    def reset(self) -> None:
        """Forget every sequence; buffers are kept (and their addresses)."""
        self.lengths.zero_()

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_q, self.v_q, self.k_scale, self.v_scale))

    def bytes_per_token(self) -> float:
        """Bytes per token of one sequence (all heads, K and V, scales included)."""
        return self.memory_bytes() / (self.batch * self.max_len)


class QuantizedReader:
    """int8 k_q (B, Hkv, Nmax, D), v_q (B, Hkv, Nmax, Dv) with float32 scales (B, Hkv, Nmax, 1)."""

    def __init__(self, k_q, k_scale, v_q, v_scale):
        self.k_q, self.k_scale, self.v_q, self.v_scale = k_q, k_scale, v_q, v_scale
        self.batch, self.heads_kv, self.capacity, self.head_dim = k_q.shape
        self.head_dim_v = v_q.shape[-1]

    def read(self, j0, j1, dtype):
        k = dequantize(self.k_q[:, :, j0:j1], self.k_scale[:, :, j0:j1], dtype)  # (B, Hkv, Bc, D)
        v = dequantize(self.v_q[:, :, j0:j1], self.v_scale[:, :, j0:j1], dtype)  # (B, Hkv, Bc, Dv)
        return k, v
