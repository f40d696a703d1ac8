"""Split-K decoding (Flash-Decoding) in readable PyTorch.

A few new queries per sequence (Nq, usually 1) attend to a long cache. FA2 alone gives the GPU one
block per (sequence, head) and leaves it mostly idle; Flash-Decoding cuts the cache into
`num_splits` chunks, computes each chunk's partial (out, lse) independently - FA2's online softmax
over the chunk's tiles - and merges the partials by their log-sum-exp (`merge.py`).
num_splits = 1 is plain FA2.

Optional FlashDecoding++ "unified max": every partial softmax uses one fixed reference phi instead
of its running max, so partials need no rescaling. exp(s - phi) overflows when a logit exceeds
phi by more than log(float max) and underflows to 0 when every logit of a row is far below phi;
both are detected, and the call is recomputed with the exact online softmax.

Variants (soft-capping, ALiBi, bias, score/mask functions) change each tile's logits as in the
dense backends; sinks are added once, to the merged result.

Fast twin: fa2lab/kernels/decode.py. Tests: tests/test_decode.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fa2lab.decode.merge import merge_states_stack
from fa2lab.tiled.layout import pack_rows, unpack_lse, unpack_rows
from fa2lab.tiled.softmax import online_softmax_step
from fa2lab.variants.options import Variants
from fa2lab.variants.scores import TileIndex, logits, mod_visible

NEG_INF = float("-inf")
DECODE_BLOCK_K = 512  # keys per tile: the score tile has only Nq*G rows, so long tiles amortise op overhead


@dataclass(frozen=True)
class SplitPlan:
    """Key ranges of the splits: tile-aligned, never more splits than tiles."""

    block_k: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def num_splits(self) -> int:
        return len(self.ranges)


def plan_splits(cache_len: int, num_splits: int, block_k: int = DECODE_BLOCK_K) -> SplitPlan:
    if cache_len == 0:
        return SplitPlan(block_k, ((0, 0),))
    n_tiles = math.ceil(cache_len / block_k)
    num_splits = max(1, min(num_splits, n_tiles))
    base, extra = divmod(n_tiles, num_splits)  # the first `extra` splits take one tile more
    bounds = [0]
    for s in range(num_splits):
        bounds.append(bounds[-1] + base + (s < extra))
    ranges = tuple((a * block_k, min(cache_len, b * block_k)) for a, b in zip(bounds, bounds[1:]))
    return SplitPlan(block_k, ranges)


def auto_num_splits(work_items: int, cache_len: int, num_units: int, block_k: int = DECODE_BLOCK_K,
                    max_splits: int = 128) -> int:
    """FlashAttention-2's heuristic: split only when B*Hkv work items leave units idle; take the
    fewest splits whose wave efficiency is within 85% of the best."""
    n_tiles = max(1, math.ceil(cache_len / block_k))
    if work_items <= 0 or work_items >= 0.8 * num_units:  # no work (Hkv = 0), or enough to fill the units
        return 1
    candidates = range(1, max(1, min(max_splits, num_units, n_tiles)) + 1)
    eff = {s: (work_items * s / num_units) / math.ceil(work_items * s / num_units) for s in candidates}
    best = max(eff.values())
    return next(s for s in candidates if eff[s] >= 0.85 * best)


def default_num_units(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return torch.get_num_threads()


def _tile_mask(j0, j1, seqlens, nq, group, left, right):
    """Visible (query, key) pairs of a tile for every sequence: (B, 1, Nq*G, Bc)."""
    pos = torch.arange(j0, j1, device=seqlens.device)[None, None, :]  # (1, 1, Bc)
    qpos = (seqlens[:, None] - nq + torch.arange(nq, device=seqlens.device)[None, :])[..., None]  # (B, Nq, 1)
    visible = pos < seqlens[:, None, None]  # (B, 1, Bc)
    if left >= 0:
        visible = visible & (pos >= qpos - left)
    if right >= 0:
        visible = visible & (pos <= qpos + right)
    visible = visible.expand(-1, nq, -1)  # (B, Nq, Bc)
    return visible.repeat_interleave(group, dim=1).unsqueeze(1)  # (B, 1, Nq*G, Bc)


@dataclass
class UnifiedMaxStats:
    phi: float
    max_shift: float  # largest (logit - phi) seen; overflow above log(float max)
    min_row_shift: float  # smallest per-row max (logit - phi); underflow below log(float tiny)
    exact: bool


def _variant_logits(s, visible, var, seqlens, t0, t1, nq, group):
    """The variants on a decode tile s (B, Hkv, Nq*G, Bc): soft-capping, ALiBi (distance from the
    query's position seqlens[b] - Nq + i), bias, score_mod, mask_mod (with the indices a dense call
    on sequence b's first seqlens[b] keys would give). -> (logits, visible)."""
    b, hkv, rows, _ = s.shape
    r = torch.arange(rows, device=s.device)
    idx = TileIndex(torch.arange(b, device=s.device).view(-1, 1, 1, 1),
                    torch.arange(hkv, device=s.device).view(1, -1, 1, 1) * group + (r % group).view(1, 1, -1, 1),
                    (r // group).view(1, 1, -1, 1), torch.arange(t0, t1, device=s.device).view(1, 1, 1, -1))
    s = logits(s, Variants(softcap=var.softcap), idx, nq, nq)[0]
    if var.alibi_slopes is not None:
        qpos = seqlens.view(-1, 1, 1, 1) - nq + idx.q  # (B, 1, Nq*G, 1)
        s = s - var.alibi_slopes.to(s.dtype)[idx.b, idx.h] * (qpos - idx.kv).abs().to(s.dtype)
    s = logits(s, Variants(attn_bias=var.attn_bias, score_mod=var.score_mod), idx, nq, nq)[0]
    keep = mod_visible(var, idx)
    return s, visible if keep is None else visible & keep


def apply_sinks(out, lse, sinks):
    """exp(sinks[h]) joins each row's denominator: out (B, Hq, Nq, Dv), lse (B, Hq, Nq)."""
    lse_s = torch.logaddexp(lse, sinks.to(lse.dtype).view(1, -1, 1))
    return out * torch.exp(lse - lse_s)[..., None], lse_s


def _partial(q_p, reader, seqlens, j0, j1, nq, group, left, right, block_k, acc_t, phi=None, var=None):
    """FA2 online softmax over keys [j0, j1): out (B, Hkv, Nq*G, Dv), lse (B, Hkv, Nq*G),
    and with a unified max phi, also the largest logit of each row (for the range check).
    var: the call's fa2lab.variants.Variants (softcap, ALiBi, bias, score/mask functions) or None."""
    b, hkv, rows, _ = q_p.shape
    m_i = torch.full((b, hkv, rows, 1), NEG_INF, dtype=acc_t, device=q_p.device)
    l_i = torch.zeros_like(m_i)
    acc = torch.zeros(b, hkv, rows, reader.head_dim_v, dtype=acc_t, device=q_p.device)
    for t0 in range(j0, j1, block_k):
        t1 = min(t0 + block_k, j1)
        visible = _tile_mask(t0, t1, seqlens, nq, group, left, right)  # (B, 1, Nq*G, Bc)
        if not bool(visible.any()):
            continue  # past every sequence's end, or outside every window
        k_t, v_t = reader.read(t0, t1, acc_t)  # (B, Hkv, Bc, D), (B, Hkv, Bc, Dv)
        # Slots past a sequence's end hold whatever was there (NaN, stale pages): P is 0 there,
        # but 0 * NaN is NaN, so their V must be zeroed, not only their scores masked.
        stale = torch.arange(t0, t1, device=seqlens.device)[None, :] >= seqlens[:, None]  # (B, Bc)
        if bool(stale.any()):
            v_t = v_t.masked_fill(stale[:, None, :, None], 0.0)
        s = q_p @ k_t.transpose(-1, -2)  # (B, Hkv, Nq*G, Bc)
        if var is not None and var.changes_scores:
            s, visible = _variant_logits(s, visible, var, seqlens, t0, t1, nq, group)
        s = s.masked_fill(~visible, NEG_INF)
        if phi is None:
            m_i, l_i, acc, _ = online_softmax_step(s, m_i, l_i, acc, v_t)
        else:  # unified max: no rescaling; m_i only records the row max for the range check
            m_tile = s.amax(dim=-1, keepdim=True)
            p = s.sub_(phi).exp_()
            l_i = l_i.add_(p.sum(-1, keepdim=True))
            acc = acc.add_(p @ v_t)
            m_i = torch.maximum(m_i, m_tile)
    empty = l_i == 0
    out = acc / l_i.masked_fill(empty, 1.0)
    ref = m_i if phi is None else torch.full_like(m_i, phi)
    lse = (ref + l_i.log()).masked_fill(empty, NEG_INF).squeeze(-1)
    return out, lse, m_i.squeeze(-1)


def splitk_decode(q, reader, seqlens, *, scale, left, right, num_splits, block_k=DECODE_BLOCK_K,
                  unified_max=None, fallback=True, return_partials=False, variants=None):
    """q (B, Hq, Nq, D), a KVReader, seqlens (B,) -> out (B, Hq, Nq, Dv) in q's dtype,
    lse (B, Hq, Nq) float32 (float64 for float64), and UnifiedMaxStats or None.
    variants: fa2lab.variants.Variants without dropout; sinks join the merged result (the partials
    stay plain (out, lse) pairs over their keys).
    fallback=False keeps a unified-max result even when its range check fails (to show the
    failure); return_partials adds the per-split (outs (S, B, Hq, Nq, Dv), lses (S, B, Hq, Nq))."""
    b, hq, nq, d = q.shape
    hkv, group = reader.heads_kv, hq // reader.heads_kv
    acc_t = torch.float64 if q.dtype == torch.float64 else torch.float32
    # GQA packing: the G query heads of a K/V head are rows of one tile, so K/V are read once.
    q_p = pack_rows(q.to(acc_t) * scale, hkv).view(b, hkv, nq * group, d)  # (B, Hkv, Nq*G, D)
    seqlens = seqlens.to(device=q.device, dtype=torch.long)
    max_len = int(seqlens.max()) if b else 0
    plan = plan_splits(max_len, num_splits, block_k)

    def run(phi):
        parts = [_partial(q_p, reader, seqlens, j0, j1, nq, group, left, right, block_k, acc_t, phi, variants)
                 for j0, j1 in plan.ranges]
        outs = torch.stack([p[0] for p in parts])  # (S, B, Hkv, Nq*G, Dv)
        lses = torch.stack([p[1] for p in parts])  # (S, B, Hkv, Nq*G)
        row_max = torch.stack([p[2] for p in parts]).amax(0)  # (B, Hkv, Nq*G)
        out, lse = merge_states_stack(outs, lses)
        return out, lse, row_max, (outs, lses)

    stats = None
    if unified_max is None:
        out, lse, _, partials = run(None)
    else:
        out, lse, row_max, partials = run(float(unified_max))
        finfo = torch.finfo(acc_t)
        has_key = row_max > NEG_INF
        shift = row_max[has_key] - float(unified_max)
        max_shift = float(shift.max()) if shift.numel() else NEG_INF
        min_shift = float(shift.min()) if shift.numel() else 0.0
        # Overflow: l sums up to max_len terms of exp(max_shift). Underflow: keys more than
        # log(1/eps) below their row's max are negligible anyway, so the row max needs that margin
        # above the smallest normal number.
        exact = bool(max_shift < math.log(finfo.max) - math.log(max_len + 1)
                     and min_shift > math.log(finfo.tiny) + math.log(1 / finfo.eps))
        stats = UnifiedMaxStats(float(unified_max), max_shift, min_shift, exact)
        if not exact and fallback:
            out, lse, _, partials = run(None)

    dv = out.shape[-1]
    out = unpack_rows(out.reshape(b * hkv, nq * group, dv), b, hq, hkv)  # (B, Hq, Nq, Dv)
    lse = unpack_lse(lse.reshape(b * hkv, nq * group), b, hq, hkv)  # (B, Hq, Nq)
    if variants is not None and variants.sinks is not None:
        out, lse = apply_sinks(out, lse, variants.sinks)
    if not return_partials:
        return out.to(q.dtype), lse, stats
    outs, lses = partials
    n_s = outs.shape[0]  # the splits fold into the batch for unpacking
    outs = unpack_rows(outs.reshape(n_s * b * hkv, nq * group, dv), n_s * b, hq, hkv).view(n_s, b, hq, nq, dv)
    lses = unpack_lse(lses.reshape(n_s * b * hkv, nq * group), n_s * b, hq, hkv).view(n_s, b, hq, nq)
    return out.to(q.dtype), lse, stats, (outs, lses)
