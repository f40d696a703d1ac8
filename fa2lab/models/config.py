"""`LayerConfig`: the shape of one decoder layer, read from any Hugging Face-style config.

fa2lab's modules take either a `LayerConfig` or any object with Hugging Face's attribute names
(a transformers `Qwen3Config`, `Qwen3VLTextConfig`, a `SimpleNamespace`), so they need no
transformers install. Only the rotary types that Qwen3 and Qwen3-VL use are supported: plain RoPE
and Qwen3-VL's interleaved multimodal RoPE (mrope); anything else is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class LayerConfig:
    """One decoder layer's hyper-parameters. Defaults are a tiny Qwen3 (tests, notebooks)."""

    hidden_size: int = 64
    num_attention_heads: int = 4  # Hq
    num_key_value_heads: int = 2  # Hkv: GQA when below Hq
    head_dim: int = 16  # D; Qwen3 sets it explicitly (128), not hidden_size // heads
    intermediate_size: int = 128  # the SwiGLU MLP of the transformer layer
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False  # Qwen3: no bias on q/k/v/o
    qk_norm: bool = True  # Qwen3's per-head RMSNorm of q and k, before RoPE
    rope_theta: float = 10000.0
    mrope_section: tuple[int, ...] | None = None  # Qwen3-VL: frequencies split over (t, h, w) positions
    sliding_window: int | None = None  # keys per query (itself included); None: full causal attention
    attention_dropout: float = 0.0
    layer_types: tuple[str, ...] = field(default=())  # per layer "full_attention" / "sliding_attention"

    @property
    def groups(self) -> int:
        """G = Hq // Hkv query heads share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def window_for(self, layer_idx: int | None) -> int | None:
        """The sliding window of layer `layer_idx`, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types and layer_idx is not None and layer_idx < len(self.layer_types):
            return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None
        return self.sliding_window


def layer_config(config) -> LayerConfig:
    """A `LayerConfig` from a `LayerConfig`, or from any config with Hugging Face's names."""
    if isinstance(config, LayerConfig):
        return config
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    if hidden is None or heads is None:
        raise ValueError(f"expected a config with hidden_size and num_attention_heads, got {type(config).__name__}; "
                         f"pass a fa2lab.models.LayerConfig or a transformers text config")
    rope = _rope(config)
    model_type = str(get("model_type", "") or "")
    qk_norm = get("qk_norm")
    layer_types = tuple(get("layer_types", None) or ())
    sliding = get("sliding_window")
    if get("use_sliding_window") is False and "sliding_attention" not in layer_types:
        sliding = None  # Qwen3 keeps a sliding_window value even when it is switched off
    values = dict(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=get("num_key_value_heads") or heads,
        head_dim=get("head_dim") or hidden // heads,
        intermediate_size=get("intermediate_size") or 4 * hidden,
        rms_norm_eps=get("rms_norm_eps", 1e-6),
        attention_bias=bool(get("attention_bias", False)),
        qk_norm=bool(qk_norm) if qk_norm is not None else model_type.startswith("qwen3"),
        rope_theta=rope["theta"],
        mrope_section=rope["mrope_section"],
        sliding_window=sliding,
        attention_dropout=float(get("attention_dropout", 0.0) or 0.0),
        layer_types=layer_types,
    )
    cfg = LayerConfig(**{f.name: values[f.name] for f in fields(LayerConfig)})
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"expected num_attention_heads={cfg.num_attention_heads} to be a multiple of "
                         f"num_key_value_heads={cfg.num_key_value_heads}")
    return cfg


def _rope(config) -> dict:
    """rope_theta and mrope_section from either transformers 5 (`rope_parameters`) or 4 (`rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    section = params.get("mrope_section") or legacy.get("mrope_section")
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"fa2lab's rotary supports plain and multimodal RoPE, got rope_type={rope_type!r}; "
                         f"use attn_implementation='fa2lab' with the transformers model instead")
    if section is None and str(getattr(config, "model_type", "")).startswith("qwen3_vl"):
        section = (24, 20, 20)  # Qwen3-VL's default when the config leaves it out
    return {"theta": float(theta), "mrope_section": tuple(section) if section else None}
