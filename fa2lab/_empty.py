"""Attention with no query rows (B, Hq or Nq is 0): correctly shaped empty outputs, zero gradients.

Entry points validate every argument first and then return this instead of launching kernels or
tile loops that divide by a zero size. Zero key columns (Nk = 0) are not empty in this sense: each
query row then has an output of zeros and lse = -inf, which the backends compute themselves.
"""

from __future__ import annotations

import torch


def no_query_rows(q: torch.Tensor) -> bool:
    """q (B, Hq, Nq, D) or packed (total_q, Hq, D): True when there is no query row at all."""
    return q.shape[:-1].numel() == 0


def lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


class _NoRows(torch.autograd.Function):
    """out of `shape` (holding no element) that depends on q, k, v: their gradients are zeros."""

    @staticmethod
    def forward(ctx, q, k, v, shape):
        ctx.meta = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return q.new_zeros(shape)

    @staticmethod
    def backward(ctx, grad):
        grads = tuple(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.meta)
        return (*grads, None)


def empty_attention(q, k, v, out_shape, lse_shape, return_lse: bool):
    """The result of attention with no query rows: out (out_shape) in q's dtype, lse (lse_shape)."""
    out = _NoRows.apply(q, k, v, tuple(out_shape))
    if not return_lse:
        return out
    return out, torch.full(tuple(lse_shape), float("-inf"), dtype=lse_dtype(q), device=q.device)
