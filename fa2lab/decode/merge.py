"""Merging partial attention results by their log-sum-exp (FlashInfer's merge_state).

Attention over a key set K = K_a u K_b (disjoint) can be computed from the two halves alone:
with lse = log(sum exp(s)) over each half,

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

This is what makes split-K decoding (each split a chunk of the cache), paged attention and ring
attention exact. A part that saw no key has lse = -inf and weight 0; if no part saw a key the
result is 0 with lse = -inf, as for a single call.

Fast twin: the merge kernel of fa2lab/kernels/decode.py. Tests: tests/test_decode.py, tests/test_ring.py.
"""

from __future__ import annotations

import torch

from fa2lab import _checks

NEG_INF = float("-inf")


def _check_pair(out: torch.Tensor, lse: torch.Tensor, name: str) -> None:
    _checks.check_floating(f"out_{name}", out)  # integer parts would merge into truncated weights
    _checks.check_floating(f"lse_{name}", lse)
    if out.shape[:-1] != lse.shape:
        raise ValueError(
            f"expected {name} lse to have shape out.shape[:-1] = {tuple(out.shape[:-1])}, "
            f"got {tuple(lse.shape)}; out is (..., Nq, Dv) and lse (..., Nq)"
        )


def merge_states(out_a, lse_a, out_b, lse_b):
    """Merge two partial results over disjoint key sets.

    out_*: (..., Nq, Dv); lse_*: (..., Nq) -> (out (..., Nq, Dv) in out_a's dtype, lse (..., Nq) float32
    (float64 if the inputs are)). Commutative, and associative up to rounding.
    """
    _check_pair(out_a, lse_a, "a")
    _check_pair(out_b, lse_b, "b")
    if out_a.shape != out_b.shape:
        raise ValueError(f"expected both parts to have one shape, got {tuple(out_a.shape)} and {tuple(out_b.shape)}")
    return merge_states_stack(torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]))


def merge_states_stack(outs: torch.Tensor, lses: torch.Tensor, dim: int = 0):
    """Merge S partial results stacked along `dim`: outs (S, ..., Nq, Dv), lses (S, ..., Nq)."""
    _check_pair(outs, lses, "stacked")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -lses.dim() <= dim < lses.dim():
        raise ValueError(f"expected dim to be an axis of lses (..., Nq), in [{-lses.dim()}, {lses.dim()}), got "
                         f"{dim!r}; the parts are stacked along it")
    dim = dim % lses.dim()  # an axis of lses; outs has the same one before its Dv axis
    acc_t = torch.float64 if lses.dtype == torch.float64 or outs.dtype == torch.float64 else torch.float32
    lses = lses.to(acc_t)
    lse = torch.logsumexp(lses, dim=dim)  # (..., Nq); -inf when every part is empty
    lse_ref = lse.masked_fill(lse == NEG_INF, 0.0).unsqueeze(dim)  # avoid -inf - -inf
    weights = (lses - lse_ref).exp()  # (S, ..., Nq), 0 for empty parts
    out = (outs.to(acc_t) * weights.unsqueeze(-1)).sum(dim=dim)  # (..., Nq, Dv)
    return out.to(outs.dtype), lse
