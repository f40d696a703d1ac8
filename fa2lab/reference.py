"""The naive materialised oracle: S = q k^T, P = softmax(S), O = P v, all (Nq, Nk) in memory.

This is the ground truth that every other algorithm is tested against (in float64), and the
"standard attention" of the benchmarks. It is deliberately the plainest possible code.
"""

from __future__ import annotations

import torch

from fa2lab import _checks, masks


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softmax_scale: float | None = None,
    upcast: bool = True,
    return_lse: bool = False,
):
    """Naive attention with fa2lab's semantics (see `fa2lab.masks`).

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv) in q's dtype,
    and with `return_lse` also lse (B, Hq, Nq) float32 (float64 for float64 inputs).

    upcast=True computes in float32 (float64 stays float64): the oracle. upcast=False computes in
    the input dtype: "what plain PyTorch gets at this precision", the yardstick for low-precision
    error. Rows that may see no key return zeros and lse = -inf.
    """
    _checks.check_tensor("q", q, 4, "(B, Hq, Nq, D)")
    _checks.check_tensor("k", k, 4, "(B, Hkv, Nk, D)")
    _checks.check_tensor("v", v, 4, "(B, Hkv, Nk, Dv)")
    _checks.check_same_dtype_device(q=q, k=k, v=v)
    _checks.check_head_dims(q.shape[-1], k.shape[-1])
    _checks.check_heads(q.shape[1], k.shape[1], v.shape[1])
    window_size = _checks.check_window(window_size)
    causal, return_lse = _checks.check_flag("causal", causal), _checks.check_flag("return_lse", return_lse)
    upcast = _checks.check_flag("upcast", upcast)
    scale = _checks.resolve_scale(softmax_scale, q.shape[-1])
    dtype = q.dtype
    if upcast and dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1] if k.shape[1] else 1  # Hq = Hkv = 0: no heads
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, Nk, D)
    v = v.repeat_interleave(group, dim=1)  # (B, Hq, Nk, Dv)
    nq, nk = q.shape[2], k.shape[2]

    s = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, Nq, Nk)
    visible = masks.dense_mask(nq, nk, causal, window_size, device=q.device)  # (Nq, Nk)
    has_key = visible.any(dim=-1, keepdim=True)  # (Nq, 1)
    s = s.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(~has_key, 0.0)  # (B, Hq, Nq, Nk)
    out = (p @ v).to(dtype)  # (B, Hq, Nq, Dv)
    if not return_lse:
        return out
    lse = torch.logsumexp(s, dim=-1).masked_fill(~has_key[:, 0], float("-inf"))  # (B, Hq, Nq)
    return out, lse.to(torch.float64 if lse.dtype == torch.float64 else torch.float32)
