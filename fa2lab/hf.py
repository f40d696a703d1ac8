"""fa2lab as a Hugging Face transformers attention backend.

    import fa2lab.hf
    fa2lab.hf.register()                                   # adds "fa2lab" (backend "auto")
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fa2lab")
    fa2lab.hf.use_varlen_vision(model)                     # Qwen3-VL: vision tower through varlen

transformers is optional (`pip install -e ".[hf]"`); importing this module does not need it,
`register()` does. Two things are registered under one name:

  * an attention function, called by every attention layer with q (B, Hq, Nq, D) and the
    unrepeated k, v (B, Hkv, Nk, D) that come out of the cache; GQA stays unrepeated;
  * a mask function. transformers builds one mask per forward for the backend; for fa2lab it is
    the tokenizer's 2-D padding mask over the key slots in use (B, used), or None when every slot
    holds a real token. Nothing Nq x Nk is formed: padding goes through varlen attention. A
    static cache's unused tail is cut off by the mask's length. Models that overlay a mask function
    of their own (or_mask_function / and_mask_function, which transformers >= 5 flags with
    use_vmap) get transformers' dense boolean mask and the logged naive path instead. Not seen,
    as by transformers' own flash_attention_2: overlays under transformers 4.x, and 5.x's
    block_sequence_ids (bidirectional image blocks of Gemma 3/4, PaliGemma). Qwen3 and Qwen3-VL
    use neither.

Speed: every layer of a forward makes the same call, so the backend is decided and the inputs
checked once per forward and shape (fa2lab.models.functional's route memory), not once per layer;
generation steps on CUDA run planned split-K `decode_attention` with no host-device sync.
With a static cache and a compiled step (`torch.compile(model.forward, mode="reduce-overhead",
fullgraph=True)`, the prefill run eagerly as generate does): the eager prefill plans the one-token
step against the cache's buffers, and the traced step decodes over the filled slots with the fill
level as a device tensor (no sync, captured in the CUDA graph). That needs a forward without a
tokenizer mask (padding is judged by the arguments, never by reading values); with one, the
traced step attends through a device mask over every slot (torch SDPA), as sdpa does.

Other inputs: packed sequences (one row, position_ids restarting, or flash-style cu_seq_lens_q/k
kwargs) go through varlen; sliding windows become window_size=(w - 1, w - 1) as in FA2;
Gemma 2's logit soft-capping (`softcap`) and gpt-oss's attention sinks (`s_aux`) run in every
fa2lab path (dense, varlen, split-K decode); `output_attentions=True` and attention dropout in
training use the logged naive path.
"""

from __future__ import annotations

import logging

import torch

from fa2lab.models.functional import (cu_seqlens_from_position_ids, masked_attention, naive_attention,
                                      packed_attention, padded_attention, prepare_static_decode, static_decode)

log = logging.getLogger("fa2lab")
INSTALL_HINT = 'fa2lab.hf needs transformers (>= 4.57, for Qwen3-VL): pip install -e ".[hf]"'
_dense_logged = False

__all__ = ["register", "make_attention_forward", "attention_mask", "use_varlen_vision", "INSTALL_HINT"]


def _transformers():
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return AttentionInterface, AttentionMaskInterface


def register(name: str = "fa2lab", backend: str = "auto") -> str:
    """Register fa2lab under `name` (attention and mask functions); returns the name.
    backend: "auto" (by device, dtype, head dim, length: fa2lab.models.selection) or a fixed one,
    e.g. register("fa2lab_tiled", backend="tiled") to force the PyTorch FA2."""
    attention_interface, mask_interface = _transformers()
    attention_interface.register(name, make_attention_forward(backend))
    mask_interface.register(name, attention_mask)
    return name


def make_attention_forward(backend: str = "auto"):
    """The attention function transformers calls: (module, q, k, v, mask, ...) -> (out (B, Nq, Hq, Dv), probs)."""

    def fa2lab_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                 sliding_window=None, softcap=None, is_causal=None, **kwargs):
        sinks = kwargs.get("s_aux")  # gpt-oss's learnable sinks (Hq,)
        var = dict(softcap=softcap or 0.0, sinks=sinks)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        window = (sliding_window - 1, sliding_window - 1) if sliding_window else (-1, -1)
        nq = query.shape[2]
        mask2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        mask4d = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None
        if attention_mask is not None and attention_mask.dim() == 1 and not (softcap or sinks is not None):
            # a traced static cache without padding: the fill level per sequence (B,) int32
            out = static_decode(query, key, value, attention_mask, causal=causal, window_size=window,
                                softmax_scale=scaling, backend=backend)
            return out.transpose(1, 2).contiguous(), None
        if attention_mask is not None and attention_mask.dim() == 1:
            mask2d = _slot_codes(attention_mask, key.shape[2])
        if mask2d is not None and mask2d.dtype == torch.int8:  # a traced static cache: slot codes
            if softcap or sinks is not None:
                raise ValueError("a static cache under torch.compile attends through masked SDPA, which has no "
                                 "softcap or sinks; run this model eagerly, or with a dynamic cache")
            out = masked_attention(query, key, value, mask2d == STATIC_REAL, causal=causal, window_size=window,
                                   softmax_scale=scaling, query_end=(mask2d != STATIC_UNUSED).sum(1))
            return out.transpose(1, 2).contiguous(), None
        if mask2d is not None and key.shape[2] > mask2d.shape[1]:  # a static cache holds more slots than are in use
            if not (softcap or sinks is not None or dropout and module.training or kwargs.get("output_attentions")):
                # plan its later one-token steps now (eagerly), for a compiled decode step to find
                prepare_static_decode(query, key, value, causal=causal, window_size=window, softmax_scale=scaling,
                                      backend=backend)
            key, value = key[:, :, :mask2d.shape[1]], value[:, :, :mask2d.shape[1]]

        naive_reason = ("output_attentions=True" if kwargs.get("output_attentions") else
                        "a dense mask from the model's own mask function" if mask4d is not None else
                        f"attention dropout {dropout}" if dropout and module.training else None)
        if naive_reason:
            out, probs = naive_attention(query, key, value, key_mask=mask2d, dense_mask=mask4d,
                                         causal=causal and mask4d is None, window_size=window, softmax_scale=scaling,
                                         dropout=dropout if module.training else 0.0, softcap=softcap,
                                         sinks=sinks, reason=naive_reason)
            return out.transpose(1, 2).contiguous(), probs

        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q is None and mask2d is None and nq == key.shape[2]:
            cu_q = cu_k = cu_seqlens_from_position_ids(kwargs.get("position_ids"))
        if cu_q is not None and mask2d is None:  # packed: (1, H, total, D) holds several sequences
            b = query.shape[0]
            flat = lambda x: x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[-1])  # noqa: E731  (B*N, H, D)
            out = packed_attention(flat(query), flat(key), flat(value), cu_q, cu_k, causal=causal,
                                   window_size=window, softmax_scale=scaling, backend=backend, **var)  # (total_q, Hq, Dv)
            return out.reshape(b, nq, *out.shape[1:]), None

        out = padded_attention(query, key, value, mask2d, causal=causal, window_size=window, softmax_scale=scaling,
                               backend=backend, **var)  # (B, Hq, Nq, Dv)
        return out.transpose(1, 2).contiguous(), None

    fa2lab_attention_forward.backend = backend
    return fa2lab_attention_forward


def attention_mask(**kwargs):
    """transformers' mask hook: the 2-D padding mask over the key slots in use (B, used) bool, or
    None when all kv_length slots hold real tokens. Called with keywords: batch_size, q_length,
    kv_length, q_offset, kv_offset, mask_function, attention_mask, ... (transformers < 5 passes
    cache_position, the query slots, instead of q_length and q_offset)."""
    if kwargs.get("use_vmap"):
        return _dense_mask(kwargs)
    pad = kwargs.get("attention_mask")
    kv_length, kv_offset = kwargs["kv_length"], int(kwargs.get("kv_offset") or 0)  # kv_offset: a Python int
    if kwargs.get("q_length") is not None:
        q_length, q_offset = kwargs["q_length"], kwargs.get("q_offset")
        q_offset = 0 if q_offset is None else q_offset  # a static cache's is a tensor: no truth test
    else:
        q_length, q_offset = kwargs["cache_position"].shape[0], kwargs["cache_position"][0]
    if isinstance(q_offset, torch.Tensor) and torch.compiler.is_compiling():
        # A static cache under torch.compile: its fill level is a device tensor. Without padding
        # (no tokenizer mask: known from the arguments, not from values) and with the plain causal
        # mask, the layers get the fill level itself, (B,) int32, and decode over the filled slots;
        # otherwise slot codes on the device (the layer attends through them, over every slot).
        plain = getattr(kwargs.get("mask_function"), "__name__", "") == "causal_mask_function"
        if pad is None and plain and isinstance(kv_offset, int) and kv_offset == 0:
            filled = (q_offset + q_length).clamp(0, kv_length).to(torch.int32)  # () fill level after this call
            return filled.reshape(1).expand(kwargs["batch_size"]).contiguous()  # (B,)
        return _traced_static_mask(pad, kwargs, q_offset, kv_offset, q_length, kv_length)
    used = int(q_offset) - kv_offset + int(q_length)  # slots of the key tensor the layer will see
    if pad is None:
        device = kwargs.get("device", "cpu")
        return None if used == kv_length else torch.ones(kwargs["batch_size"], used, dtype=torch.bool, device=device)
    pad = pad.to(torch.bool)
    end = kv_offset + used
    pad = pad[:, kv_offset:end] if pad.shape[1] >= end else pad[:, -used:]
    if used == kv_length and not torch.compiler.is_compiling() and bool(pad.all()):  # once per forward
        return None
    return pad


def _traced_static_mask(pad, kwargs, q_offset, kv_offset, q_length, kv_length):
    """(B, kv_length) int8 slot codes, no value read back: STATIC_UNUSED past the fill level
    q_offset + q_length, STATIC_PADDING for a padding token, STATIC_REAL for a real one. The
    queries are the last q_length slots in use."""
    device = q_offset.device
    slots = torch.arange(kv_length, device=device) + kv_offset  # (kv_length,)
    used = (slots < q_offset + q_length)[None, :]  # (1, kv_length)
    if pad is None:
        real = used.expand(kwargs["batch_size"], -1)
    else:
        pad = pad.to(device=device, dtype=torch.bool)[:, kv_offset:kv_offset + kv_length]  # (B, <= kv_length)
        real = torch.nn.functional.pad(pad, (0, kv_length - pad.shape[1]), value=True) & used  # new tokens past it
    return used.to(torch.int8) + real.to(torch.int8)  # 0 unused, 1 padding, 2 real


STATIC_UNUSED, STATIC_PADDING, STATIC_REAL = 0, 1, 2


def _slot_codes(filled: torch.Tensor, kv_length: int) -> torch.Tensor:
    """Fill levels (B,) -> the slot codes of `_traced_static_mask` (B, kv_length) int8, no padding."""
    used = torch.arange(kv_length, device=filled.device)[None, :] < filled[:, None]  # (B, kv_length)
    return used.to(torch.int8) * STATIC_REAL


def _dense_mask(kwargs):
    """The model overlays its own mask function: fa2lab cannot see through it, so take
    transformers' dense boolean mask (B, 1, Nq, Nk) and let attention run the naive path."""
    global _dense_logged
    from transformers.masking_utils import sdpa_mask

    if not _dense_logged:
        _dense_logged = True
        log.warning("fa2lab: the model overlays a custom mask function; using transformers' dense (B, 1, Nq, Nk) "
                    "mask and the naive attention path for it")
    return sdpa_mask(**dict(kwargs, allow_is_causal_skip=False))


def use_varlen_vision(model, backend: str = "auto") -> int:
    """Put `fa2lab.models.FlashAttention2Vision` (sharing the weights) in place of every vision
    attention module that takes packed patches with cu_seqlens (Qwen3-VL's). transformers only
    hands cu_seqlens to backends named "flash..."; for others it splits the patches per image and
    calls dense attention once per image. Returns the number of modules replaced."""
    from fa2lab.models.vision import FlashAttention2Vision

    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__.endswith("VisionAttention") and hasattr(child, "qkv") and hasattr(child, "proj"):
                setattr(parent, child_name, FlashAttention2Vision.from_module(child, backend=backend))
                replaced += 1
    if replaced:
        log.info("fa2lab: %d vision attention modules now run packed patches through varlen attention", replaced)
    return replaced
