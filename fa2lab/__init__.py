"""fa2lab: a research workbench for FlashAttention-2.

Shape legend, used in every docstring and shape comment of the package:

    B    batch size                      Hq   query heads (also H)
    Hkv  key/value heads (Hq % Hkv == 0) G    query heads per key/value head, Hq // Hkv
    Nq   query length                    Nk   key/value length
    D    head dim of q and k             Dv   head dim of v (usually D)
    Br   query-tile rows (BLOCK_M)       Bc   key-tile columns (BLOCK_N)
    total_q, total_k                     packed lengths of a varlen batch

Canonical layout is (B, H, N, D), as in torch SDPA and FlexAttention.

Public API:
    attention(q, k, v, *, causal, window_size, softmax_scale, return_lse, backend)
    varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, ...)
    decode_attention(q, k_cache, v_cache, k_new, v_new, *, cache_seqlens, block_table, num_splits, plan, ...)
    decode_plan(q, k_cache, v_cache, k_new, v_new, *, ...)  check once, decode with no host sync
    merge_states(out_a, lse_a, out_b, lse_b), merge_states_stack(outs, lses)
    attention_probs(q, k, *, lse, rows, ...)   the probabilities P of chosen rows, tile by tile
    dropout_mask(q, k, *, dropout_p, generator) the keep mask a dropout call would use (debugging)
    create_block_mask(mask_mod, B, H, Nq, Nk)  which tiles a mask_mod leaves empty / full
    reference.attention_ref(...)          the naive materialised oracle
    tiled.tiled_attention(...)            FA2 in readable PyTorch, with tile sizes and a tracer
"""

from fa2lab.api import attention, available_backends, dropout_mask, varlen_attention
from fa2lab.decode import DecodePlan, decode_attention, decode_plan, merge_states, merge_states_stack
from fa2lab.masks import draw_mask
from fa2lab.tiled import TileTracer, tiled_attention
from fa2lab.variants.blockmask import BlockMask, create_block_mask
from fa2lab.variants.probs import attention_probs

__all__ = [
    "attention",
    "varlen_attention",
    "decode_attention",
    "decode_plan",
    "DecodePlan",
    "merge_states",
    "merge_states_stack",
    "available_backends",
    "tiled_attention",
    "TileTracer",
    "draw_mask",
    "attention_probs",
    "dropout_mask",
    "create_block_mask",
    "BlockMask",
]
__version__ = "0.1.0"
