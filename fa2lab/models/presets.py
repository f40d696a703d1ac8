"""Model configurations for tests, benchmarks and sizing (transformers configs; imported lazily).

    tiny_qwen3_config()       2 layers, hidden 64, 4 query heads, 2 KV heads (GQA), D = 16
    tiny_qwen3_vl_config()    the same text tower + a 2-block vision tower (hidden 32, 2 heads)
    qwen3_vl_8b_config()      the full-size Qwen3-VL-8B-class configuration (build it on "meta")

QWEN3_VL_8B holds the numbers with their source; nothing is downloaded.
"""

from __future__ import annotations

QWEN3_VL_8B = dict(
    text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=262144,
              vocab_size=151936, rope_theta=5000000.0, mrope_section=[24, 20, 20]),
    vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                deepstack_visual_indexes=[8, 16, 24]),
    source=("Qwen/Qwen3-VL-8B-Instruct's config.json as printed by transformers' AutoConfig (transformers 4.57.3) "
            "in a public GitHub script, read through the code search on 2026-11-22: text 36 layers, 32 query "
            "heads, 8 KV heads, head_dim 128, intermediate 12288, rope_theta 5e6, mrope [24, 20, 20]; vision "
            "depth 27, width 1152, 16 heads, deepstack [8, 16, 24]. Agrees with fa2lab/cost/memory.py's GGUF "
            "figures. The design notes' '32 layers, 32 heads' describes the class, not this exact model."),
)


def _rope(text: dict) -> dict:
    """rope_theta / mrope_section in the spelling of the installed transformers: `rope_parameters`
    from version 5, `rope_theta` + `rope_scaling` before."""
    import transformers

    text = dict(text)
    theta, section = text.pop("rope_theta", 10000.0), text.pop("mrope_section", None)
    mrope = dict(mrope_section=list(section), mrope_interleaved=True) if section else {}
    if int(transformers.__version__.split(".")[0]) >= 5:
        text["rope_parameters"] = dict(rope_type="default", rope_theta=theta, **mrope)
    else:
        text["rope_theta"] = theta
        if mrope:
            text["rope_scaling"] = dict(rope_type="default", **mrope)
    return text


def _tiny_text(**overrides) -> dict:
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
                tie_word_embeddings=False)
    text.update(overrides)
    return text


def tiny_qwen3_config(**overrides):
    """A transformers Qwen3Config with random-weight-friendly tiny sizes; overrides win."""
    from transformers import Qwen3Config

    return Qwen3Config(**_rope(_tiny_text(**overrides)))


def tiny_qwen3_vl_config(**text_overrides):
    """A transformers Qwen3VLConfig: the tiny text tower (mrope sections summing to D/2 = 8) and a
    two-block vision tower whose merger feeds the text width."""
    from transformers import Qwen3VLConfig

    text = _rope(_tiny_text(mrope_section=[2, 3, 3], **text_overrides))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=100, video_token_id=101,
                         vision_start_token_id=102, vision_end_token_id=103, tie_word_embeddings=False)


def qwen3_vl_8b_config():
    """The full-size Qwen3-VL-8B-class transformers config (see QWEN3_VL_8B for the source)."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(text_config=_rope(QWEN3_VL_8B["text"]), vision_config=dict(QWEN3_VL_8B["vision"]),
                         image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                         vision_end_token_id=151653, tie_word_embeddings=False)
