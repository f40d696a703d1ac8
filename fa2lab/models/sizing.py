"""Memory of a model's attention at long context: the KV cache, and one layer's attention workspace.

    kv_cache = 2 * layers * Hkv * D * bytes * tokens * B      # K and V, every layer
    naive    = 2 * B * Hq * N * N * bytes                     # S and P of one layer, materialised
    fa2      = B * Hq * N * (D * bytes + 4)                   # O and a float32 LSE per query row

Computed here from the configuration alone (no weights, no transformers needed).
"""

from __future__ import annotations

from dataclasses import dataclass

from fa2lab.models.config import layer_config

GIB = 1 << 30


@dataclass(frozen=True)
class AttentionShape:
    """What attention memory depends on, for a whole decoder stack."""

    layers: int
    heads: int  # Hq
    kv_heads: int  # Hkv
    head_dim: int  # D
    bytes_per_elem: int = 2  # bf16 / fp16

    @classmethod
    def of(cls, text_config, bytes_per_elem: int = 2) -> "AttentionShape":
        cfg = layer_config(text_config)
        return cls(int(text_config.num_hidden_layers), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                   bytes_per_elem)


def kv_cache_bytes(shape: AttentionShape, tokens: int, batch: int = 1) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * shape.bytes_per_elem * tokens * batch  # K and V


def naive_attention_bytes(shape: AttentionShape, tokens: int, batch: int = 1) -> int:
    return 2 * batch * shape.heads * tokens * tokens * shape.bytes_per_elem  # S and P, one layer


def fa2_attention_bytes(shape: AttentionShape, tokens: int, batch: int = 1) -> int:
    return batch * shape.heads * tokens * (shape.head_dim * shape.bytes_per_elem + 4)  # O and LSE, one layer


def memory_table(shape: AttentionShape, tokens=(4096, 32768, 131072), batch: int = 1) -> list[dict]:
    """One row per context length, in GiB."""
    return [dict(tokens=n,
                 kv_cache_gib=kv_cache_bytes(shape, n, batch) / GIB,
                 naive_attention_gib_per_layer=naive_attention_bytes(shape, n, batch) / GIB,
                 fa2_attention_gib_per_layer=fa2_attention_bytes(shape, n, batch) / GIB)
            for n in tokens]
