"""The naive materialised oracle: S = q k^T, P = softmax(S), O = P v, all (Nq, Nk) in memory.

This is the ground truth that every other algorithm is tested against (in float64), and the
"standard attention" of the benchmarks. It is deliberately the plainest possible code; the
variants (soft-capping, ALiBi, bias, sinks, dropout, score/mask functions) are applied by the same
functions the tiled backend uses (`fa2lab.variants`), and autograd differentiates all of it.
"""

from __future__ import annotations

import torch

from fa2lab import _checks, masks
from fa2lab.variants import dropout as _dropout
from fa2lab.variants.options import check_variants
from fa2lab.variants.scores import dense_index, logits, mod_visible


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
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    dropout_mask: torch.Tensor | None = None,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
    variants=None,
):
    """Naive attention with fa2lab's semantics (see `fa2lab.masks`, `fa2lab.variants`).

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv) in q's dtype,
    and with `return_lse` also lse (B, Hq, Nq) float32 (float64 for float64 inputs).

    upcast=True computes in float32 (float64 stays float64): the oracle. upcast=False computes in
    the input dtype: "what plain PyTorch gets at this precision", the yardstick for low-precision
    error. Rows that may see no key return zeros and lse = -inf (sinks[h] with sinks).
    dropout_mask (B, Hq, Nq, Nk) bool replays a given keep mask (`fa2lab.dropout_mask`); without
    it, dropout draws one from `generator` as the tiled backend does. `variants`: an already
    checked `fa2lab.variants.Variants` instead of the separate options.
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
    var = variants or check_variants(q, k, softcap=softcap, alibi_slopes=alibi_slopes, attn_bias=attn_bias,
                                     sinks=sinks, dropout_p=dropout_p, generator=generator, score_mod=score_mod,
                                     mask_mod=mask_mod, block_mask=block_mask)
    dtype = q.dtype
    if upcast and dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1] if k.shape[1] else 1  # Hq = Hkv = 0: no heads
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, Nk, D)
    v = v.repeat_interleave(group, dim=1)  # (B, Hq, Nk, Dv)
    b, hq, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]

    s = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, Nq, Nk)
    visible = masks.dense_mask(nq, nk, causal, window_size, device=q.device)  # (Nq, Nk)
    if var.any:
        idx = dense_index(b, hq, 0, nq, 0, nk, q.device)
        s, _ = logits(s, var, idx, nq, nk)
        keep = mod_visible(var, idx)
        visible = visible if keep is None else visible & keep  # (B or 1, Hq or 1, Nq, Nk)
    visible = visible.expand(b, hq, nq, nk)
    has_key = visible.any(dim=-1, keepdim=True)  # (B, Hq, Nq, 1)
    s = s.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
    if var.sinks is None:
        lse = torch.logsumexp(s, dim=-1).masked_fill(~has_key[..., 0], float("-inf"))  # (B, Hq, Nq)
        p = torch.softmax(s, dim=-1).masked_fill(~has_key, 0.0)  # (B, Hq, Nq, Nk)
    else:  # the sink is one more logit per row whose value vector is zero
        s = s.masked_fill(~has_key, float("-inf"))
        sink = var.sinks.to(s.dtype).view(1, hq, 1, 1).expand(b, hq, nq, 1)
        lse = torch.logsumexp(torch.cat([s, sink], dim=-1), dim=-1)  # (B, Hq, Nq)
        p = torch.exp(s - lse[..., None])  # (B, Hq, Nq, Nk); rows with no key: all 0
    if var.dropout_p > 0:
        if dropout_mask is None:
            seed = _dropout.draw_seed(var.generator)
            dropout_mask = _dropout.keep_mask(seed, dense_index(b, hq, 0, nq, 0, nk, q.device), hq, var.dropout_p)
        p = p * dropout_mask.to(p.dtype) / (1 - var.dropout_p)
    out = (p @ v).to(dtype)  # (B, Hq, Nq, Dv)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if lse.dtype == torch.float64 else torch.float32)
