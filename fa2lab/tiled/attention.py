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
from fa2lab.tiled.variants import TileVariants


@dataclass(frozen=True)
class TileSizes:
    """Tile shape of the PyTorch FA2. On a CPU, larger tiles amortise Python and bmm call
    overhead until the score tile (G*Br x Bc floats per head) falls out of cache."""

    block_q: int = 256  # Br: query rows per tile
    block_k: int = 256  # Bc: key rows per tile


DEFAULT_TILES = TileSizes()


class _TiledAttention(torch.autograd.Function):
    # bias and sinks are inputs (not only inside `variants`) so that autograd gives them gradients.
    @staticmethod
    def forward(ctx, q, k, v, bias, sinks, scale, causal, window_size, block_q, block_k, tracer, variants):
        out, lse = flash_forward(q, k, v, scale=scale, causal=causal, window_size=window_size,
                                 block_q=block_q, block_k=block_k, tracer=tracer, variants=variants)
        ctx.save_for_backward(q, k, v, out, lse)  # O(N): no probability matrix is kept (nor dropout's mask)
        ctx.cfg = dict(scale=scale, causal=causal, window_size=window_size, block_q=block_q, block_k=block_k,
                       variants=variants, bias_grad=bias is not None and ctx.needs_input_grad[3])
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dbias, dsinks = flash_backward(dout, dlse, q, k, v, out, lse, **ctx.cfg)
        return dq, dk, dv, dbias, dsinks, None, None, None, None, None, None, None


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
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
    variants=None,
):
    """FlashAttention-2 in PyTorch: exact attention in O(N) extra memory.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv) and, with
    `return_lse`, lse (B, Hq, Nq) (float32; float64 for float64 inputs). Differentiable in q, k, v
    (and through lse). `block_q`/`block_k` set Br/Bc; `tracer` (a `TileTracer`) records the schedule,
    tiles a mask_mod leaves empty included. The variants (softcap, alibi_slopes, attn_bias, sinks,
    dropout_p, generator, score_mod, mask_mod, block_mask) are `fa2lab.attention`'s; gradients
    reach attn_bias and sinks too. A block_mask sets the tile sizes (its BLOCK_SIZE).
    Inputs are validated by `fa2lab.attention`; call that for checked input and backend choice.
    """
    from fa2lab.variants.options import check_variants

    window_size = _checks.check_dense(q, k, v, window_size)
    scale = _checks.resolve_scale(softmax_scale, q.shape[-1])
    causal, return_lse = _checks.check_flag("causal", causal), _checks.check_flag("return_lse", return_lse)
    var = variants or check_variants(q, k, softcap=softcap, alibi_slopes=alibi_slopes, attn_bias=attn_bias,
                                     sinks=sinks, dropout_p=dropout_p, generator=generator, score_mod=score_mod,
                                     mask_mod=mask_mod, block_mask=block_mask)
    if var.block_mask is not None:
        bm = var.block_mask
        if (block_q or bm.block_q, block_k or bm.block_k) != (bm.block_q, bm.block_k):
            raise ValueError(f"block_mask describes {bm.block_q} x {bm.block_k} tiles, got block_q={block_q}, "
                             f"block_k={block_k}; leave them None or build the block mask with these sizes")
        block_q, block_k = bm.block_q, bm.block_k
    block_q = _checks.check_size("block_q", block_q, 1, optional=True) or DEFAULT_TILES.block_q
    block_k = _checks.check_size("block_k", block_k, 1, optional=True) or DEFAULT_TILES.block_k
    return tiled_attention_unchecked(q, k, v, causal=causal, window_size=window_size, scale=scale,
                                     return_lse=return_lse, block_q=block_q, block_k=block_k, tracer=tracer,
                                     variants=var)


def tiled_attention_unchecked(q, k, v, *, causal, window_size, scale, return_lse=False,
                              block_q=DEFAULT_TILES.block_q, block_k=DEFAULT_TILES.block_k, tracer=None,
                              variants=None):
    """`tiled_attention` on inputs already checked (fa2lab.backends runs this after fa2lab.attention
    validated them, so each call is validated once); scale is a float, variants a checked
    `fa2lab.variants.Variants` or None."""
    from fa2lab.variants.dropout import draw_seed

    if no_query_rows(q):  # B, Hq or Nq is 0: the tile loops would have nothing to split
        return empty_attention(q, k, v, (*q.shape[:3], v.shape[-1]), q.shape[:3], return_lse)
    tile_vars, bias, sinks = None, None, None
    if variants is not None and variants.any:
        seed = draw_seed(variants.generator) if variants.dropout_p > 0 else 0
        tile_vars = TileVariants(variants, seed, q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.device)
        bias, sinks = variants.attn_bias, variants.sinks
    out, lse = _TiledAttention.apply(q, k, v, bias, sinks, scale, causal, tuple(window_size), block_q, block_k,
                                     tracer, tile_vars)
    return (out, lse) if return_lse else out
