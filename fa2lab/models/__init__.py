"""Model integration: drop-in FlashAttention-2 layers for Qwen3 / Qwen3-VL-class models.

Shapes as in `fa2lab` (B, Hq, Hkv, N, D); hidden states are (B, N, hidden), packed vision
patches (total, dim). Nothing here imports transformers; `fa2lab.hf` is the transformers backend.

    FlashAttention2(config, layer_idx)              attention layer: q/k/v/o, q/k RMSNorm, RoPE, GQA
    FlashAttention2TransformerLayer(config, idx)    pre-norm decoder layer (attention + SwiGLU MLP)
    create_flash_attention_2(config, idx, backend)  factory; logs the backends it may use
    FlashAttention2Vision(dim, heads)               packed image patches through varlen attention
    DynamicKVCache, SplitKCache                     KV caches (the second decodes split-K;
                                                    SplitKCache(cuda_graph=True): CUDA-graph steps)
    select_backend, measure_crossover               backend choice by device/dtype/D/length
    padded_attention, naive_attention               the functional core (varlen; the logged naive path)
    LayerConfig, layer_config                       layer shape from any HF-style config
    sizing.memory_table(AttentionShape.of(cfg))     KV-cache and attention memory at long context
"""

from fa2lab.models.attention import FlashAttention2, RMSNorm, create_flash_attention_2
from fa2lab.models.cache import DynamicKVCache, SplitKCache
from fa2lab.models.config import LayerConfig, layer_config
from fa2lab.models.functional import naive_attention, packed_attention, padded_attention
from fa2lab.models.layer import FlashAttention2TransformerLayer
from fa2lab.models.rotary import RotaryEmbedding, apply_rotary
from fa2lab.models.selection import Choice, Crossover, measure_crossover, select_backend
from fa2lab.models.vision import FlashAttention2Vision

__all__ = ["FlashAttention2", "FlashAttention2TransformerLayer", "create_flash_attention_2", "FlashAttention2Vision",
           "DynamicKVCache", "SplitKCache", "LayerConfig", "layer_config", "RMSNorm", "RotaryEmbedding",
           "apply_rotary", "padded_attention", "packed_attention", "naive_attention", "select_backend",
           "measure_crossover", "Choice", "Crossover"]
