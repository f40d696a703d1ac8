"""The cost model: FLOPs, bytes moved, peak memory, KV-cache size and roofline time of attention.

    schedule.tile_schedule(Nq, Nk, Br, Bc, causal, window)  the FA2 tile grid, counted
    flops.formula_flops / exact_flops / executed_flops / varlen_flops
    traffic.naive_bytes / fa1_bytes / fa2_forward_bytes / fa2_backward_bytes /
           fa2_backward_two_pass_bytes / split_k_decode_bytes / theorem2_bytes   off-chip bytes, exact per schedule
    memory.peak_extra_bytes(algo, ...), memory.kv_cache_bytes(model, tokens)
    roofline.roofline / cpu_tiled_forward, predict.fa2_forward / fa2_backward (one pass or two) / decode
    tiles.tile_config(profile, d, dtype, causal)  Br, Bc (+ warps, stages on a GPU), with its derivation
    tiles.decode_splits(profile, B, H, L)        split-K count for decode
"""

from fa2lab.cost.flops import exact_flops, executed_flops, formula_flops, varlen_flops
from fa2lab.cost.memory import QWEN3_VL_8B, ModelConfig, kv_cache_bytes, peak_extra_bytes
from fa2lab.cost.predict import decode, fa2_backward, fa2_forward
from fa2lab.cost.roofline import Roofline, cpu_tiled_forward, roofline
from fa2lab.cost.tiles import TileConfig, decode_splits, tile_config
from fa2lab.cost.traffic import (Traffic, fa1_bytes, fa2_backward_bytes, fa2_backward_two_pass_bytes,
                                 fa2_forward_bytes, naive_bytes, split_k_decode_bytes, theorem2_bytes)
from fa2lab.tiled.schedule import Schedule, tile_schedule, visible_pairs

__all__ = ["Schedule", "tile_schedule", "visible_pairs", "formula_flops", "exact_flops", "executed_flops",
           "varlen_flops", "Traffic", "naive_bytes", "fa1_bytes", "fa2_forward_bytes", "fa2_backward_bytes",
           "fa2_backward_two_pass_bytes", "fa2_backward",
           "split_k_decode_bytes", "theorem2_bytes", "peak_extra_bytes", "ModelConfig", "QWEN3_VL_8B",
           "kv_cache_bytes", "Roofline", "roofline", "fa2_forward", "decode", "cpu_tiled_forward", "TileConfig",
           "tile_config", "decode_splits"]
