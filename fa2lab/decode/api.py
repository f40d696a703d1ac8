"""`decode_attention` and `decode_plan`: a few new queries against a dense or paged KV cache, split-K.

Without a plan, a call checks everything, including the device's lengths and page table: one
host-device synchronisation (none for a full dense cache without cache_seqlens). With a plan from
`decode_plan`, it checks host-side shapes only and never waits on the device (`plan.py`).
"""

from __future__ import annotations

import logging

import torch

from fa2lab import _checks
from fa2lab.backends import choose
from fa2lab.decode.plan import DECODE_BACKENDS, DecodePlan, check_shapes, check_values, choose_backend, make_plan
from fa2lab.decode.readers import DenseReader, PagedReader
from fa2lab.decode import splits
from fa2lab.decode.splitk import DECODE_BLOCK_K, default_num_units, splitk_decode
from fa2lab.reference import attention_ref
from fa2lab.variants.options import NONE, check_variants

log = logging.getLogger("fa2lab")
_UNSET = object()


def decode_plan(q, k_cache, v_cache, k_new=None, v_new=None, *, cache_seqlens=None, block_table=None,
                num_splits=None, softmax_scale=None, causal=True, window_size=(-1, -1), backend="auto",
                unified_max=None, softcap=0.0, alibi_slopes=None, sinks=None) -> DecodePlan:
    """Check a decode call once; pass the result as `decode_attention(..., plan=plan)`.

    Arguments as `decode_attention`. The plan fixes shapes, dtype, device, options, backend, split
    count (from the cache's capacity) and the kernel's workspace. With cache_seqlens (and
    block_table) given, their current values are checked too (one sync, here only). The plan stays
    valid while lengths grow up to the capacity and while the page table changes: planned calls
    clamp lengths and page numbers on the device instead of checking them. One plan serves every
    layer whose cache has the same shapes, on one CUDA stream at a time (it holds the workspace).

    Variants: softcap, alibi_slopes (Hq,) / (B, Hq) and sinks (Hq,) (issue 17's semantics, as
    `decode_attention`). The plan fixes which of them are on and the softcap value; a planned call
    may pass other slopes or sinks of the same shapes (one plan for every layer of a model whose
    layers have their own sinks) or leave them out to use the plan's.
    """
    window_size = check_shapes(q, k_cache, v_cache, k_new, v_new, block_table, cache_seqlens, window_size)
    capacity = block_table.shape[1] * k_cache.shape[2] if block_table is not None else k_cache.shape[2]
    var = check_variants(q, k_cache, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, batch=q.shape[0],
                         nk=capacity)
    plan = make_plan(q, k_cache, v_cache, k_new, v_new, block_table=block_table, num_splits=num_splits, variants=var,
                     softmax_scale=softmax_scale, causal=causal, window_size=window_size, backend=backend,
                     unified_max=unified_max, workspace=True, num_units=default_num_units(q.device),
                     choose=choose)
    if cache_seqlens is not None:
        check_values(cache_seqlens, plan.n_new, plan.capacity, block_table, k_cache.shape[2], k_cache.shape[0])
    return plan


def decode_attention(q, k_cache, v_cache, k_new=None, v_new=None, *, cache_seqlens=None, block_table=None,
                     num_splits=None, softmax_scale=None, causal=_UNSET, window_size=_UNSET, return_lse=False,
                     backend="auto", unified_max=_UNSET, plan: DecodePlan | None = None, softcap=0.0,
                     alibi_slopes=None, attn_bias=None, sinks=None, dropout_p=0.0, generator=None, score_mod=None,
                     mask_mod=None):
    """Attention of Nq new tokens per sequence against a KV cache, split-K (Flash-Decoding).

    q: (B, Hq, Nq, D), Nq small or in the thousands (chunked prefill): the last Nq positions of each
      sequence (causal bottom-right).
    Dense cache: k_cache (B, Hkv, Nmax, D), v_cache (B, Hkv, Nmax, Dv); cache_seqlens int32 (B,)
      valid lengths (None: all Nmax).
    Paged cache: k_cache, v_cache (num_pages, Hkv, page_size, D/Dv); block_table int32
      (B, max_pages_per_seq) logical -> physical page; cache_seqlens required. Any page size >= 1.
    k_new, v_new: (B, Hkv, Nnew, D/Dv) written in place at positions cache_seqlens[b] .. + Nnew of
      each sequence (as flash_attn_with_kvcache), then attended with the rest: the sequence has
      cache_seqlens[b] + Nnew keys. cache_seqlens itself is not modified: the caller advances it.
    -> out (B, Hq, Nq, Dv) [, lse (B, Hq, Nq) float32].

    Nq=2 queries, sequence of 5 keys (causal):   keys 0 1 2 3 4
                                                  q0   x x x x .
                                                  q1   x x x x x
    num_splits: None chooses from the device and the cache's capacity; 1 is plain FA2.
    unified_max: a fixed softmax reference phi (FlashDecoding++); results are checked and recomputed
    exactly when phi over- or underflows. backend: "auto" | "tiled" (the PyTorch split-K) | "triton"
    | "reference" (naive, per sequence).
    plan: from `decode_plan` for these shapes; the call then checks shapes only and does no
    host-device synchronisation (lengths and pages clamped on the device). Without a plan the call
    checks lengths and page table on the device: one synchronisation (none for a full dense cache).
    Options left out of a planned call are the plan's; options given must agree with it.

    Variants as in `fa2lab.attention`, for sequence b as the dense call on its first
    cache_seqlens[b] keys: softcap, alibi_slopes (Hq,) / (B, Hq), attn_bias broadcastable to
    (B, Hq, Nq, Nmax) (paged: Nmax = max_pages_per_seq * page_size), sinks (Hq,), score_mod /
    mask_mod run in the split-K (backend "tiled"); dropout (decoding in training) runs per sequence
    on the reference. The Triton decode kernel runs softcap, alibi_slopes and sinks (dense and
    paged, planned or not); "auto" sends bias, score/mask functions and dropout away from it and
    logs why. Plans take softcap, alibi_slopes and sinks (`decode_plan`); a planned call may pass
    its own slopes and sinks of the planned shapes.
    """
    if return_lse is not True and return_lse is not False:
        return_lse = _checks.check_flag("return_lse", return_lse)
    if plan is not None:  # the planned call: host-side comparisons only, then the launch
        if attn_bias is not None or dropout_p or score_mod is not None or mask_mod is not None:
            raise ValueError("decode plans hold softcap, alibi_slopes and sinks, not attn_bias, dropout_p, "
                             "score_mod or mask_mod; call decode_attention without plan= for them")
        if not isinstance(plan, DecodePlan):
            raise ValueError(f"expected plan from fa2lab.decode_plan(...), got {type(plan).__name__}")
        variants = plan.variants
        if softcap or alibi_slopes is not None or sinks is not None:
            variants = plan.call_variants(softcap, alibi_slopes, sinks)
        plain = (causal is _UNSET and window_size is _UNSET and unified_max is _UNSET and softmax_scale is None
                 and num_splits is None and backend == "auto")
        if not (plain and plan.matches(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)):
            options = {name: val for name, val in (("causal", causal), ("window_size", window_size),
                                                    ("unified_max", unified_max)) if val is not _UNSET}
            if "window_size" in options:
                options["window_size"] = tuple(options["window_size"])
            plan.check_call(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table,
                            dict(options, softmax_scale=softmax_scale, num_splits=num_splits, backend=backend))
        return run_plan(plan, q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, return_lse, backend,
                        variants)
    options = {name: val for name, val in (("causal", causal), ("window_size", window_size),
                                            ("unified_max", unified_max)) if val is not _UNSET}
    window = check_shapes(q, k_cache, v_cache, k_new, v_new, block_table, cache_seqlens,
                          options.get("window_size", (-1, -1)))
    if block_table is not None and cache_seqlens is None:
        raise ValueError("a paged cache needs cache_seqlens (B,) int32: page tables do not say how full "
                         "the last page is")
    capacity = block_table.shape[1] * k_cache.shape[2] if block_table is not None else k_cache.shape[2]
    var = check_variants(q, k_cache, softcap=softcap, alibi_slopes=alibi_slopes, attn_bias=attn_bias, sinks=sinks,
                         dropout_p=dropout_p, generator=generator, score_mod=score_mod, mask_mod=mask_mod,
                         batch=q.shape[0], nk=capacity)
    plan = make_plan(q, k_cache, v_cache, k_new, v_new, block_table=block_table, num_splits=num_splits,
                     variants=var,
                     softmax_scale=softmax_scale, causal=options.get("causal", True), window_size=window,
                     backend=backend, unified_max=options.get("unified_max"), workspace=False,
                     num_units=default_num_units(q.device), choose=choose)
    if cache_seqlens is not None:
        check_values(cache_seqlens, plan.n_new, plan.capacity, block_table, k_cache.shape[2], k_cache.shape[0])
    return run_plan(plan, q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, return_lse, backend)


def run_plan(plan: DecodePlan, q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, return_lse,
             asked="auto", variants=_UNSET):
    """The decode itself on checked inputs; reads nothing back on the Triton path. variants: the
    call's checked Variants (default: the plan's)."""
    if variants is _UNSET:
        variants = plan.variants
    if cache_seqlens is None:  # a full dense cache: its length is the capacity, known on the host
        cache_seqlens = plan.full_lengths
        if cache_seqlens is None:
            cache_seqlens = torch.full((plan.q_shape[0],), plan.capacity, dtype=torch.int32, device=q.device)
    if k_new is not None:  # the append happens even when there is no query row to attend
        if plan.backend == "triton":
            _ops().append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
        else:
            append_kv_torch(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, plan.capacity)
    b, hq, nq, _ = plan.q_shape
    if b * hq * nq == 0:  # no query rows (B, Hq or Nq is 0): nothing to split or merge
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = q.new_zeros(b, hq, nq, v_cache.shape[-1])
        lse = torch.full((b, hq, nq), float("-inf"), dtype=lse_dtype, device=q.device)
        return (out, lse) if return_lse else out
    if plan.backend == "triton":
        out, lse = _ops().decode(q, k_cache, v_cache, cache_seqlens, block_table, plan, return_lse, variants)
        return (out, lse) if return_lse else out
    left, right = plan.window
    seqlens = (cache_seqlens + plan.n_new).clamp(0, plan.capacity)  # what the kernels do on the device
    reader = PagedReader(k_cache, v_cache, block_table) if plan.paged else DenseReader(k_cache, v_cache)
    out, lse = _readable(plan, q, reader, seqlens, left, right, variants)
    lse = lse.float() if q.dtype != torch.float64 else lse
    return (out, lse) if return_lse else out


_OPS = []


def _ops():
    if not _OPS:  # imported on first use: Triton is optional
        from fa2lab.kernels import ops

        _OPS.append(ops)
    return _OPS[0]


def append_kv_torch(k_cache, v_cache, k_new, v_new, seqlens, block_table, capacity: int) -> None:
    """The readable append: k_new (B, Hkv, Nnew, D) at positions seqlens[b] + i; positions outside
    the capacity or on pages outside the pool are dropped, as by the Triton kernel."""
    b, _, n, _ = k_new.shape
    pos = seqlens.long()[:, None] + torch.arange(n, device=seqlens.device)[None, :]  # (B, Nnew)
    ok = (pos >= 0) & (pos < capacity)
    if block_table is not None:
        page_size = k_cache.shape[2]
        logical = (pos // page_size).clamp(0, block_table.shape[1] - 1)
        page = block_table.long().gather(1, logical)  # (B, Nnew)
        ok &= (page >= 0) & (page < k_cache.shape[0])
        first, slot = page[ok], (pos % page_size)[ok]
    else:
        first, slot = torch.arange(b, device=pos.device)[:, None].expand(b, n)[ok], pos[ok]
    k_cache[first, :, slot] = k_new.transpose(1, 2)[ok].to(k_cache.dtype)  # (M, Hkv, D)
    v_cache[first, :, slot] = v_new.transpose(1, 2)[ok].to(v_cache.dtype)


def decode_with_reader(q, reader, seqlens, *, num_splits=None, softmax_scale=None, causal=True,
                       window_size=(-1, -1), return_lse=False, backend="auto", unified_max=None):
    """`decode_attention` over any KVReader (the KV cache classes use this): q (B, Hq, Nq, D),
    seqlens int32 (B,) valid lengths, positions [0, seqlens[b]) read in order."""
    kw = dict(num_splits=num_splits, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
              return_lse=return_lse, backend=backend, unified_max=unified_max)
    if isinstance(reader, (DenseReader, PagedReader)):
        table = reader.block_table if isinstance(reader, PagedReader) else None
        return decode_attention(q, reader.k, reader.v, cache_seqlens=seqlens, block_table=table, **kw)
    _checks.check_tensor("q", q, 4, "(B, Hq, Nq, D)")
    _checks.check_floating("q", q)
    heads_ok = q.shape[1] % reader.heads_kv == 0 if reader.heads_kv else q.shape[1] == 0
    if q.shape[-1] != reader.head_dim or not heads_ok or q.shape[0] != reader.batch:
        raise ValueError(f"expected q (B={reader.batch}, Hq multiple of {reader.heads_kv}, Nq, D={reader.head_dim}) "
                         f"for this cache, got {tuple(q.shape)}")
    window_size = _checks.check_window(window_size)
    causal, return_lse = _checks.check_flag("causal", causal), _checks.check_flag("return_lse", return_lse)
    unified_max = _checks.check_optional_number("unified_max", unified_max, "the fixed softmax reference phi")
    name = choose_backend(backend, decode_case(q, reader, causal, window_size, unified_max), choose)
    if not isinstance(seqlens, torch.Tensor) or seqlens.shape != (q.shape[0],):
        raise ValueError(f"expected seqlens of shape ({q.shape[0]},), got {getattr(seqlens, 'shape', seqlens)}")
    check_values(seqlens, 0, reader.capacity, None, 1, 1)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"expected num_splits to be a positive int or None (auto), got {num_splits!r}")
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:  # no query row: nothing to split or merge
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = q.new_zeros(*q.shape[:3], reader.head_dim_v)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=lse_dtype, device=q.device)
        return (out, lse) if return_lse else out
    plan = DecodePlan(backend=name, paged=False, q_shape=tuple(q.shape), k_shape=(), v_shape=(), table_shape=None,
                      new_shape=None, dtype=q.dtype, device=q.device, capacity=reader.capacity,
                      num_splits=num_splits or splits.num_splits("tiled", q.shape[0] * reader.heads_kv,
                                                                 reader.capacity, default_num_units(q.device)),
                      scale=_checks.resolve_scale(softmax_scale, q.shape[-1]), causal=bool(causal),
                      window_size=window_size, unified_max=None if unified_max is None else float(unified_max))
    left, right = plan.window
    out, lse = _readable(plan, q, reader, seqlens, left, right)
    lse = lse.float() if q.dtype != torch.float64 else lse
    return (out, lse) if return_lse else out


def decode_case(q, reader, causal, window_size, unified_max, variants=()):
    """The `fa2lab.backends.Case` of a decode call over `reader`: Nk is the cache's capacity."""
    from fa2lab.decode import plan as planning

    cache = "paged" if isinstance(reader, PagedReader) else "dense" if isinstance(reader, DenseReader) else "compressed"
    return planning.decode_case(q, reader.capacity, reader.heads_kv, reader.head_dim_v, cache, causal, window_size,
                                unified_max, variants)


def _readable(plan, q, reader, seqlens, left, right, variants=_UNSET):
    variants = plan.variants if variants is _UNSET else variants
    if plan.backend == "reference":
        return _reference(q, reader, seqlens, plan.causal, plan.window_size, plan.scale,
                          variants if variants is not None else NONE)
    out, lse, stats = splitk_decode(q, reader, seqlens, scale=plan.scale, left=left, right=right,
                                    num_splits=plan.num_splits, block_k=DECODE_BLOCK_K, unified_max=plan.unified_max,
                                    variants=variants)
    if stats is not None and not stats.exact:
        log.warning("fa2lab: unified max phi=%g out of range (max logit - phi = %.3g, smallest row max - "
                    "phi = %.3g); recomputed with the online softmax", stats.phi, stats.max_shift,
                    stats.min_row_shift)
    return out, lse


def _reference(q, reader, seqlens, causal, window_size, scale, variants=NONE):
    """Each sequence on its own: gather its cache and run the naive oracle."""
    outs, lses = [], []
    # Read in fp32 at least (fp64 for fp64 queries), so a compressed cache is judged by what it
    # stores, not by a round trip through a low-precision dtype.
    k_all, v_all = reader.read(0, int(seqlens.max()) if q.shape[0] else 0,
                               torch.float64 if q.dtype == torch.float64 else torch.float32)
    for b in range(q.shape[0]):
        n = int(seqlens[b])
        o, l = attention_ref(q[b:b + 1], k_all[b:b + 1, :, :n].to(q.dtype), v_all[b:b + 1, :, :n].to(q.dtype),
                             causal=causal, window_size=window_size, softmax_scale=scale, return_lse=True,
                             variants=variants.for_sequence(b, q.shape[2], n) if variants.any else None)
        outs.append(o)
        lses.append(l)
    if not outs:
        hq, nq = q.shape[1], q.shape[2]
        return (q.new_zeros(0, hq, nq, reader.head_dim_v),
                torch.empty(0, hq, nq, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                            device=q.device))
    return torch.cat(outs), torch.cat(lses)
