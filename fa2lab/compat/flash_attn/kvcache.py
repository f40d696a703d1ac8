"""The cache side of flash_attn_with_kvcache: where each sequence's keys live, the in-place append.

flash-attn addresses a cache in three ways; all three become one picture here - a pool of pages
(num_pages, page_size, Hkv, D) in flash-attn's layout and a table (B, pages_per_seq) of page ids:

    dense (Bc, Nmax, Hkv, D)          Bc pages of Nmax tokens; sequence b is page b
    dense + cache_batch_idx (B,)      sequence b is page cache_batch_idx[b]
    paged + block_table (B, P)        as given (flash-attn needs page_size % 256 == 0; fa2lab any)

cache_leftpad (B,) moves sequence b's first key to position leftpad[b]: keys [leftpad, seqlens)
are read, as pages of one token (a view of the pool, table built on the device). Positions
(for the append and for rotary) are absolute; masks count keys from leftpad.
What fa2lab's decode reads is a view of the caller's cache, transposed to fa2lab's
(pages, Hkv, page_size, D): nothing is copied, except for leftpad over a cache whose tokens are
not evenly strided (read from a copy, written in place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fa2lab import _checks


@dataclass
class CachePlan:
    """Checked inputs of one flash_attn_with_kvcache call."""

    pool_k: torch.Tensor  # (num_pages, page_size, Hkv, D): the caller's tensor or a view of it
    pool_v: torch.Tensor  # (num_pages, page_size, Hkv, Dv)
    table: torch.Tensor | None  # int32 (B, pages_per_seq); None: dense, sequence b is page b
    capacity: int  # positions addressable per sequence
    seqlens: torch.Tensor  # int32 (B,): keys before this call's append (absolute end position)
    leftpad: torch.Tensor | None  # int32 (B,)
    n_new: int  # tokens appended per sequence

    @property
    def page_size(self) -> int:
        return self.pool_k.shape[1]


def _check_index(name: str, t, batch: int, shape_text: str, device, ndim: int = 1) -> torch.Tensor:
    """An int32 index tensor of `ndim` dims on q's device whose first dim is the batch."""
    if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.shape[0] != batch:
        raise ValueError(f"expected {name} to be an int32 tensor {shape_text} with batch_size={batch}, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
    if t.dtype != torch.int32:
        raise ValueError(f"expected {name} to be int32, got {t.dtype}; use {name}.to(torch.int32)")
    if t.device != device:
        raise ValueError(f"expected {name} on {device} like q, got {t.device}; move it with .to({str(device)!r})")
    return t


def _check_4d(name: str, t, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"expected {name} to have 4 dims {layout} (flash-attn's layout), got shape {tuple(t.shape)}")


def plan_cache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
               rotary_cos, rotary_sin, q_rope_span) -> CachePlan:
    """q_rope_span: how many positions q's rotary takes from cache_seqlens on (seqlen_q for
    causal or local attention, else 1)."""
    # Every argument is validated here, before anything is written into the cache.
    paged = block_table is not None
    layout = "(num_blocks, page_block_size, nheads_k, headdim)" if paged else "(batch_size_cache, seqlen_cache, nheads_k, headdim)"
    _check_4d("q", q, "(batch_size, seqlen, nheads, headdim)")
    _check_4d("k_cache", k_cache, layout)
    _check_4d("v_cache", v_cache, layout)
    tensors = dict(q=q, k_cache=k_cache, v_cache=v_cache)
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (the new keys and values to append) or neither")
    if k is not None:
        _check_4d("k", k, "(batch_size, seqlen_new, nheads_k, headdim)")
        _check_4d("v", v, "(batch_size, seqlen_new, nheads_k, headdim)")
        tensors.update(k=k, v=v)
    _checks.check_same_dtype_device(**tensors)
    batch = q.shape[0]
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"expected k_cache and v_cache to agree except in the last dim, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    _checks.check_head_dims(q.shape[-1], k_cache.shape[-1])
    _checks.check_heads(q.shape[2], k_cache.shape[2], v_cache.shape[2])
    if k is not None:
        want_k = (batch, k.shape[1], k_cache.shape[2], k_cache.shape[3])
        want_v = (batch, k.shape[1], v_cache.shape[2], v_cache.shape[3])
        if tuple(k.shape) != want_k or tuple(v.shape) != want_v:
            raise ValueError(f"expected k {want_k} and v {want_v} (batch_size, seqlen_new, nheads_k, headdim) to "
                             f"match q and the cache, got {tuple(k.shape)} and {tuple(v.shape)}")
        if cache_seqlens is None:
            raise ValueError("appending k, v needs cache_seqlens (where each sequence's new tokens go)")
    if rotary_cos is not None or rotary_sin is not None:
        _check_rotary(rotary_cos, rotary_sin, k, q.shape[-1])

    if paged:
        if cache_batch_idx is not None:
            raise ValueError("a paged cache (block_table) does not take cache_batch_idx: the block table already "
                             "says which pages each sequence reads (flash-attn refuses it too)")
        _check_index("block_table", block_table, batch, "(batch_size, max_num_blocks_per_seq)", q.device, ndim=2)
        table, capacity = block_table, block_table.shape[1] * k_cache.shape[1]
    elif cache_batch_idx is not None:
        table = _check_index("cache_batch_idx", cache_batch_idx, batch, "(batch_size,)", q.device)[:, None]  # (B, 1)
        capacity = k_cache.shape[1]
    else:
        if k_cache.shape[0] < batch:
            raise ValueError(f"expected the cache to hold at least batch_size={batch} sequences, got "
                             f"{k_cache.shape[0]}; pass cache_batch_idx to pick sequences from a larger cache")
        table, capacity = None, k_cache.shape[1]

    n_new = 0 if k is None else k.shape[1]
    if cache_seqlens is None:
        seqlens = torch.full((batch,), capacity, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        seqlens = _check_index("cache_seqlens", cache_seqlens, batch, "(batch_size,)", q.device)
    leftpad = None if cache_leftpad is None else _check_index("cache_leftpad", cache_leftpad, batch, "(batch_size,)", q.device)
    plan = CachePlan(k_cache, v_cache, table, capacity, seqlens, leftpad, n_new)
    _check_values(plan, rotary_cos, q_rope_span)
    return plan


def _check_rotary(cos, sin, k, head_dim) -> None:
    if cos is None or sin is None:
        raise ValueError("pass both rotary_cos and rotary_sin (seqlen_ro, rotary_dim / 2), or neither")
    if k is None:
        raise ValueError("rotary_cos/rotary_sin rotate the new keys k (and q): pass k and v with them, as flash-attn "
                         "requires")
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(f"expected rotary_cos and rotary_sin of one shape (seqlen_ro, rotary_dim / 2), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if 2 * cos.shape[1] > head_dim:
        raise ValueError(f"rotary_dim = 2 * rotary_cos.shape[1] = {2 * cos.shape[1]} exceeds headdim {head_dim}")
    if cos.device != k.device:
        raise ValueError(f"expected rotary_cos on {k.device}, got {cos.device}")


def _check_values(plan: CachePlan, rotary_cos, q_rope_span: int) -> None:
    """The checks that read the index tensors: one host sync for all of them."""
    s = plan.seqlens.long()
    if s.numel() == 0:  # an empty batch: nothing to read, and min() of nothing has no value
        return
    lp = torch.zeros_like(s) if plan.leftpad is None else plan.leftpad.long()
    stats = [s.min(), (s + plan.n_new).max(), lp.min(), (s + plan.n_new - lp).min()]
    names = ["min cache_seqlens", "max cache_seqlens + seqlen_new", "min cache_leftpad",
             "min cache_seqlens + seqlen_new - cache_leftpad"]
    if plan.table is not None:
        stats += list(_used_page_range(plan, lp))
        names += ["min page id", "max page id"]
    if rotary_cos is not None:
        stats.append((s + max(plan.n_new, q_rope_span)).max())
        names.append("last rotary position + 1")
    got = dict(zip(names, torch.stack(stats).tolist()))
    if got["min cache_seqlens"] < 0 or got["min cache_leftpad"] < 0:
        raise ValueError(f"expected cache_seqlens and cache_leftpad >= 0, got {got}")
    if got["max cache_seqlens + seqlen_new"] > plan.capacity:
        raise ValueError(f"the cache holds {plan.capacity} positions per sequence but cache_seqlens + seqlen_new "
                         f"reaches {got['max cache_seqlens + seqlen_new']}; allocate a longer cache")
    if got["min cache_seqlens + seqlen_new - cache_leftpad"] < 0:
        raise ValueError("expected cache_leftpad <= cache_seqlens (+ seqlen_new): a sequence starts before it ends")
    if plan.table is not None and (got["min page id"] < 0 or got["max page id"] >= plan.pool_k.shape[0]):
        raise ValueError(f"the page ids used (in [{got['min page id']}, {got['max page id']}]) must index the "
                         f"{plan.pool_k.shape[0]} pages of the cache")
    if rotary_cos is not None and got["last rotary position + 1"] > rotary_cos.shape[0]:
        raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions but this step rotates up to "
                         f"position {got['last rotary position + 1'] - 1}; pass a longer table (flash-attn wants "
                         f"seqlen_ro >= the cache length)")


def _used_page_range(plan: CachePlan, leftpad: torch.Tensor):
    """min and max page id among the pages this call reads or writes: positions [leftpad,
    seqlens + seqlen_new) of each sequence (a block table's other entries may hold anything)."""
    first = torch.arange(plan.table.shape[1], device=leftpad.device)[None, :] * plan.page_size  # (1, P)
    used = (first + plan.page_size > leftpad[:, None]) & (first < (plan.seqlens.long() + plan.n_new)[:, None])
    ids = plan.table.long().masked_fill(~used, 0)  # (B, P); page 0 stands in for unused entries
    return ids.min(), ids.max()


def append(plan: CachePlan, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """Write k_new, v_new (B, seqlen_new, Hkv, D) at positions [seqlens, seqlens + seqlen_new) of
    each sequence, in place in the caller's cache (cache_seqlens itself is not advanced)."""
    batch, n = k_new.shape[:2]
    pos = plan.seqlens.long()[:, None] + torch.arange(n, device=k_new.device)[None, :]  # (B, n) absolute
    if plan.table is None:
        page, off = torch.arange(batch, device=k_new.device)[:, None].expand(batch, n), pos
    else:
        page = plan.table.long().gather(1, pos // plan.page_size) if plan.table.shape[1] > 1 else \
            plan.table.long().expand(batch, n)
        off = pos % plan.page_size
    plan.pool_k.index_put_((page, off), k_new)  # pool[page[b, s], off[b, s]] = k_new[b, s]: (Hkv, D) each
    plan.pool_v.index_put_((page, off), v_new)


def decode_view(plan: CachePlan, appended: bool):
    """(k_cache, v_cache, block_table, cache_seqlens) for fa2lab.decode_attention, in its layout:
    dense (B, Hkv, Nmax, D) or pages (num_pages, Hkv, page_size, D) + int32 table. cache_seqlens
    counts the new tokens if they are `appended` already, else not (decode appends them)."""
    batch = plan.seqlens.shape[0]
    lengths = (plan.seqlens + plan.n_new if appended else plan.seqlens).to(torch.int32)  # (B,)
    if plan.leftpad is None:
        if plan.table is None:  # dense: (B, Nmax, Hkv, D) -> (B, Hkv, Nmax, D), a view
            return plan.pool_k[:batch].transpose(1, 2), plan.pool_v[:batch].transpose(1, 2), None, lengths
        return plan.pool_k.transpose(1, 2), plan.pool_v.transpose(1, 2), plan.table, lengths
    # Left padding: one-token pages, so sequence b's logical key j is physical position leftpad[b] + j.
    # (pages, page_size) merge into one dim without a copy for any cache whose tokens are evenly strided.
    num_pages, page_size = plan.pool_k.shape[:2]
    k1 = plan.pool_k.reshape(num_pages * page_size, 1, *plan.pool_k.shape[2:])  # (tokens, 1, Hkv, D)
    v1 = plan.pool_v.reshape(num_pages * page_size, 1, *plan.pool_v.shape[2:])
    lp = plan.leftpad.long()[:, None]  # (B, 1)
    pos = (lp + torch.arange(plan.capacity, device=lp.device)[None, :]).clamp(max=plan.capacity - 1)  # (B, capacity)
    if plan.table is None:
        page = torch.arange(batch, device=lp.device)[:, None]
    else:
        page = plan.table.long().gather(1, pos // page_size) if plan.table.shape[1] > 1 else plan.table.long()
    table1 = (page * page_size + pos % page_size).to(torch.int32)  # (B, capacity) one-token page ids
    return k1.transpose(1, 2), v1.transpose(1, 2), table1, (lengths - plan.leftpad).to(torch.int32)


def view_is_in_place(plan: CachePlan) -> bool:
    """Whether decode_view is the caller's memory, so that decode's own append through it is in
    place: always, except one-token pages (leftpad) over a cache whose tokens are not evenly
    strided (reshape copies it then)."""
    def mergeable(t):
        return t.shape[0] <= 1 or t.shape[1] <= 1 or t.stride(0) == t.shape[1] * t.stride(1)

    return plan.leftpad is None or (mergeable(plan.pool_k) and mergeable(plan.pool_v))
