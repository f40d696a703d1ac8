"""The public entry points, `attention` and `varlen_attention`: validate, choose, run.

Validation happens here, once; the decision is `fa2lab.backends.choose` (op "dense" / "varlen"):
"auto" picks the fastest backend that supports the case and logs the choice (once per distinct
decision) at INFO on the "fa2lab" logger; an explicit backend that cannot run the case raises a
ValueError that says why and what to use instead. The backends then run unchecked internals.
"""

from __future__ import annotations

import torch

from fa2lab import _checks
from fa2lab._checks import check_dense, resolve_scale
from fa2lab._empty import empty_attention, no_query_rows
from fa2lab.backends import BACKENDS, Case, choose
from fa2lab.variants.options import check_variants

__all__ = ["attention", "varlen_attention", "dropout_mask", "available_backends", "check_dense", "resolve_scale"]


def available_backends() -> list[str]:
    return ["auto", *BACKENDS]


def _resolve_backend(backend: str, cases: list[Case], op: str = "dense") -> str:
    if backend not in available_backends():
        raise ValueError(f"unknown backend {backend!r}; choose one of {available_backends()}")
    return choose(op, cases, backend).name


def attention(q, k, v, *, causal=False, window_size=(-1, -1), softmax_scale=None, return_lse=False,
              backend="auto", softcap=0.0, alibi_slopes=None, attn_bias=None, sinks=None, dropout_p=0.0,
              generator=None, score_mod=None, mask_mod=None, block_mask=None):
    """Exact scaled-dot-product attention with FlashAttention-2's semantics.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv), Hq % Hkv == 0 (GQA / MQA)
    -> out (B, Hq, Nq, Dv) in q's dtype; with `return_lse` also lse (B, Hq, Nq), the natural log
    of the softmax denominator with the scale applied (float32; float64 for float64 inputs).

    Masks are aligned bottom-right: query i sees key j iff
    i + Nk - Nq - left <= j <= i + Nk - Nq + right (`causal` sets right = 0; -1 is unbounded).
    Nq=3, Nk=5: causal                 window_size=(1, 0)
                  keys 0 1 2 3 4          keys 0 1 2 3 4
                  q0   x x x . .          q0   . x x . .
                  q1   x x x x .          q1   . . x x .
                  q2   x x x x x          q2   . . . x x
    A row that sees no key returns zeros and lse = -inf. softmax_scale defaults to 1/sqrt(D).
    backend: "auto" | "tiled" | "sdpa" | "triton" | "reference" (see `fa2lab.backends`).

    Variants (off by default, composable with each other, causal, windows and GQA; semantics in
    `fa2lab.variants.options`): softcap > 0: s = softcap * tanh(scale * q.k / softcap);
    alibi_slopes float32 (Hq,) or (B, Hq): s -= slope * |i + Nk - Nq - j|; attn_bias broadcastable
    to (B, Hq, Nq, Nk), added after soft-capping (differentiable: bias.grad); sinks float32 (Hq,):
    exp(sinks[h]) joins every row's denominator (lse includes it; rows without keys give zeros and
    lse = sinks[h]; differentiable); dropout_p with generator: dropout on the probabilities, kept
    entries scaled by 1 / (1 - p), the same generator state gives bit-identical results
    (`fa2lab.dropout_mask` returns the mask); score_mod(score, b, h, q_idx, kv_idx) -> score and
    mask_mod(b, h, q_idx, kv_idx) -> bool (FlexAttention's signatures; tiled and reference
    backends), block_mask from `fa2lab.create_block_mask`.
    """
    window_size = check_dense(q, k, v, window_size)
    causal, return_lse = _checks.check_flag("causal", causal), _checks.check_flag("return_lse", return_lse)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    var = check_variants(q, k, softcap=softcap, alibi_slopes=alibi_slopes, attn_bias=attn_bias, sinks=sinks,
                         dropout_p=dropout_p, generator=generator, score_mod=score_mod, mask_mod=mask_mod,
                         block_mask=block_mask)
    name = _resolve_backend(backend, [Case.of(q, k, v, causal, window_size, return_lse, variants=var.active)])
    if no_query_rows(q):  # validated above; nothing to compute (B, Hq or Nq is 0)
        return empty_attention(q, k, v, (*q.shape[:3], v.shape[-1]), q.shape[:3], return_lse)
    return BACKENDS[name](q, k, v, causal=causal, window_size=window_size, scale=scale, return_lse=return_lse,
                          variants=var)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None,
                     causal=False, window_size=(-1, -1), softmax_scale=None, return_lse=False,
                     backend="auto", softcap=0.0, alibi_slopes=None, attn_bias=None, sinks=None, dropout_p=0.0,
                     generator=None, score_mod=None, mask_mod=None, block_mask=None):
    """Attention over a packed batch of sequences of different lengths.

    q: (total_q, Hq, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv); cu_seqlens_q/k int32
    (batch + 1,) cumulative offsets starting at 0. Sequence s is q[cu_q[s]:cu_q[s+1]] against
    k[cu_k[s]:cu_k[s+1]], with the masks of `attention` applied per sequence.
    -> out (total_q, Hq, Dv); with `return_lse` also lse (Hq, total_q) as in flash_attn.
    Zero-length sequences are allowed. max_seqlen_q/k, if given, must bound the true maxima.
    Variants as in `attention`, per sequence s: alibi_slopes (Hq,) or (batch, Hq); attn_bias
    broadcastable to (batch, Hq, max_seqlen_q, max_seqlen_k), sequence s reading its top-left
    (nq_s, nk_s) corner; score_mod / mask_mod see b = s and positions within the sequence.
    """
    _checks.check_tensor("q", q, 3, "(total_q, Hq, D)")
    _checks.check_tensor("k", k, 3, "(total_k, Hkv, D)")
    _checks.check_tensor("v", v, 3, "(total_k, Hkv, Dv)")
    _checks.check_same_dtype_device(q=q, k=k, v=v)
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"expected k and v to have the same packed length, got {k.shape[0]} and {v.shape[0]}")
    _checks.check_head_dims(q.shape[-1], k.shape[-1])
    _checks.check_heads(q.shape[1], k.shape[1], v.shape[1])
    window_size = _checks.check_window(window_size)
    causal, return_lse = _checks.check_flag("causal", causal), _checks.check_flag("return_lse", return_lse)
    max_seqlen_q = _checks.check_size("max_seqlen_q", max_seqlen_q, 0, optional=True)
    max_seqlen_k = _checks.check_size("max_seqlen_k", max_seqlen_k, 0, optional=True)
    cu_q = _checks.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], None)
    cu_k = _checks.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], len(cu_q) - 1)
    lens_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    lens_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    for name, given, lens in (("max_seqlen_q", max_seqlen_q, lens_q), ("max_seqlen_k", max_seqlen_k, lens_k)):
        if given is not None and lens and given < max(lens):
            raise ValueError(f"{name}={given} is below the longest sequence ({max(lens)}); pass {max(lens)} or None")
    scale = resolve_scale(softmax_scale, q.shape[-1])
    var = check_variants(q.transpose(0, 1)[None], k.transpose(0, 1)[None], softcap=softcap,
                         alibi_slopes=alibi_slopes, attn_bias=attn_bias, sinks=sinks, dropout_p=dropout_p,
                         generator=generator, score_mod=score_mod, mask_mod=mask_mod, block_mask=None,
                         batch=len(cu_q) - 1, nq=max(lens_q, default=0), nk=max(lens_k, default=0))
    if block_mask is not None:
        raise ValueError("varlen_attention takes mask_mod, not a block_mask (the tiles of each sequence differ)")

    # One dense call per sequence: (n, H, D) -> (1, H, n, D). Sequences without queries add nothing.
    seqs = [(a, b, c, d) for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]) if b > a]
    as_dense = lambda x, a, b: x[a:b].transpose(0, 1).unsqueeze(0)  # noqa: E731
    cases = [Case.of(as_dense(q, a, b), as_dense(k, c, d), as_dense(v, c, d), causal, window_size, return_lse,
                     variants=var.active) for a, b, c, d in seqs]
    if no_query_rows(q):  # no query rows: the backend is still checked, on an empty case
        cases = cases or [Case.of(as_dense(q, 0, 0), as_dense(k, 0, k.shape[0]), as_dense(v, 0, v.shape[0]), causal,
                                  window_size, return_lse)]
        _resolve_backend(backend, cases, "varlen")
        return empty_attention(q, k, v, (q.shape[0], q.shape[1], v.shape[-1]), (q.shape[1], q.shape[0]), return_lse)
    name = _resolve_backend(backend, cases, "varlen")
    if name == "triton" and not var.any:  # one launch over the packed batch instead of one call per sequence
        from fa2lab import masks
        from fa2lab.kernels.attention import triton_varlen_attention

        left, right = masks.effective_window(causal, window_size)
        return triton_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max(lens_q, default=0),
                                       max(lens_k, default=0), scale=scale, left=left, right=right,
                                       return_lse=return_lse)
    run = BACKENDS[name]
    outs, lses = [], []
    seq_of = [s for s, (a, b) in enumerate(zip(cu_q, cu_q[1:])) if b > a]
    for s, (a, b, c, d) in zip(seq_of, seqs):
        res = run(as_dense(q, a, b), as_dense(k, c, d), as_dense(v, c, d), causal=causal,
                  window_size=window_size, scale=scale, return_lse=return_lse,
                  variants=var.for_sequence(s, b - a, d - c) if var.any else var)
        out, lse = res if return_lse else (res, None)
        outs.append(out[0].transpose(0, 1))  # (n, Hq, Dv)
        if return_lse:
            lses.append(lse[0])  # (Hq, n)
    hq, dv = q.shape[1], v.shape[-1]
    out = torch.cat(outs, 0) if outs else q.new_zeros(0, hq, dv)  # (total_q, Hq, Dv)
    if not return_lse:
        return out
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.cat(lses, 1) if lses else torch.empty(hq, 0, dtype=lse_dtype, device=q.device)  # (Hq, total_q)
    return out, lse


def dropout_mask(q, k, *, dropout_p: float, generator: torch.Generator | None = None, backend: str = "tiled"):
    """The keep mask (B, Hq, Nq, Nk) bool that `fa2lab.attention(q, k, v, dropout_p=..., generator=g)`
    would use with this generator state (debugging: replay it through the reference with
    `attention_ref(..., dropout_p=p, dropout_mask=mask)`). Draws the same seed the call would, so
    pass a generator in the same state as the one the call gets. backend: "tiled" or "reference"
    (the same counter hash) or "triton" (the kernels' Philox). Materialises Nq x Nk: small problems only."""
    from fa2lab.variants.dropout import dense_keep_mask, draw_seed

    b, hq, nq, nk = q.shape[0], q.shape[1], q.shape[-2], k.shape[-2]
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"expected 0 <= dropout_p < 1, got {dropout_p!r}")
    if backend not in ("tiled", "reference", "triton"):
        raise ValueError(f"expected backend 'tiled', 'reference' or 'triton' for dropout_mask, got {backend!r}")
    if b * hq * nq * nk > 2 ** 27:
        raise ValueError(f"dropout_mask materialises B*Hq*Nq*Nk = {b * hq * nq * nk} booleans; it is a debugging aid "
                         f"for small problems (at most 2^27)")
    seed = draw_seed(generator)
    if backend == "triton":
        from fa2lab.kernels.variants import triton_keep_mask

        return triton_keep_mask(seed, b, hq, nq, nk, dropout_p, q.device)
    return dense_keep_mask(seed, b, hq, nq, nk, dropout_p, q.device)
