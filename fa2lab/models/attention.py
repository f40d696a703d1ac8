"""`FlashAttention2`: a Qwen3-style attention layer (projections, q/k RMSNorm, RoPE, GQA) on fa2lab.

Parameter names follow Hugging Face's Qwen3Attention (q_proj, k_proj, v_proj, o_proj, q_norm,
k_norm), so `load_state_dict(hf_layer.self_attn.state_dict())` moves weights across.

    layer = create_flash_attention_2(config, layer_idx=0)           # backend "auto"
    out, attn_weights, cache = layer(hidden_states, attention_mask=mask, use_cache=True)

What each call runs:
    no cache / DynamicKVCache / a transformers Cache   padded_attention: fa2lab.attention, or
                                                        varlen attention over the real tokens when
                                                        the 2-D mask has padding
    SplitKCache                                        prefill as above, then decode steps through one
                                                        planned split-K decode_attention each (in-place
                                                        append, ragged lengths, no host sync)
    SplitKCache(cuda_graph=True)                        the same, each one-token step the replay of a
                                                        captured CUDA graph per layer (DecodeSession)
    output_attentions=True                              the logged naive path (probabilities)
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fa2lab.models.cache import DynamicKVCache, SplitKCache
from fa2lab.models.config import layer_config
from fa2lab.models.functional import naive_attention, padded_attention
from fa2lab.models.rotary import RotaryEmbedding, apply_rotary

log = logging.getLogger("fa2lab")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 whatever x's dtype (float64 included), as Qwen3's."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(x.dtype)


class FlashAttention2(nn.Module):
    """Multi-head attention with GQA, Qwen3's per-head q/k RMSNorm and RoPE, run by fa2lab.

    forward(hidden_states (B, N, hidden), attention_mask=None, position_ids=None,
            past_key_value=None, output_attentions=False, use_cache=False, cache_position=None)
    -> (output (B, N, hidden), attn_weights (B, Hq, N, Nk) or None, past_key_value or None)

    attention_mask: (B, Nk) from a tokenizer, 1 for real tokens and 0 for padding, over the cached
      and the new tokens (Nk = past + N); any padding side. A 4-D mask (B, 1, N, Nk), bool or
      additive, goes through the logged naive path.
    position_ids: (B, N), or (3, B, N) for Qwen3-VL's multimodal RoPE. Default: the count of real
      tokens before each one (what transformers' generate passes).
    past_key_value: None, DynamicKVCache, SplitKCache or any object with transformers'
      `update(k, v, layer_idx, cache_kwargs)`; created as a DynamicKVCache when use_cache and None.
    cache_position: (N,) the slots of the new tokens (transformers' StaticCache needs it).
    """

    def __init__(self, config, layer_idx: int | None = None, *, backend: str = "auto"):
        super().__init__()
        cfg = layer_config(config)
        self.config, self.layer_idx, self.backend = cfg, layer_idx, backend
        self.num_heads, self.num_key_value_heads, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                                   cfg.head_dim)
        self.num_key_value_groups = cfg.groups
        self.scaling = self.head_dim ** -0.5
        window = cfg.window_for(layer_idx)
        # transformers' sliding_window counts the query itself: left = sliding_window - 1 keys back
        self.window_size = (window - 1, -1) if window else (-1, -1)
        hidden, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(self.head_dim, cfg.rope_theta, cfg.mrope_section)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None):
        _check_hidden(hidden_states, self.q_proj.in_features)
        b, n, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, n, -1, self.head_dim)  # (B, N, Hq, D)
        k = self.k_proj(hidden_states).view(b, n, -1, self.head_dim)  # (B, N, Hkv, D)
        v = self.v_proj(hidden_states).view(b, n, -1, self.head_dim)  # (B, N, Hkv, D)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, D)

        if use_cache and past_key_value is None:
            past_key_value = DynamicKVCache()
        mask2d, mask4d = _split_mask(attention_mask, b)
        position_ids = self._positions(position_ids, mask2d, past_key_value, cache_position, b, n, q.device)
        cos, sin = self.rotary(position_ids, dtype=q.dtype)  # (B, N, D)
        q, k = apply_rotary(q, k, cos, sin)

        if isinstance(past_key_value, SplitKCache):
            if mask4d is not None:
                raise ValueError("a SplitKCache stores sequences without padding, so a 4-D mask over slots cannot "
                                 "apply; pass the 2-D (B, Nk) padding mask, or use a DynamicKVCache")
            out, weights = self._attend_splitk(q, k, v, mask2d, past_key_value, output_attentions)
        else:
            if past_key_value is not None:
                kwargs = {"cache_position": cache_position} if cache_position is not None else None
                k, v = past_key_value.update(k, v, self.layer_idx if self.layer_idx is not None else 0, kwargs)
                k, v, mask2d = _used_slots(k, v, mask2d, cache_position, n)
            out, weights = self._attend(q, k, v, mask2d, mask4d, output_attentions)

        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, Hq * D)
        return self.o_proj(out), weights, past_key_value if use_cache else None

    def _attend(self, q, k, v, key_mask, mask4d, output_attentions):
        """q (B, Hq, N, D) as the last N of the Nk slots of k, v -> (B, Hq, N, D), probs or None."""
        dropout = self.config.attention_dropout if self.training else 0.0
        if output_attentions or mask4d is not None or dropout > 0:
            reason = ("output_attentions=True" if output_attentions else
                      "a 4-D attention mask" if mask4d is not None else f"attention dropout {dropout}")
            out, probs = naive_attention(q, k, v, key_mask=key_mask, dense_mask=mask4d, causal=True,
                                         window_size=self.window_size, softmax_scale=self.scaling, dropout=dropout,
                                         reason=reason)
            return out, probs if output_attentions else None
        out = padded_attention(q, k, v, key_mask, causal=True, window_size=self.window_size, softmax_scale=self.scaling,
                               backend=self.backend)
        return out, None

    def _attend_splitk(self, q, k, v, mask2d, cache: SplitKCache, output_attentions):
        idx = self.layer_idx if self.layer_idx is not None else 0
        n = q.shape[2]
        new_mask = None if mask2d is None else mask2d[:, -n:]
        was_empty = idx not in cache.host_max  # host-side: no read of the lengths
        if not was_empty and new_mask is not None and not bool(new_mask.all()):
            raise ValueError("a SplitKCache takes padding only in its first (prefill) call; later calls must bring "
                             "real tokens only (pass attention_mask=None or all ones for them)")
        if not was_empty and not output_attentions:  # decode: append and attend in one planned call
            return cache.decode(idx, q, k, v, causal=True, window_size=self.window_size,
                                softmax_scale=self.scaling), None
        cache.append(idx, k, v, new_mask if was_empty else None)
        if output_attentions:
            k_all, v_all, slot_mask = cache.right_aligned(idx)
            if was_empty and new_mask is not None:
                q = _right_align_queries(q, new_mask)
            out, probs = naive_attention(q, k_all, v_all, key_mask=slot_mask, causal=True,
                                         window_size=self.window_size, softmax_scale=self.scaling)
            if was_empty and new_mask is not None:
                out, probs = _unalign_queries(out, new_mask), _unalign_queries(probs, new_mask)
            return out, probs
        # prefill (decode steps returned above): varlen over the real tokens of this call
        return padded_attention(q, k, v, new_mask, causal=True, window_size=self.window_size,
                                softmax_scale=self.scaling, backend=self.backend), None

    def _positions(self, position_ids, mask2d, cache, cache_position, b, n, device):
        if position_ids is not None:
            return position_ids if position_ids.dim() != 1 else position_ids[None].expand(b, -1)
        if isinstance(cache, SplitKCache):
            past = cache.seqlens(self.layer_idx or 0).to(device).long()  # (B,) ragged
            if mask2d is not None and bool((past == 0).all()):
                return (mask2d[:, -n:].long().cumsum(1) - 1).clamp(min=0)
            return past[:, None] + torch.arange(n, device=device)
        if mask2d is not None:
            return (mask2d.long().cumsum(1) - 1).clamp(min=0)[:, -n:]  # (B, N)
        if cache_position is not None:
            return cache_position[None].expand(b, -1)
        past = cache.get_seq_length(self.layer_idx or 0) if cache is not None else 0
        return (torch.arange(n, device=device) + past)[None].expand(b, -1)


def _check_hidden(hidden_states, hidden: int) -> None:
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden:
        raise ValueError(f"expected hidden_states of shape (B, N, hidden={hidden}), got "
                         f"{tuple(getattr(hidden_states, 'shape', ()))}; add a batch dim with x.unsqueeze(0)")


def _split_mask(attention_mask, b):
    """(key mask (B, Nk) bool or None, dense 4-D mask or None)."""
    if attention_mask is None:
        return None, None
    if attention_mask.dim() == 2:
        if attention_mask.shape[0] != b:
            raise ValueError(f"expected attention_mask (B={b}, Nk), got {tuple(attention_mask.shape)}")
        return attention_mask.to(torch.bool), None
    if attention_mask.dim() == 4:
        return None, attention_mask
    raise ValueError(f"expected a 2-D (B, Nk) padding mask or a 4-D (B, 1, Nq, Nk) mask, got shape "
                     f"{tuple(attention_mask.shape)}")


def _used_slots(k, v, mask2d, cache_position, n):
    """A static cache returns all its slots; keep those in use (the mask's length, else the slot
    after the last new token)."""
    used = k.shape[2]
    if mask2d is not None:
        used = mask2d.shape[1]
    elif cache_position is not None:
        used = int(cache_position[-1]) + 1
    if used > k.shape[2] or used < n:
        raise ValueError(f"the attention mask covers {used} tokens but the cache holds {k.shape[2]} slots and "
                         f"this call brings {n}; pass a mask over past and new tokens")
    return k[:, :, :used], v[:, :, :used], mask2d


def _right_align_queries(x, mask):
    """x (B, H, n, ...) with real tokens where mask (B, n) -> real tokens in the last slots."""
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # padding first, real last
    return x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))


def _unalign_queries(x, mask):
    """Inverse of `_right_align_queries` on dim 2; padding rows become zeros."""
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    inverse = torch.argsort(order, dim=1)
    out = x.gather(2, inverse[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))
    return out * mask[:, None, :, None].to(out.dtype)


def create_flash_attention_2(config, layer_idx: int | None = None, backend: str = "auto") -> FlashAttention2:
    """A `FlashAttention2` layer; logs which attention backends it may use on this machine."""
    from fa2lab.backends import AUTO_ORDER, BACKENDS, DEFAULT_AUTO_ORDER

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {list(BACKENDS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    order = AUTO_ORDER["model"].get(device, DEFAULT_AUTO_ORDER)
    log.info("fa2lab: FlashAttention2 layer %s: backend=%s (auto order on %s: %s; chosen per call by dtype, "
             "head dim and length)", layer_idx, backend, device, ", ".join(order))
    return FlashAttention2(config, layer_idx, backend=backend)
