"""`decode_attention`: a few new queries against a dense or paged KV cache, split-K."""

from __future__ import annotations

import logging

import torch

from fa2lab import _checks, masks
from fa2lab._empty import empty_attention, no_query_rows
from fa2lab.backends import BACKENDS, Case, choose
from fa2lab.decode.readers import DenseReader, PagedReader
from fa2lab.decode import splits
from fa2lab.decode.splitk import DECODE_BLOCK_K, default_num_units, splitk_decode
from fa2lab.reference import attention_ref
from fa2lab.variants.options import NONE, check_variants

log = logging.getLogger("fa2lab")
DECODE_BACKENDS = ("auto", *BACKENDS)  # one set of names with fa2lab.attention; "sdpa" says why it cannot


def _check_seqlens(cache_seqlens, batch: int, capacity: int, device) -> torch.Tensor:
    if cache_seqlens is None:
        return torch.full((batch,), capacity, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (batch,):
        raise ValueError(f"expected cache_seqlens to be an int32 tensor of shape (B,) = ({batch},), got "
                         f"{getattr(cache_seqlens, 'shape', cache_seqlens)}")
    if cache_seqlens.dtype != torch.int32:
        raise ValueError(f"expected cache_seqlens to be int32, got {cache_seqlens.dtype}; use .to(torch.int32)")
    lo, hi = (int(cache_seqlens.min()), int(cache_seqlens.max())) if batch else (0, 0)
    if lo < 0 or hi > capacity:
        raise ValueError(f"expected 0 <= cache_seqlens <= cache capacity {capacity}, got values in [{lo}, {hi}]")
    return cache_seqlens


def _check_block_table(block_table, seqlens, reader) -> None:
    """Every page a sequence uses must exist in the pool; entries past its length are ignored."""
    pages_used = (seqlens.long() + reader.page_size - 1) // reader.page_size  # (B,)
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < pages_used[:, None]
    bad = used & ((block_table < 0) | (block_table >= reader.num_pages))
    if bool(bad.any()):
        b = int(bad.any(dim=1).nonzero()[0])
        raise ValueError(f"block_table[{b}] points outside the pool of {reader.num_pages} pages: "
                         f"{block_table[b, : int(pages_used[b])].tolist()}")


def decode_attention(q, k_cache, v_cache, *, cache_seqlens=None, block_table=None, num_splits=None,
                     softmax_scale=None, causal=True, window_size=(-1, -1), return_lse=False,
                     backend="auto", unified_max=None, softcap=0.0, alibi_slopes=None, attn_bias=None, sinks=None,
                     dropout_p=0.0, generator=None, score_mod=None, mask_mod=None):
    """Attention of Nq new tokens per sequence against a KV cache, split-K (Flash-Decoding).

    q: (B, Hq, Nq, D), Nq small: the last Nq positions of each sequence (causal bottom-right).
    Dense cache: k_cache (B, Hkv, Nmax, D), v_cache (B, Hkv, Nmax, Dv); cache_seqlens int32 (B,)
      valid lengths (None: all Nmax).
    Paged cache: k_cache, v_cache (num_pages, Hkv, page_size, D/Dv); block_table int32
      (B, max_pages_per_seq) logical -> physical page; cache_seqlens required. Any page size >= 1.
    -> out (B, Hq, Nq, Dv) [, lse (B, Hq, Nq) float32].

    num_splits: None chooses from the device (enough parallel work, never more splits than cache
    tiles); 1 is plain FA2. unified_max: a fixed softmax reference phi (FlashDecoding++); results
    are checked and recomputed exactly when phi over- or underflows. backend: "auto" | "tiled"
    (this split-K) | "triton" (the split-K kernel) | "reference" (naive, per sequence), decided by
    `fa2lab.backends.choose("decode", ...)`; one that cannot run the case raises a ValueError.

    Variants as in `fa2lab.attention`, for sequence b as the dense call on its first
    cache_seqlens[b] keys: softcap, alibi_slopes (Hq,) / (B, Hq), attn_bias broadcastable to
    (B, Hq, Nq, Nmax) (paged: Nmax = max_pages_per_seq * page_size), sinks (Hq,), score_mod /
    mask_mod run in the split-K (backend "tiled"); dropout (decoding in training) runs per sequence
    on the reference. "auto" sends variants away from the Triton decode kernel and logs why.
    """
    _checks.check_tensor("q", q, 4, "(B, Hq, Nq, D)")
    paged = block_table is not None
    layout = "(num_pages, Hkv, page_size, D)" if paged else "(B, Hkv, Nmax, D)"
    _checks.check_tensor("k_cache", k_cache, 4, layout)
    _checks.check_tensor("v_cache", v_cache, 4, layout.replace("D)", "Dv)"))
    _checks.check_same_dtype_device(q=q, k_cache=k_cache, v_cache=v_cache)
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"expected k_cache and v_cache to agree except in the last dim, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _checks.check_head_dims(q.shape[-1], k_cache.shape[-1])
    _checks.check_heads(q.shape[1], k_cache.shape[1], v_cache.shape[1])
    window_size = _checks.check_window(window_size)
    batch = q.shape[0]
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"expected block_table to be int32 (B={batch}, max_pages_per_seq), got "
                             f"{getattr(block_table, 'shape', block_table)}")
        if block_table.dtype != torch.int32:
            raise ValueError(f"expected block_table to be int32, got {block_table.dtype}; use .to(torch.int32)")
        if cache_seqlens is None:
            raise ValueError("a paged cache needs cache_seqlens (B,) int32: page tables do not say how full "
                             "the last page is")
        reader = PagedReader(k_cache, v_cache, block_table)
    else:
        if k_cache.shape[0] != batch:
            raise ValueError(f"expected k_cache batch {k_cache.shape[0]} to equal q's batch {batch}")
        reader = DenseReader(k_cache, v_cache)
    seqlens = _check_seqlens(cache_seqlens, batch, reader.capacity, q.device)
    if paged:
        _check_block_table(block_table, seqlens, reader)
    _check_backend_and_q(backend, q, reader)
    var = check_variants(q, k_cache, softcap=softcap, alibi_slopes=alibi_slopes, attn_bias=attn_bias, sinks=sinks,
                         dropout_p=dropout_p, generator=generator, score_mod=score_mod, mask_mod=mask_mod,
                         batch=batch, nk=reader.capacity)
    # A full cache's longest sequence is its capacity: known without reading seqlens back (no sync).
    return _decode(q, reader, seqlens, reader.capacity if cache_seqlens is None else None, num_splits=num_splits,
                   softmax_scale=softmax_scale, causal=causal, window_size=window_size, return_lse=return_lse,
                   backend=backend, unified_max=unified_max, variants=var)


def decode_with_reader(q, reader, seqlens, *, num_splits=None, softmax_scale=None, causal=True,
                       window_size=(-1, -1), return_lse=False, backend="auto", unified_max=None):
    """`decode_attention` over any KVReader (the KV cache classes use this): q (B, Hq, Nq, D),
    seqlens int32 (B,) valid lengths, positions [0, seqlens[b]) read in order."""
    _checks.check_tensor("q", q, 4, "(B, Hq, Nq, D)")
    _checks.check_floating("q", q)
    _check_backend_and_q(backend, q, reader)
    seqlens = _check_seqlens(seqlens, q.shape[0], reader.capacity, q.device)
    return _decode(q, reader, seqlens, None, num_splits=num_splits, softmax_scale=softmax_scale, causal=causal,
                   window_size=window_size, return_lse=return_lse, backend=backend, unified_max=unified_max)


def _check_backend_and_q(backend, q, reader) -> None:
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}; choose one of {list(DECODE_BACKENDS)}")
    heads_ok = q.shape[1] % reader.heads_kv == 0 if reader.heads_kv else q.shape[1] == 0
    if q.shape[-1] != reader.head_dim or not heads_ok or q.shape[0] != reader.batch:
        raise ValueError(f"expected q (B={reader.batch}, Hq multiple of {reader.heads_kv}, Nq, D={reader.head_dim}) "
                         f"for this cache, got {tuple(q.shape)}")


def _decode(q, reader, seqlens, max_len, *, num_splits, softmax_scale, causal, window_size, return_lse, backend,
            unified_max, variants=NONE):
    """The decode itself, on checked inputs. max_len: max(seqlens) where the caller knows it
    (None: read it back from the device)."""
    window_size = _checks.check_window(window_size)
    causal, return_lse = _checks.check_flag("causal", causal), _checks.check_flag("return_lse", return_lse)
    unified_max = _checks.check_optional_number("unified_max", unified_max, "the fixed softmax reference phi")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"expected num_splits to be a positive int or None (auto), got {num_splits!r}")
    scale = _checks.resolve_scale(softmax_scale, q.shape[-1])
    left, right = masks.effective_window(causal, window_size)
    batch = q.shape[0]

    # The Triton split-K kernel on CUDA for dense and paged caches; everything else (CPU,
    # compressed caches, unified max, variants) goes through the PyTorch split-K, dropout through
    # the per-sequence reference (fa2lab.backends decides).
    case = decode_case(q, reader, causal, window_size, unified_max, variants.active)
    backend = choose("decode", case, backend).name
    if no_query_rows(q):  # B, Hq or Nq is 0, every argument checked: nothing to split or merge
        rows = q.shape[:3]
        return empty_attention(q, getattr(reader, "k", q), getattr(reader, "v", q), (*rows, reader.head_dim_v),
                               rows, return_lse)
    if backend == "reference":
        out, lse = _reference(q, reader, seqlens, causal, window_size, scale, variants)
    elif backend == "triton":
        from fa2lab.kernels.decode import decode_triton

        max_len = (int(seqlens.max()) if batch else 0) if max_len is None else max_len
        if num_splits is None:
            num_splits = splits.num_splits("triton", batch * reader.heads_kv, max_len, default_num_units(q.device))
        paged = isinstance(reader, PagedReader)
        out, lse = decode_triton(q, reader.k, reader.v, seqlens, scale=scale, left=left, right=right,
                                 num_splits=num_splits, block_table=reader.block_table if paged else None,
                                 max_len=max_len)
    else:
        if num_splits is None:
            max_len = (int(seqlens.max()) if batch else 0) if max_len is None else max_len
            num_splits = splits.num_splits("tiled", batch * reader.heads_kv, max_len, default_num_units(q.device))
        out, lse, stats = splitk_decode(q, reader, seqlens, scale=scale, left=left, right=right,
                                        num_splits=num_splits, block_k=DECODE_BLOCK_K, unified_max=unified_max,
                                        variants=variants if variants.any else None)
        if stats is not None and not stats.exact:
            log.warning("fa2lab: unified max phi=%g out of range (max logit - phi = %.3g, smallest row max - "
                        "phi = %.3g); recomputed with the online softmax", stats.phi, stats.max_shift,
                        stats.min_row_shift)
    lse = lse.float() if q.dtype != torch.float64 else lse
    return (out, lse) if return_lse else out


def decode_case(q, reader, causal, window_size, unified_max, variants=()) -> Case:
    """The `fa2lab.backends.Case` of a decode call: Nk is the cache's capacity."""
    cache = "paged" if isinstance(reader, PagedReader) else "dense" if isinstance(reader, DenseReader) else "compressed"
    return Case(q.device.type, q.dtype, q.shape[2], reader.capacity, q.shape[1], reader.heads_kv, q.shape[-1],
                reader.head_dim_v, bool(causal), tuple(window_size), True, cache=cache,
                unified_max=unified_max is not None, variants=tuple(variants))


def _reference(q, reader, seqlens, causal, window_size, scale, variants=NONE):
    """Each sequence on its own: gather its cache and run the naive oracle (with the sequence's
    row of the variants: its slopes, its bias corner, b = its index for score/mask functions)."""
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
    return torch.cat(outs), torch.cat(lses)
