"""The Triton kernels joined by autograd: dense and varlen FA2, forward and backward."""

from __future__ import annotations

import torch

from fa2lab.kernels.bwd import flash_bwd_triton
from fa2lab.kernels.fwd import flash_fwd_triton, flash_fwd_varlen_triton


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, left, right):
        out, lse = flash_fwd_triton(q, k, v, scale=scale, left=left, right=right)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = dict(scale=scale, left=left, right=right)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv = flash_bwd_triton(dout, dlse, q, k, v, out, lse, **ctx.cfg)
        return dq, dk, dv, None, None, None


class _TritonVarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
        out, lse = flash_fwd_varlen_triton(q, k, v, cu_q, cu_k, max_q, scale=scale, left=left, right=right)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.cfg = dict(scale=scale, left=left, right=right, max_q=max_q, max_k=max_k)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv = flash_bwd_triton(dout, dlse, q, k, v, out, lse, cu_q=cu_q, cu_k=cu_k, **ctx.cfg)
        return dq, dk, dv, None, None, None, None, None, None, None


def triton_attention(q, k, v, *, scale, left, right, return_lse=False):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out [, lse (B, Hq, Nq) fp32]."""
    out, lse = _TritonAttention.apply(q, k, v, scale, left, right)
    return (out, lse) if return_lse else out


def triton_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, left, right, return_lse=False):
    """Packed q (total_q, Hq, D), k/v (total_k, Hkv, D) -> out (total_q, Hq, Dv) [, lse (Hq, total_q)]."""
    out, lse = _TritonVarlenAttention.apply(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right)
    return (out, lse) if return_lse else out
