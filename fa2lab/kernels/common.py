"""Pieces shared by the Triton kernels (fwd.py, bwd.py, decode.py), written once.

Device side (`@triton.jit`): the dot product with its exact-fp32 switch, the per-sequence offsets
of a dense or varlen batch, and one step of the online softmax in the log2 domain (Algorithm 1,
lines 8-10). Host side: LOG2E, the power-of-two padding of head dims, the interpreter switch and
the exact-dot rule. The readable twin of `online_softmax_step` is
fa2lab/tiled/softmax.online_softmax_step (tests: tests/test_triton.py, tests/test_tiled.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E); logits are scaled by scale * LOG2E on the host
LOG2E_K: tl.constexpr = tl.constexpr(LOG2E)  # the same constant, readable inside a kernel


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b; IEEE computes it exactly in fp32 (no tf32), for fp32 inputs and the interpreter."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def seq_offsets(CU_Q, CU_K, b, Nq, Nk, IS_VARLEN: tl.constexpr):
    """(q_start, nq, k_start, nk) of sequence b: packed through cu_seqlens, or the dense (Nq, Nk)."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        return q_start, tl.load(CU_Q + b + 1) - q_start, k_start, tl.load(CU_K + b + 1) - k_start
    return 0, Nq, 0, Nk


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One tile of the online softmax, log2 domain: s (BLOCK_M, BLOCK_N) logits (masked -inf),
    m_i, l_i (BLOCK_M,) -> p (unnormalised probabilities), alpha (the rescale factor of what was
    accumulated so far), the new l_i and m_i. The caller finishes line 10:
    acc = acc * alpha[:, None] + p @ V_j."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet: exp2(-inf) = 0, not nan
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def ieee_dot(dtype: torch.dtype) -> bool:
    """fp32 inputs get exact fp32 dots (not tf32: fa2lab's error rule compares with fp32 PyTorch).
    Under the interpreter bf16 dots are computed in fp32 too: triton 3.9's interpreter returns
    garbage for a bf16 tl.dot (a bf16 product is exact in fp32, so results are the same)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def pow2(d: int) -> int:
    """The tile width for a head dim: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (d - 1).bit_length())


__all__ = ["LOG2E", "LOG2E_K", "dot", "ieee_dot", "interpreting", "online_softmax_step", "pow2", "seq_offsets"]
