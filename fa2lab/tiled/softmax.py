"""One step of FA2's online softmax in PyTorch (Algorithm 1, lines 8-10), written once.

Used by the tiled forward (fa2lab/tiled/forward.py), the split-K decode (fa2lab/decode/splitk.py)
and the notebook-01 trace (fa2lab/viz/softmax.py). Its Triton twin, in the log2 domain, is
fa2lab/kernels/common.online_softmax_step. Tests: tests/test_tiled.py, tests/test_decode.py,
tests/test_viz.py.

    m'    = max(m_i, rowmax(S))
    alpha = exp(m_i - m')                  rescale factor of everything accumulated so far
    P     = exp(S - m')
    l_i   = alpha l_i + rowsum(P)
    acc   = alpha acc + P V_j              line 10
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def online_softmax_step(s: torch.Tensor, m_i: torch.Tensor, l_i: torch.Tensor, acc: torch.Tensor,
                        v: torch.Tensor, drop: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """s (..., R, Bc) scores of one tile (masked entries -inf), m_i and l_i (..., R, 1),
    acc (..., R, Dv), v (..., Bc, Dv) -> (m_i, l_i, acc, alpha) after the tile. drop (..., R, Bc),
    dropout's Z / (1 - p), multiplies P after l_i has summed it (the softmax stays undropped).

    In place on s (it becomes P), l_i and acc, so a loop allocates nothing per tile but S."""
    m_new = torch.maximum(m_i, s.amax(dim=-1, keepdim=True))
    # A row that has seen only masked keys so far keeps m = -inf; use 0 as its reference so
    # exp(-inf - 0) = 0 instead of exp(-inf - -inf) = nan.
    m_ref = m_new.masked_fill(m_new == NEG_INF, 0.0)
    p = s.sub_(m_ref).exp_()  # (..., R, Bc)
    alpha = (m_i - m_ref).exp_()  # (..., R, 1)
    l_i = l_i.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
    if drop is not None:
        p = p.mul_(drop)
    acc = acc.mul_(alpha)
    acc = acc.baddbmm_(p, v) if acc.dim() == 3 else acc.add_(p @ v)  # (..., R, Dv)
    return m_new, l_i, acc, alpha


__all__ = ["online_softmax_step"]
