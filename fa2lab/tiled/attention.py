"""`tiled_attention`: the FA2 forward and backward of this package joined by autograd.

Readable twin of fa2lab/kernels/attention.py (the Triton kernels joined the same way).
Tests: tests/test_tiled.py, tests/test_properties.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fa2lab import _checks
from fa2lab._empty import empty_attention, no_query_rows
from fa2lab.tiled.backward import flash_backward
from fa2lab.tiled.forward import flash_forward


@dataclass(frozen=True)
class TileSizes:
    """Tile shape of the PyTorch FA2. On a CPU, larger tiles amortise Python and bmm call
    overhead until the score tile (G*Br x Bc floats per head) falls out of cache."""

    block_q: int = 256  # Br: query rows per tile
    block_k: int = 256  # Bc: key rows per tile


DEFAULT_TILES = TileSizes()


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, window_size, block_q, block_k, tracer):
        out, lse = flash_forward(q, k, v, scale=scale, causal=causal, window_size=window_size,
                                 block_q=block_q, block_k=block_k, tracer=tracer)
        ctx.save_for_backward(q, k, v, out, lse)  # O(N): no probability matrix is kept
        ctx.cfg = dict(scale=scale, causal=causal, window_size=window_size, block_q=block_q, block_k=block_k)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = flash_backward(dout, dlse, q, k, v, out, lse, **ctx.cfg)
        return dq, dk, dv, None, None, None, None, None, None


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softmax_scale: float | None = None,
    return_lse: bool = False,
    block_q: int | None = None,
    block_k: int | None = None,
    tracer=None,
):
    """FlashAttention-2 in PyTorch: exact attention in O(N) extra memory.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv) and, with
    `return_lse`, lse (B, Hq, Nq) (float32; float64 for float64 inputs). Differentiable in q, k, v
    (and through lse). `block_q`/`block_k` set Br/Bc; `tracer` (a `TileTracer`) records the schedule.
    Inputs are validated by `fa2lab.attention`; call that for checked input and backend choice.
    """
    window_size = _checks.check_dense(q, k, v, window_size)
    scale = _checks.resolve_scale(softmax_scale, q.shape[-1])
    causal, return_lse = _checks.check_flag("causal", causal), _checks.check_flag("return_lse", return_lse)
    block_q = _checks.check_size("block_q", block_q, 1, optional=True) or DEFAULT_TILES.block_q
    block_k = _checks.check_size("block_k", block_k, 1, optional=True) or DEFAULT_TILES.block_k
    return tiled_attention_unchecked(q, k, v, causal=causal, window_size=window_size, scale=scale,
                                     return_lse=return_lse, block_q=block_q, block_k=block_k, tracer=tracer)


def tiled_attention_unchecked(q, k, v, *, causal, window_size, scale, return_lse=False,
                              block_q=DEFAULT_TILES.block_q, block_k=DEFAULT_TILES.block_k, tracer=None):
    """`tiled_attention` on inputs already checked (fa2lab.backends runs this after fa2lab.attention
    validated them, so each call is validated once); scale is a float."""
    if no_query_rows(q):  # B, Hq or Nq is 0: the tile loops would have nothing to split
        return empty_attention(q, k, v, (*q.shape[:3], v.shape[-1]), q.shape[:3], return_lse)
    out, lse = _TiledAttention.apply(q, k, v, scale, causal, tuple(window_size), block_q, block_k, tracer)
    return (out, lse) if return_lse else out
