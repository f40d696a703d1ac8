"""flash-attn 2.8's Python API (`flash_attn.flash_attn_interface`) on fa2lab.

The seven functions keep flash-attn's names, positional order, keywords, defaults, layouts and
return values; underneath they call fa2lab's public entry points (`fa2lab.attention`,
`varlen_attention`, `decode_attention`), so every device and backend fa2lab has runs them.
Layouts: dense (B, N, H, D) and packed (total, H, D), taken as strided views (flash-attn's
(B, N, H, D) is fa2lab's (B, H, N, D) transposed: no copy); outputs contiguous like flash-attn's.

Where results differ from flash-attn's CUDA build:
- `return_attn_probs=True` returns (out, softmax_lse, S_dmask) where S_dmask is flash-attn's
  empty tensor (0,) without dropout and None with dropout (flash-attn's test-only matrix that
  encodes the dropout pattern as signs is not reproduced).
- softmax_lse is float32 (float64 for float64 inputs, which flash-attn does not take) and +inf
  for rows that see no key, as flash-attn writes it. Gradients that flow into softmax_lse are
  propagated (flash-attn drops them).
- `deterministic=True` makes the backward bit-reproducible (fa2lab.determinism): on Hopper it keeps
  plain head-dim-128 calls on the two-pass backward instead of the one pass whose dQ reduce-adds land
  in a run-dependent order; fa2lab's other backward passes (Triton, tiled) add nothing that way;
  where "auto" picks torch SDPA, torch's determinism settings apply.
- Options this fa2lab cannot honour raise NotImplementedError naming the option.
- fp32/fp64 inputs, any head dim the chosen backend takes, and any page size work (flash-attn:
  fp16/bf16, head dim <= 256, pages of a multiple of 256); so do cache_leftpad with a paged cache.
- flash_attn_with_kvcache checks its index tensors (lengths, pages, rotary range) with one
  host-device synchronisation before it writes anything (flash-attn checks none), so a step
  cannot be captured in a CUDA graph; varlen calls read cu_seqlens back as fa2lab's do.

`fa2lab.compat.use_backend(name)` picks the fa2lab backend for the calls in a block (default
"auto", which logs its choice on the "fa2lab" logger).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

import fa2lab
from fa2lab import _checks
from fa2lab.compat.flash_attn import kvcache, options
from fa2lab.compat.flash_attn.rotary import apply_rotary
from fa2lab.determinism import deterministic_backward

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]


def _check_layout(name: str, t, ndim: int, layout: str, packed_dim: int | None = None, packed: int = 0) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim or (packed_dim is not None and t.shape[packed_dim] != packed):
        raise ValueError(f"expected {name} to be {layout} (flash-attn's layout), got shape {tuple(t.shape)}")


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
           deterministic=False):
    """q (B, Nq, H, D), k/v (B, Nk, Hkv, D) -> out (B, Nq, H, Dv) [, lse (B, H, Nq), S_dmask]."""
    variants = options.variant_kwargs(fa2lab.attention, softcap=softcap, alibi_slopes=alibi_slopes,
                                      dropout_p=dropout_p)
    with deterministic_backward(deterministic):
        res = fa2lab.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                               window_size=options.window(window_size), softmax_scale=softmax_scale,
                               return_lse=return_attn_probs, backend=options.current_backend(), **variants)
    out, lse = res if return_attn_probs else (res, None)
    out = out.transpose(1, 2).contiguous()  # (B, Nq, H, Dv); free when the kernel wrote this layout
    if not return_attn_probs:
        return out
    return out, options.flash_lse(lse), options.attn_probs_placeholder(q, dropout_p)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, return_attn_probs, block_table=None):
    """q (total_q, H, D), k/v (total_k, Hkv, D) -> out (total_q, H, Dv) [, lse (H, total_q), S_dmask]."""
    if block_table is not None:
        out, lse = _varlen_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table, dropout_p,
                                 softmax_scale, causal, window_size, softcap, alibi_slopes)
    else:
        variants = options.variant_kwargs(fa2lab.varlen_attention, softcap=softcap, alibi_slopes=alibi_slopes,
                                          dropout_p=dropout_p)
        res = fa2lab.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                      max_seqlen_k=max_seqlen_k, causal=causal,
                                      window_size=options.window(window_size), softmax_scale=softmax_scale,
                                      return_lse=return_attn_probs, backend=options.current_backend(), **variants)
        out, lse = res if return_attn_probs else (res, None)
    if not return_attn_probs:
        return out
    return out, options.flash_lse(lse), options.attn_probs_placeholder(q, dropout_p)


def _varlen_paged(q, k_pages, v_pages, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table, dropout_p,
                  softmax_scale, causal, window_size, softcap, alibi_slopes):
    """Packed queries against a paged cache: one decode call with each sequence's queries placed
    at the end of a (B, max_seqlen_q) block, so that they are its last positions (bottom-right)."""
    _check_layout("k", k_pages, 4, "(num_blocks, page_block_size, nheads_k, headdim) with a block_table")
    _check_layout("v", v_pages, 4, "(num_blocks, page_block_size, nheads_k, headdim) with a block_table")
    if dropout_p:
        raise NotImplementedError(f"flash_attn option dropout_p={dropout_p} is not supported with a paged "
                                  f"block_table (fa2lab's decode has no dropout)")
    cu_q = _checks.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], None)
    batch = len(cu_q) - 1
    _checks.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, int(cu_seqlens_k[-1]), batch)
    longest = max((b - a for a, b in zip(cu_q, cu_q[1:])), default=0)
    if max_seqlen_q < longest:
        raise ValueError(f"max_seqlen_q={max_seqlen_q} is below the longest query sequence ({longest}); pass {longest}")
    total_q, h, d = q.shape
    cu_q_t = cu_seqlens_q.long()
    tok = torch.arange(total_q, device=q.device)
    seq = torch.searchsorted(cu_q_t[1:].contiguous(), tok, right=True)  # (total_q,) sequence of each token
    lens_q = cu_q_t[1:] - cu_q_t[:-1]  # (B,)
    row = max_seqlen_q - lens_q[seq] + (tok - cu_q_t[seq])  # (total_q,) row in the padded block
    q_pad = q.new_zeros(batch, max_seqlen_q, h, d)  # (B, max_q, H, D); the leading padding rows are dropped
    q_pad[seq, row] = q
    lens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)  # (B,)
    variants = options.variant_kwargs(fa2lab.decode_attention, softcap=softcap, alibi_slopes=alibi_slopes)
    out, lse = fa2lab.decode_attention(q_pad.transpose(1, 2), k_pages.transpose(1, 2), v_pages.transpose(1, 2),
                                       cache_seqlens=lens_k, block_table=block_table, softmax_scale=softmax_scale,
                                       causal=causal, window_size=options.window(window_size), return_lse=True,
                                       backend=options.current_backend(), **variants)
    # out (B, H, max_q, Dv), lse (B, H, max_q) -> packed (total_q, H, Dv), (H, total_q)
    return out.transpose(1, 2)[seq, row], lse[seq, :, row].transpose(0, 1)


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # <= 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv (B, N, 3, H, D) -> out (B, N, H, D) [, softmax_lse (B, H, N), S_dmask].
    Otherwise as `flash_attn_func`; gradients flow into qkv."""
    _check_layout("qkv", qkv, 5, "(batch_size, seqlen, 3, nheads, headdim)", 2, 3)
    q, k, v = qkv.unbind(2)  # each (B, N, H, D), views
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                  deterministic)


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q (B, Nq, H, D), kv (B, Nk, 2, Hkv, D) -> out (B, Nq, H, D) [, softmax_lse (B, H, Nq), S_dmask].
    Otherwise as `flash_attn_func`."""
    _check_layout("q", q, 4, "(batch_size, seqlen, nheads, headdim)")
    _check_layout("kv", kv, 5, "(batch_size, seqlen, 2, nheads_k, headdim)", 2, 2)
    k, v = kv.unbind(2)  # (B, Nk, Hkv, D), views
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                  deterministic)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q (B, Nq, H, D), k and v (B, Nk, Hkv, D), H % Hkv == 0 (MQA/GQA)
    -> out (B, Nq, H, D) contiguous; with return_attn_probs (out, softmax_lse (B, H, Nq) float32, S_dmask).

    Masks align bottom-right when Nq != Nk: query i sees key j iff
    i + Nk - Nq - window_size[0] <= j <= i + Nk - Nq + window_size[1] (causal: right = 0).
    Nq=2, Nk=5, causal:   1 1 1 1 0        Nq=5, Nk=2, causal:   0 0 / 0 0 / 0 0 / 1 0 / 1 1
                          1 1 1 1 1
    A row that sees no key returns zeros. softmax_scale defaults to 1/sqrt(D). softcap > 0: scores
    become softcap * tanh(s / softcap). alibi_slopes (H,) or (B, H) fp32 add
    -slope * |i + Nk - Nq - j|. dropout_p: dropout on the probabilities (0.0 at evaluation).
    """
    _check_layout("q", q, 4, "(batch_size, seqlen, nheads, headdim)")
    _check_layout("k", k, 4, "(batch_size, seqlen, nheads_k, headdim)")
    _check_layout("v", v, 4, "(batch_size, seqlen, nheads_k, headdim)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                  deterministic)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv (total, 3, H, D), cu_seqlens int32 (batch + 1,), max_seqlen int
    -> out (total, H, D) [, softmax_lse (H, total), S_dmask]. Otherwise as `flash_attn_varlen_func`."""
    _check_layout("qkv", qkv, 4, "(total, 3, nheads, headdim)", 1, 3)
    q, k, v = qkv.unbind(1)  # (total, H, D), views
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q (total_q, H, D), kv (total_k, 2, Hkv, D) -> out (total_q, H, D) [, softmax_lse (H, total_q), S_dmask].
    Otherwise as `flash_attn_varlen_func`."""
    _check_layout("q", q, 3, "(total_q, nheads, headdim)")
    _check_layout("kv", kv, 4, "(total_k, 2, nheads_k, headdim)", 1, 2)
    k, v = kv.unbind(1)  # (total_k, Hkv, D), views
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """Packed sequences of different lengths: q (total_q, H, D), k and v (total_k, Hkv, D);
    cu_seqlens_q/k int32 (batch + 1,) cumulative offsets from 0; max_seqlen_q/k ints bounding the
    lengths. Sequence b is q[cu_q[b]:cu_q[b+1]] against k[cu_k[b]:cu_k[b+1]] with the masks of
    `flash_attn_func`; empty sequences are allowed.
    -> out (total_q, H, D) [, softmax_lse (H, total_q) float32, S_dmask].

    block_table int32 (batch, max_num_blocks_per_seq): k and v are then pages
    (num_blocks, page_block_size, Hkv, D) of any page size, sequence b's keys its first
    cu_k[b+1] - cu_k[b] positions (read through fa2lab.decode_attention; forward only, as in flash-attn).
    """
    _check_layout("q", q, 3, "(total_q, nheads, headdim)")
    if block_table is None:
        _check_layout("k", k, 3, "(total_k, nheads_k, headdim)")
        _check_layout("v", v, 3, "(total_k, nheads_k, headdim)")
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, return_attn_probs, block_table)


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[(int, torch.Tensor)]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Attention of q (B, Nq, H, D) against a KV cache, optionally appending new keys in place.

    k_cache, v_cache: (B_cache, Nmax, Hkv, D) dense, or (num_blocks, page_block_size, Hkv, D) with
    block_table int32 (B, max_num_blocks_per_seq) (any page size). cache_seqlens: int or int32 (B,)
    keys already cached (None: the whole cache). k, v (B, seqlen_new, Hkv, D): written *in place*
    at positions cache_seqlens, cache_seqlens + 1, ... (cache_seqlens is not advanced), then
    attended to with the rest. rotary_cos/sin (seqlen_ro, rotary_dim / 2): rotate k (and q) at
    those positions first - q at cache_seqlens + i if causal or local, else all at cache_seqlens;
    rotary_interleaved pairs channels (0, 1), (2, 3)... else (c, c + rotary_dim / 2).
    cache_batch_idx int32 (B,): sequence b uses cache row cache_batch_idx[b] (dense caches).
    cache_leftpad int32 (B,): sequence b's keys start at cache position cache_leftpad[b].
    Masks as `flash_attn_func`, counting Nk = cache_seqlens + seqlen_new - cache_leftpad keys.
    num_splits: 0 automatic, 1 no split, n splits of the keys (fa2lab's split-K decode).
    -> out (B, Nq, H, D) [, softmax_lse (B, H, Nq) float32 with return_softmax_lse]. No backward.
    """
    local = options.window(window_size) != (-1, -1)
    plan = kvcache.plan_cache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad,
                              block_table, rotary_cos, rotary_sin, q.shape[1] if causal or local else 1)
    # Everything that can refuse the call does so before the cache is written.
    variants = options.variant_kwargs(fa2lab.decode_attention, softcap=softcap, alibi_slopes=alibi_slopes)
    splits = options.num_splits(num_splits)
    _checks.resolve_scale(softmax_scale, q.shape[-1])
    new_kv = {}
    if k is not None:
        if rotary_cos is not None:
            positions = plan.seqlens.long()[:, None] + torch.arange(k.shape[1], device=q.device)  # (B, seqlen_new)
            k = apply_rotary(k, rotary_cos, rotary_sin, positions, rotary_interleaved)
        if options.accepts(fa2lab.decode_attention, "k_new") and kvcache.view_is_in_place(plan):
            new_kv = dict(k_new=k.transpose(1, 2), v_new=v.transpose(1, 2))  # (B, Hkv, seqlen_new, D): decode appends
        else:  # this fa2lab's decode does not append, or reads a copy: write the cache here first
            kvcache.append(plan, k, v)
    kc, vc, table, lengths = kvcache.decode_view(plan, appended=not new_kv)
    if rotary_cos is not None:
        steps = torch.arange(q.shape[1], device=q.device) if causal or local else \
            torch.zeros(q.shape[1], dtype=torch.long, device=q.device)
        q = apply_rotary(q, rotary_cos, rotary_sin, plan.seqlens.long()[:, None] + steps, rotary_interleaved)
    out, lse = fa2lab.decode_attention(q.transpose(1, 2), kc, vc, cache_seqlens=lengths, block_table=table,
                                       num_splits=splits, softmax_scale=softmax_scale, causal=causal,
                                       window_size=options.window(window_size), return_lse=True,
                                       backend=options.current_backend(), **new_kv, **variants)
    out = out.transpose(1, 2).contiguous()  # (B, Nq, H, Dv)
    return (out, options.flash_lse(lse)) if return_softmax_lse else out
