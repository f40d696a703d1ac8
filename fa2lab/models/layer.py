"""`FlashAttention2TransformerLayer`: a pre-norm Qwen3 decoder layer around `FlashAttention2`.

    h = x + self_attn(input_layernorm(x))
    y = h + mlp(post_attention_layernorm(h)),   mlp(x) = down(silu(gate(x)) * up(x))

Parameter names follow Hugging Face's Qwen3DecoderLayer, so its state dict loads as is.
"""

from __future__ import annotations

import torch
from torch import nn

from fa2lab.models.attention import RMSNorm, create_flash_attention_2
from fa2lab.models.config import layer_config


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class FlashAttention2TransformerLayer(nn.Module):
    """forward(hidden_states (B, N, hidden), attention_mask, position_ids, past_key_value,
    output_attentions, use_cache, cache_position) -> (hidden_states, attn_weights, past_key_value),
    arguments as `FlashAttention2.forward`."""

    def __init__(self, config, layer_idx: int | None = None, *, backend: str = "auto"):
        super().__init__()
        cfg = layer_config(config)
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = create_flash_attention_2(cfg, layer_idx, backend=backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None):
        attn, weights, past_key_value = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask=attention_mask, position_ids=position_ids,
            past_key_value=past_key_value, output_attentions=output_attentions, use_cache=use_cache,
            cache_position=cache_position)
        hidden_states = hidden_states + attn
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights, past_key_value
