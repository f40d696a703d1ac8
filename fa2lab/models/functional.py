"""Attention as a model layer needs it: padded batches through varlen, packed batches, and the
one naive path (probabilities for `output_attentions`, dense custom masks, dropout).

Model layers hold keys in slots: k (B, Hkv, Nk, D), where the Nq new queries are the last Nq
slots and `key_mask` (B, Nk) marks which slots hold real tokens (a tokenizer's attention mask,
extended over the cache). `padded_attention` never builds an Nq x Nk mask: it packs the real
tokens of each sequence, runs `fa2lab.varlen_attention`, and scatters the result back.

    slots      0 1 2 3 4 5        key_mask row  0 0 1 1 1 1   (left padding, Nq = 2)
    queries            q q        packed: keys 2..5, queries 4..5, causal bottom-right
"""

from __future__ import annotations

import dataclasses
import logging
import weakref

import torch

from fa2lab import _checks, masks
from fa2lab._deprecated import UNSET, renamed
from fa2lab.api import attention, resolve_scale, varlen_attention
from fa2lab.backends import BACKENDS, Case
from fa2lab.decode import decode_attention, decode_plan
from fa2lab.models import selection
from fa2lab.models.selection import select_backend
from fa2lab.variants.options import NONE, check_variants

log = logging.getLogger("fa2lab")
_naive_logged: set = set()

__all__ = ["padded_attention", "packed_attention", "cu_seqlens_from_position_ids", "naive_attention", "masked_attention",
           "prepare_static_decode", "static_decode", "clear_routes"]


def _decode_window(causal: bool, window_size, nq: int) -> tuple[bool, tuple[int, int]]:
    """A single causal query in the last slot sees every key at or before it: non-causal with the
    same left bound is the same mask, and one that torch SDPA can run."""
    if causal and nq == 1:
        return False, (window_size[0], -1)
    return causal, tuple(window_size)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _Route:
    """A decided and validated attention call for one key of `_route_key`: what the first call of
    that key chose (through `fa2lab.backends.choose`) and checked (the public call), run again
    without repeating either. A model makes the same call in every layer of a forward (prefill)
    or of a step (decode): the decision and the checks happen once per forward, not once per layer."""

    __slots__ = ("run",)

    def __init__(self, run):
        self.run = run


_routes: dict = {}
_ROUTE_MEMORY = 128  # a growing dynamic cache makes a new key each step; forget all past this many


def _route_key(q, k, v, causal, window_size, scale, backend):
    """Everything `Case` and the checks read: shapes, dtype, device, options, gradient mode."""
    return (q.shape, k.shape, v.shape, q.dtype, q.device, causal, window_size, scale, backend, _needs_grad(q, k, v))


def _triton_inference(q, k, v, *, causal, window_size, scale, return_lse, variants):
    """The Triton forward kernel that `fa2lab.kernels.attention` picks for these tensors (Hopper or
    portable), called without the autograd.Function that training needs (~20-40 us a call)."""
    from fa2lab.kernels.attention import kernel_forward

    left, right = masks.effective_window(causal, window_size)
    return kernel_forward(q, k, v, scale=scale, left=left, right=right)[0]


def clear_routes() -> None:
    """Forget the decided calls (a new crossover measurement changes what "auto" picks)."""
    _routes.clear()


selection.on_change(clear_routes)


def _remember(key, run) -> None:
    if len(_routes) >= _ROUTE_MEMORY:
        _routes.clear()
    _routes[key] = _Route(run)


def _dense_route(q, k, v, causal, window_size, scale, backend):
    """Decide (once per key) and run a call without variants; returns out (B, Hq, Nq, Dv)."""
    nq = q.shape[2]
    causal_1, window_1 = _decode_window(causal, window_size, nq)
    choice = select_backend(Case.of(q, k, v, causal_1, window_1, False, requires_grad=_needs_grad(q, k, v)), backend)
    cacheable = q.numel() > 0 and k.shape[2] > 0 and not torch.compiler.is_compiling()
    if choice.op == "decode":  # a generation step on CUDA: split-K over the whole cache, planned
        plan = decode_plan(q, k, v, causal=causal, window_size=window_size, softmax_scale=scale, backend=choice.name)
        # A full dense cache: every sequence holds all Nk slots (the length is a host-side shape).
        lengths = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
        run = lambda q, k, v: decode_attention(q, k, v, cache_seqlens=lengths, plan=plan)  # noqa: E731
    else:
        out = attention(q, k, v, causal=causal_1, window_size=window_1, softmax_scale=scale, backend=choice.name)
        if cacheable:  # checked by the call above; later calls of this key skip to the backend
            resolved, impl = resolve_scale(scale, q.shape[-1]), BACKENDS[choice.name]
            if choice.name == "triton" and not _needs_grad(q, k, v):
                impl = _triton_inference  # no autograd.Function around the kernel: nothing to differentiate
            _remember(_route_key(q, k, v, causal, window_size, scale, backend),
                      lambda q, k, v: impl(q, k, v, causal=causal_1, window_size=window_1, scale=resolved,
                                           return_lse=False, variants=NONE))
        return out
    if cacheable:
        _remember(_route_key(q, k, v, causal, window_size, scale, backend), run)
    return run(q, k, v)


_static_plans: dict = {}


def _static_key(q_shape, k, v, dtype, device, causal, window_size, scale, backend):
    return (tuple(q_shape), tuple(k.shape), tuple(v.shape), dtype, device, causal, tuple(window_size), scale, backend)


def prepare_static_decode(q, k, v, *, causal=True, window_size=(-1, -1), softmax_scale=None, backend="auto") -> bool:
    """Plan, eagerly, the generation steps that will later run traced against a static cache:
    q (B, Hq, Nq, D) of any Nq (the prefill's), k (B, Hkv, capacity, D), v (B, Hkv, capacity, Dv)
    the cache's whole buffers. Makes (once per shape) the decode plan of a one-token step against
    them, if fa2lab's dispatch sends such a step to split-K decode (CUDA, fp16/bf16, no gradients).
    A traced step (`static_decode`) cannot make plans: they read device properties. Returns whether
    a plan exists now."""
    b, hq, _, d = q.shape
    key = _static_key((b, hq, 1, d), k, v, q.dtype, q.device, causal, window_size, softmax_scale, backend)
    if key in _static_plans:
        return _static_plans[key] is not None
    step = q.new_empty(b, hq, 1, d)  # (B, Hq, 1, D): shapes only
    causal_1, window_1 = _decode_window(causal, window_size, 1)
    choice = select_backend(Case.of(step, k, v, causal_1, window_1, False), backend)
    plan = None
    if choice.op == "decode" and choice.name == "triton":
        plan = decode_plan(step, k, v, causal=causal, window_size=window_size, softmax_scale=softmax_scale,
                           backend=choice.name)
        # No workspace of its own: each traced call allocates it inside the graph, so that a CUDA
        # graph (mode="reduce-overhead") owns its buffers instead of mutating a tensor from outside.
        plan = dataclasses.replace(plan, workspace=())
    if len(_static_plans) > 64:
        _static_plans.clear()
    _static_plans[key] = plan
    return plan is not None


def static_decode(q, k, v, lengths, *, causal=True, window_size=(-1, -1), softmax_scale=None, backend="auto"):
    """q (B, Hq, Nq, D), the last Nq of lengths[b] filled slots of a static cache k (B, Hkv, capacity,
    D), v (B, Hkv, capacity, Dv); lengths int32 (B,) on the device, no padding -> (B, Hq, Nq, Dv).
    Traceable and capturable: a planned split-K decode over the filled slots where
    `prepare_static_decode` made a plan for this shape; otherwise masked SDPA over every slot."""
    key = _static_key(q.shape, k, v, q.dtype, q.device, causal, window_size, softmax_scale, backend)
    plan = _static_plans.get(key)
    if plan is not None:
        return decode_attention(q, k, v, cache_seqlens=lengths, plan=plan)
    filled = torch.arange(k.shape[2], device=q.device)[None, :] < lengths[:, None]  # (B, capacity)
    return masked_attention(q, k, v, filled, causal=causal, window_size=window_size, softmax_scale=softmax_scale,
                            query_end=lengths)


def padded_attention(q, k, v, key_mask=None, *, causal=True, window_size=(-1, -1), softmax_scale=None, backend="auto",
                     softcap=0.0, sinks=None, scale=UNSET):
    """q (B, Hq, Nq, D) are the last Nq of the Nk slots of k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv);
    key_mask (B, Nk) bool, True for real tokens, or None (all real). -> (B, Hq, Nq, Dv); rows of
    padding queries are zeros. Causal and window masks count real tokens only. softcap (Gemma 2)
    and sinks (Hq,) (gpt-oss) as in `fa2lab.attention`. (`scale=` is the deprecated name of
    softmax_scale.)"""
    scale = renamed("padded_attention", "scale", "softmax_scale", scale, softmax_scale)
    var = dict(softcap=softcap or 0.0, sinks=sinks)
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    if key_mask is not None:
        key_mask = key_mask.to(device=q.device, dtype=torch.bool)
        if key_mask.shape != (b, nk):
            raise ValueError(f"expected key_mask of shape (B, Nk) = ({b}, {nk}), got {tuple(key_mask.shape)}")
        if torch.compiler.is_compiling():
            # Traced: the mask's values are unknown, so attend through it densely (no sync, no
            # data-dependent shape); eager calls pack the real tokens instead.
            if softcap or sinks is not None:
                raise ValueError("a padding mask under torch.compile goes through masked SDPA, which has no softcap "
                                 "or sinks; run this model eagerly, or without a padding mask")
            return masked_attention(q, k, v, key_mask, causal=causal, window_size=window_size, softmax_scale=scale)
        if _all_real(key_mask):
            key_mask = None
    if key_mask is None:
        if not softcap and sinks is None:
            window_size = tuple(window_size)
            if not torch.compiler.is_compiling():  # traced code is specialised by torch.compile instead
                route = _routes.get(_route_key(q, k, v, causal, window_size, scale, backend))
                if route is not None:
                    return route.run(q, k, v)
            return _dense_route(q, k, v, causal, window_size, scale, backend)
        causal_1, window_1 = _decode_window(causal, window_size, nq)
        active = check_variants(q, k, **var).active
        choice = select_backend(Case.of(q, k, v, causal_1, window_1, False, requires_grad=_needs_grad(q, k, v),
                                        variants=active), backend)
        if choice.op == "decode":  # variants are not planned: the checked call
            return decode_attention(q, k, v, causal=causal, window_size=window_size, softmax_scale=scale,
                                    backend=choice.name, **var)
        return attention(q, k, v, causal=causal_1, window_size=window_1, softmax_scale=scale, backend=choice.name,
                         **var)

    query_mask = key_mask[:, nk - nq:]  # (B, Nq)
    lens_q, lens_k = query_mask.sum(1), key_mask.sum(1)  # (B,)
    q_packed = q.transpose(1, 2)[query_mask]  # (total_q, Hq, D)
    k_packed = k.transpose(1, 2)[key_mask]  # (total_k, Hkv, D)
    v_packed = v.transpose(1, 2)[key_mask]  # (total_k, Hkv, Dv)
    out = packed_attention(q_packed, k_packed, v_packed, _cumsum(lens_q), _cumsum(lens_k), causal=causal,
                           window_size=window_size, softmax_scale=scale, backend=backend, **var)  # (total_q, Hq, Dv)
    full = out.new_zeros(b, nq, hq, v.shape[-1])
    full[query_mask] = out
    return full.transpose(1, 2)  # (B, Hq, Nq, Dv)


def packed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=True, window_size=(-1, -1), softmax_scale=None,
                     backend="auto", softcap=0.0, sinks=None, scale=UNSET):
    """`fa2lab.varlen_attention` with the model-layer backend choice: q (total_q, Hq, D),
    k (total_k, Hkv, D), v (total_k, Hkv, Dv), cu_seqlens int32 (S + 1,) -> (total_q, Hq, Dv).
    (`scale=` is the deprecated name of softmax_scale.)"""
    scale = renamed("packed_attention", "scale", "softmax_scale", scale, softmax_scale)
    var = dict(softcap=softcap or 0.0, sinks=sinks)
    active = check_variants(q.transpose(0, 1)[None], k.transpose(0, 1)[None], **var).active
    cu_q, cu_k = _checks.check_int32("cu_seqlens_q", cu_seqlens_q), _checks.check_int32("cu_seqlens_k", cu_seqlens_k)
    lens = [(int(a), int(b)) for a, b in zip((cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist())]
    if max((n for n, _ in lens), default=0) <= 1:
        causal, window_size = _decode_window(causal, window_size, 1)
    hq, hkv, d, dv = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    grad = _needs_grad(q, k, v)
    cases = [Case(q.device.type, q.dtype, a, b, hq, hkv, d, dv, bool(causal), tuple(window_size), False,
                  cache="packed", requires_grad=grad, variants=active) for a, b in lens if a > 0]
    choice = select_backend(cases, backend)
    return varlen_attention(q, k, v, cu_q, cu_k, causal=causal, window_size=window_size, softmax_scale=scale,
                            backend=choice.name, **var)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Several sequences packed in one row (padding-free training): each starts where the position
    returns to the row's first (smallest) position, as in transformers' FA2 path. Positions that
    merely jump (multimodal RoPE's text row after an image) do not start one. position_ids (1, N)
    -> int32 (S + 1,), or None when the row holds a single sequence."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    if torch.compiler.is_compiling():
        # Finding the starts reads positions (a data-dependent shape): a compiled model takes packed
        # rows only with explicit cu_seq_lens_q/k, as transformers' padding-free collator passes them.
        return None
    # Every layer of one forward asks about the same tensor; finding the starts reads the device
    # (a host sync), so the answer is kept for that tensor until it changes.
    # (Keyed by the object itself, not its address: a freed tensor's memory can hold the next one.)
    ref, version = _packed_cache.get("tensor", lambda: None)(), _packed_cache.get("version")
    if ref is not position_ids or version != position_ids._version:
        _packed_cache.update(tensor=weakref.ref(position_ids), version=position_ids._version,
                             value=_packed_starts(position_ids[0]))
    return _packed_cache["value"]


_packed_cache: dict = {}


def _packed_starts(pos: torch.Tensor) -> torch.Tensor | None:
    starts = torch.nonzero(pos == pos.min()).flatten()  # (S,)
    if starts.numel() < 2 or int(starts[0]) != 0:
        return None
    end = torch.tensor([pos.numel()], device=pos.device)
    return torch.cat([starts, end]).to(torch.int32)


def _all_real(key_mask: torch.Tensor) -> bool:
    """Whether a mask marks no padding: one read of the device per mask tensor, not per layer
    (every layer of a forward gets the same mask), kept by identity and version as above."""
    ref, version = _all_real_cache.get("tensor", lambda: None)(), _all_real_cache.get("version")
    if ref is not key_mask or version != key_mask._version:
        _all_real_cache.update(tensor=weakref.ref(key_mask), version=key_mask._version, value=bool(key_mask.all()))
    return _all_real_cache["value"]


_all_real_cache: dict = {}


def masked_attention(q, k, v, key_mask, *, causal=True, window_size=(-1, -1), softmax_scale=None, query_end=None):
    """q (B, Hq, Nq, D) as the last Nq of the slots of k (B, Hkv, Nk, D) (or, with query_end (B,),
    slots query_end - Nq ..), key_mask (B, Nk) bool -> (B, Hq, Nq, Dv), rows of padding queries
    zeros: torch SDPA with the (B, 1, Nq, Nk) boolean mask of `_visible`. The path of a traced
    model with a mask: shapes never depend on the mask's values."""
    nq = q.shape[2]
    slots = None if query_end is None else query_end.long()[:, None] - nq + torch.arange(nq, device=q.device)
    visible = _visible(q, nq, k.shape[2], key_mask, causal, window_size, slots)  # (B, 1, Nq, Nk)
    has_key = visible.any(dim=-1, keepdim=True)  # (B, 1, Nq, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~has_key, scale=softmax_scale,
                                                           enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(~has_key, 0.0)  # (B, Hq, Nq, Dv)


def _cumsum(lens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)  # (B + 1,)


def naive_attention(q, k, v, *, key_mask=None, dense_mask=None, causal=True, window_size=(-1, -1), softmax_scale=None,
                    dropout=0.0, softcap=None, sinks=None, reason="output_attentions=True", scale=UNSET):
    """Materialised attention that also returns the probabilities: the one path that forms Nq x Nk.

    q (B, Hq, Nq, D) are the last Nq of Nk slots, k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv);
    key_mask (B, Nk) bool; dense_mask (B or 1, 1 or Hq, Nq, Nk), bool (True = attend) or additive
    float. sinks (Hq,): one more logit per row whose value is zero (gpt-oss). -> out (B, Hq, Nq, Dv)
    in q's dtype, probs (B, Hq, Nq, Nk) in q's dtype (rows with no visible key are zeros). Logged at
    WARNING once per reason: FA2 never forms these. (`scale=` is the deprecated name of softmax_scale.)
    """
    scale = renamed("naive_attention", "scale", "softmax_scale", scale, softmax_scale)
    if reason not in _naive_logged:
        _naive_logged.add(reason)
        log.warning("fa2lab: %s -> naive attention path (materialises Nq x Nk probabilities; FA2 never forms "
                    "them): O(Nq*Nk) memory", reason)
    nq, nk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    k_rep = k.repeat_interleave(group, dim=1)  # (B, Hq, Nk, D)
    v_rep = v.repeat_interleave(group, dim=1)  # (B, Hq, Nk, Dv)
    s = (q @ k_rep.transpose(-2, -1)).to(acc) * scale  # (B, Hq, Nq, Nk)
    if softcap is not None and softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    visible = _visible(q, nq, nk, key_mask, causal, window_size)  # (B or 1, 1, Nq, Nk)
    if dense_mask is not None:
        if dense_mask.dtype == torch.bool:
            visible = visible & dense_mask
        else:
            s = s + dense_mask.to(acc)
            visible = visible & (dense_mask > torch.finfo(dense_mask.dtype).min / 2)
    s = s.masked_fill(~visible, float("-inf"))
    has_key = visible.any(dim=-1, keepdim=True)  # (., ., Nq, 1)
    if sinks is None:
        p = torch.softmax(s.masked_fill(~has_key, 0.0), dim=-1).masked_fill(~has_key, 0.0)
    else:  # the sink joins the denominator; rows with no key keep only the sink: P = 0
        sink = sinks.to(acc).view(1, -1, 1, 1).expand(s.shape[0], -1, nq, 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    p = p.to(q.dtype)
    p_drop = torch.nn.functional.dropout(p, p=dropout) if dropout > 0 else p
    return p_drop @ v_rep, p  # (B, Hq, Nq, Dv), (B, Hq, Nq, Nk)


def _visible(q, nq, nk, key_mask, causal, window_size, query_slots=None) -> torch.Tensor:
    """(B or 1, 1, Nq, Nk) bool. With a key mask, causal and window distances count real tokens
    only, as in `padded_attention` (the rank of a slot among the real slots of its row).
    query_slots (B, Nq): the slots of the queries (default: the last Nq)."""
    left, right = masks.effective_window(causal, window_size)
    if key_mask is None:
        return masks.dense_mask(nq, nk, causal, window_size, device=q.device)[None, None]
    key_mask = key_mask.to(device=q.device, dtype=torch.bool)  # (B, Nk)
    rank = key_mask.long().cumsum(1) - 1  # (B, Nk): index of each real slot among real slots
    if query_slots is None:
        rank_q, real_q = rank[:, nk - nq:, None], key_mask[:, nk - nq:, None]  # (B, Nq, 1)
    else:
        slots = query_slots.clamp(0, nk - 1)
        rank_q, real_q = rank.gather(1, slots)[..., None], key_mask.gather(1, slots)[..., None]  # (B, Nq, 1)
    rank_k = rank[:, None, :]  # (B, 1, Nk)
    visible = key_mask[:, None, :] & real_q  # (B, Nq, Nk)
    if left >= 0:
        visible &= rank_k >= rank_q - left
    if right >= 0:
        visible &= rank_k <= rank_q + right
    return visible[:, None]
