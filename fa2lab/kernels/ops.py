"""The Triton decode entry points as torch custom operators (`torch.library.custom_op`); the
dense and varlen ones (fa2lab::attn_fwd / attn_bwd / varlen_fwd / varlen_bwd) sit with their
autograd in kernels/attention.py.

torch.compile sees each kernel call as one opaque operator with a fake (shape-only) implementation,
so `torch.compile(fullgraph=True)` traces `fa2lab.attention`, `varlen_attention` and
`decode_attention` without a graph break, and CUDA graphs capture them; autograd is registered
for the forward kernels (their backward is the Triton backward). Every op runs the kernel entry that
fa2lab's dispatch picks (kernels/attention.py: the Hopper or the portable kernels), with the same
arguments, so results are those of eager calls.

Eager calls skip the operator layer: a custom op's Python dispatch costs about 0.1-0.4 ms a call
(measured on this repo's CPU: 438 us against 9 us for the bare function), more than a whole
decode step's kernel. kernels/attention.py and `decode` / `append_kv` below call the operators
while torch.compile traces and the kernels directly otherwise.

    fa2lab::decode                    fused split-K decode, dense or paged (mutates its workspace)
    fa2lab::append_kv                 in-place K/V append at each sequence's length (mutates the cache)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fa2lab.kernels import decode as kernel_decode
from fa2lab.kernels.decode import append_kv_triton, decode_config, decode_workspace


@torch.library.custom_op("fa2lab::decode", mutates_args=("o_part", "l_part", "locks"))
def decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, block_table: Optional[Tensor],
              o_part: Tensor, l_part: Tensor, locks: Tensor, scale: float, left: int, right: int, num_splits: int,
              n_new: int, block_m: int, block_n: int, num_warps: int, num_stages: int, softcap: float = 0.0,
              alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return kernel_decode.decode_triton(q, k_cache, v_cache, seqlens, scale=scale, left=left, right=right,
                                       num_splits=num_splits, block_table=block_table, n_new=n_new,
                                       workspace=(o_part, l_part, locks), config=config, softcap=softcap,
                                       alibi_slopes=alibi_slopes, sinks=sinks)


@decode_op.register_fake
def _(q, k_cache, v_cache, seqlens, block_table, o_part, l_part, locks, scale, left, right, num_splits, n_new,
      block_m, block_n, num_warps, num_stages, softcap=0.0, alibi_slopes=None, sinks=None):
    b, h, n, _ = q.shape
    return q.new_empty(b, h, n, v_cache.shape[-1]), q.new_empty(b, h, n, dtype=torch.float32)


@torch.library.custom_op("fa2lab::append_kv", mutates_args=("k_cache", "v_cache"))
def append_kv_op(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, seqlens: Tensor,
                 block_table: Optional[Tensor]) -> None:
    append_kv_triton(k_cache, v_cache, k_new, v_new, seqlens, block_table)


@append_kv_op.register_fake
def _(k_cache, v_cache, k_new, v_new, seqlens, block_table):
    return None


def append_kv(k_cache, v_cache, k_new, v_new, seqlens, block_table=None) -> None:
    if torch.compiler.is_compiling():
        append_kv_op(k_cache, v_cache, k_new, v_new, seqlens, block_table)
    else:
        append_kv_triton(k_cache, v_cache, k_new, v_new, seqlens, block_table)


def decode(q, k_cache, v_cache, seqlens, block_table, plan, return_lse=True, variants=None):
    """The planned decode: eager calls run the plan's `DecodeLaunch` (everything precomputed; an
    unkept plan builds one), torch.compile traces `fa2lab::decode` with the plan's workspace.
    variants: the call's checked fa2lab.variants.Variants (softcap, ALiBi, sinks) or None."""
    softcap, slopes, sinks = _kernel_variants(variants)
    if not torch.compiler.is_compiling():
        if plan.launch is not None:
            return plan.launch(q, k_cache, v_cache, seqlens, block_table, return_lse, slopes, sinks)
        left, right = plan.window
        return kernel_decode.decode_triton(q, k_cache, v_cache, seqlens, scale=plan.scale, left=left, right=right,
                                           num_splits=plan.num_splits, block_table=block_table, n_new=plan.n_new,
                                           workspace=plan.workspace or None, config=plan.config or None,
                                           return_lse=return_lse, softcap=softcap, alibi_slopes=slopes, sinks=sinks)
    b, hq, nq, _ = q.shape
    config = plan.config or decode_config((hq // k_cache.shape[1]) * nq, max(q.shape[-1], v_cache.shape[-1]),
                                          q.dtype)
    space = plan.workspace or decode_workspace(b, hq, k_cache.shape[1], nq, v_cache.shape[-1], plan.num_splits,
                                               config, q.device)
    left, right = plan.window
    return decode_op(q, k_cache, v_cache, seqlens, block_table, *space, plan.scale, left, right, plan.num_splits,
                     plan.n_new, config["BLOCK_M"], config["BLOCK_N"], config["num_warps"], config["num_stages"],
                     softcap, slopes, sinks)


def _kernel_variants(var):
    """(softcap, slopes fp32 (B, Hq), sinks fp32 (Hq,) contiguous) as the kernel reads them."""
    if var is None:
        return 0.0, None, None
    slopes = var.alibi_slopes.float() if var.alibi_slopes is not None else None
    sinks = var.sinks.float().contiguous() if var.sinks is not None else None
    return var.softcap, slopes, sinks
