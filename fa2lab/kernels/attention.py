"""The Triton kernels joined by autograd: dense and varlen FA2, forward and backward.

Two implementations behind one choice made here per call: the Hopper kernels (hopper_fwd.py,
hopper_bwd.py: TMA descriptors, sm_90 tiles) where `hopper_eligible` holds, the portable kernels
(fwd.py, bwd.py: Ampere and newer, and the CPU interpreter) everywhere else.
While torch.compile traces, the same choice runs inside the custom operators below (autograd
registered for them); eager calls go through the autograd.Functions (an operator's dispatch costs
more than a small kernel). Variants run eagerly only.
"""

from __future__ import annotations

import logging

from typing import Optional

import torch
from torch import Tensor

from fa2lab.determinism import deterministic_requested
from fa2lab.kernels.bwd import flash_bwd_triton
from fa2lab.kernels.fwd import flash_fwd_triton, flash_fwd_varlen_triton
from fa2lab.kernels.hopper_config import gluon_fwd_wanted, hopper_bwd_wanted, hopper_eligible, tma_ok


_log = logging.getLogger("fa2lab")
_logged: set = set()


def _note(path: str, q) -> None:
    """Log which kernels run, once per distinct (path, device, dtype)."""
    key = (path, q.device, q.dtype)  # the device itself: str() of it costs a microsecond or two per call
    if key not in _logged:
        _logged.add(key)
        _log.info("Triton attention on %s %s: %s kernels", q.device, str(q.dtype).removeprefix("torch."), path)


def _fwd_impl(q, k, v, varlen: bool, variants=None):
    """(forward function, whether it is the Hopper one). variants (a KernelVariants, dense calls) take the
    same path as a plain call: both forwards run every variant with the same mask and semantics."""
    if hopper_eligible(q, k, v):
        from fa2lab.kernels.hopper_fwd import hopper_fwd, hopper_fwd_varlen

        if not varlen and variants is None and gluon_fwd_wanted(q, k, v):
            from fa2lab.kernels.gluon_fwd import gluon_fwd

            _note("Hopper (sm_90, Gluon: overlapped wgmma)", q)
            return gluon_fwd, True
        _note("Hopper (sm_90, TMA)", q)
        return (hopper_fwd_varlen if varlen else hopper_fwd), True
    _note("portable", q)
    return (flash_fwd_varlen_triton if varlen else flash_fwd_triton), False


def _bwd_impl(hopper: bool, dout, token_dim: int, head_dim: int, cfg: dict):
    """hopper_bwd where the Hopper kernels apply and measured faster (hopper_config.BWD_PORTABLE),
    flash_bwd_triton otherwise; both take cfg's variants (softcap, ALiBi, bias, sinks, dropout)."""
    causal = cfg["right"] >= 0 and cfg["left"] < 0
    if hopper and tma_ok(dout, token_dim) and hopper_bwd_wanted(head_dim, causal):
        from fa2lab.kernels.hopper_bwd import hopper_bwd

        return hopper_bwd
    return flash_bwd_triton


def kernel_forward(q, k, v, *, scale, left, right):
    """Dense (B, H, N, D) forward with the kernels `fa2lab.attention` would pick (Hopper or
    portable), no autograd: -> (out, lse fp32). For callers that run their own backward (ring
    blocks) or none (inference layers)."""
    fwd, _ = _fwd_impl(q, k, v, False)
    return fwd(q, k, v, scale=scale, left=left, right=right)


def kernel_backward(dout, dlse, q, k, v, out, lse, *, scale, left, right):
    """The backward matching `kernel_forward` (same choice as the autograd path): -> (dq, dk, dv)."""
    cfg = dict(scale=scale, left=left, right=right)
    bwd = _bwd_impl(hopper_eligible(q, k, v), dout, 2, max(q.shape[-1], v.shape[-1]), cfg)
    return bwd(dout, dlse, q, k, v, out, lse, **cfg)


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, left, right):
        fwd, ctx.hopper = _fwd_impl(q, k, v, False)
        out, lse = fwd(q, k, v, scale=scale, left=left, right=right)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = dict(scale=scale, left=left, right=right)
        ctx.deterministic = deterministic_requested()  # fa2lab.determinism: asked for at the call
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        bwd = _bwd_impl(ctx.hopper, dout, 2, max(q.shape[-1], v.shape[-1]), ctx.cfg)
        dq, dk, dv = bwd(dout, dlse, q, k, v, out, lse, **ctx.cfg, deterministic=ctx.deterministic)
        return dq, dk, dv, None, None, None


class _TritonVariantAttention(torch.autograd.Function):
    """With soft-capping, ALiBi, a bias, sinks or dropout (kernels/variants.py). sinks is an input
    so that it gets a gradient; the bias is read, not differentiated (the dispatch sends bias.grad
    to the tiled backend); dropout's seed is kept, its mask is regenerated in the backward."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, scale, left, right, kvars):
        fwd, ctx.hopper = _fwd_impl(q, k, v, False, kvars)
        out, lse = fwd(q, k, v, scale=scale, left=left, right=right, variants=kvars)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = dict(scale=scale, left=left, right=right, variants=kvars)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        # Chosen afresh (not by the forward's path): both paths read the same lse and dropout mask.
        bwd = _bwd_impl(hopper_eligible(q, k, v), dout, 2, max(q.shape[-1], v.shape[-1]), ctx.cfg)
        dq, dk, dv, dsinks = bwd(dout, dlse, q, k, v, out, lse, **ctx.cfg)
        return dq, dk, dv, dsinks, None, None, None, None


class _TritonVarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
        fwd, ctx.hopper = _fwd_impl(q, k, v, True)
        out, lse = fwd(q, k, v, cu_q, cu_k, max_q, scale=scale, left=left, right=right)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.cfg = dict(scale=scale, left=left, right=right, max_q=max_q, max_k=max_k)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv = _bwd_impl(ctx.hopper, dout, 0, max(q.shape[-1], v.shape[-1]), ctx.cfg)(
            dout, dlse, q, k, v, out, lse, cu_q=cu_q, cu_k=cu_k, **ctx.cfg)
        return dq, dk, dv, None, None, None, None, None, None, None


# The same choice as torch custom operators, for torch.compile (see the module docstring).
@torch.library.custom_op("fa2lab::attn_fwd", mutates_args=())
def attn_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, left: int, right: int) -> tuple[Tensor, Tensor]:
    return kernel_forward(q, k, v, scale=scale, left=left, right=right)


@attn_fwd.register_fake
def _(q, k, v, scale, left, right):
    b, h, n, _ = q.shape
    return q.new_empty(b, h, n, v.shape[-1]), q.new_empty(b, h, n, dtype=torch.float32)


@torch.library.custom_op("fa2lab::attn_bwd", mutates_args=())
def attn_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             scale: float, left: int, right: int) -> tuple[Tensor, Tensor, Tensor]:
    return kernel_backward(dout.contiguous(), dlse, q, k, v, out, lse, scale=scale, left=left, right=right)


@attn_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, scale, left, right):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attn_setup(ctx, inputs, output):
    q, k, v, scale, left, right = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.cfg = (scale, left, right)


def _attn_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dq, dk, dv = attn_bwd(dout, dlse, q, k, v, out, lse, *ctx.cfg)
    return dq, dk, dv, None, None, None


attn_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)


@torch.library.custom_op("fa2lab::varlen_fwd", mutates_args=())
def varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale: float,
               left: int, right: int) -> tuple[Tensor, Tensor]:
    fwd, _ = _fwd_impl(q, k, v, True)
    return fwd(q, k, v, cu_q, cu_k, max_q, scale=scale, left=left, right=right)


@varlen_fwd.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
    total, h, _ = q.shape
    return q.new_empty(total, h, v.shape[-1]), q.new_empty(h, total, dtype=torch.float32)


@torch.library.custom_op("fa2lab::varlen_bwd", mutates_args=())
def varlen_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
               cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale: float, left: int,
               right: int) -> tuple[Tensor, Tensor, Tensor]:
    cfg, dout = dict(scale=scale, left=left, right=right, max_q=max_q, max_k=max_k), dout.contiguous()
    bwd = _bwd_impl(hopper_eligible(q, k, v), dout, 0, max(q.shape[-1], v.shape[-1]), cfg)
    return bwd(dout, dlse, q, k, v, out, lse, cu_q=cu_q, cu_k=cu_k, **cfg)


@varlen_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right = inputs
    ctx.save_for_backward(q, k, v, *output, cu_q, cu_k)
    ctx.cfg = (max_q, max_k, scale, left, right)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dq, dk, dv = varlen_bwd(dout, dlse, q, k, v, out, lse, cu_q, cu_k, *ctx.cfg)
    return dq, dk, dv, None, None, None, None, None, None, None


varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


def triton_attention(q, k, v, *, scale, left, right, return_lse=False, variants=None):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out [, lse (B, Hq, Nq) fp32].
    variants: a checked fa2lab.variants.Variants (softcap, ALiBi, bias, sinks, dropout) or None."""
    if variants is not None and variants.any:
        from fa2lab.kernels.variants import KernelVariants
        from fa2lab.variants.dropout import draw_seed

        seed = draw_seed(variants.generator) if variants.dropout_p > 0 else 0
        kvars = KernelVariants(variants, q, seed, scale)
        out, lse = _TritonVariantAttention.apply(q, k, v, variants.sinks, scale, left, right, kvars)
        return (out, lse) if return_lse else out
    if torch.compiler.is_compiling():
        out, lse = attn_fwd(q, k, v, float(scale), int(left), int(right))
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _TritonAttention.apply(q, k, v, scale, left, right)
    else:  # nothing to differentiate: the forward alone, without the autograd.Function's cost per call
        out, lse = kernel_forward(q, k, v, scale=scale, left=left, right=right)
    return (out, lse) if return_lse else out


def triton_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, left, right, return_lse=False):
    """Packed q (total_q, Hq, D), k/v (total_k, Hkv, D) -> out (total_q, Hq, Dv) [, lse (Hq, total_q)]."""
    if torch.compiler.is_compiling():
        out, lse = varlen_fwd(q, k, v, cu_q, cu_k, int(max_q), int(max_k), float(scale), int(left), int(right))
    else:
        out, lse = _TritonVarlenAttention.apply(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right)
    return (out, lse) if return_lse else out
