"""Peak extra memory of each attention algorithm, and the size of a model's KV cache.

"Extra" means on top of the inputs q, k, v, output included: the quantity that
fa2lab.measure.memory.peak_extra_bytes measures. On-chip tiles of the GPU kernels are not memory
in this sense; the host-memory tiles of fa2lab's PyTorch forward are.

    naive        S and P live together (B*Hq*Nq*Nk each) + O; fwd+bwd keeps S, P, dP, dS: 4 of them
    fa1 / fa2    O + the float32 statistics: l and m (FA1) or LSE (FA2) per query row
    split_k      O + float32 partial O and LSE per split
    tiled_cpu    fa2lab/tiled/forward.py: the scaled Q copy, out and lse in float32, and per step
                 two score tiles (the new S is allocated while the old P is still referenced),
                 the accumulator, and the boolean masks of a partial tile
"""

from __future__ import annotations

from dataclasses import dataclass

from fa2lab.hardware.profile import dtype_bytes

STAT = 4


def peak_extra_bytes(algo: str, b: int, hq: int, nq: int, nk: int, d: int, dv: int | None = None, *,
                     hkv: int | None = None, elem: int = 2, mode: str = "fwd", block_q: int | None = None,
                     block_k: int | None = None, splits: int = 1) -> int:
    """Model of the peak extra bytes of one call (see the module docstring for each algorithm)."""
    dv = dv or d
    hkv = hkv or hq
    heads = b * hq
    out = heads * nq * dv * elem
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"expected mode 'fwd' or 'fwd+bwd', got {mode!r}")
    if algo == "naive":
        return out + (2 if mode == "fwd" else 4) * heads * nq * nk * elem
    if algo in ("fa1", "fa2"):
        stats = heads * nq * STAT * (2 if algo == "fa1" else 1)
        if mode == "fwd":
            return out + stats
        # backward: Delta, a float32 dQ accumulator, and the gradients dq, dk, dv themselves
        grads = heads * nq * d * elem + b * hkv * nk * (d + dv) * elem
        return out + stats + heads * nq * STAT + heads * nq * d * STAT + grads
    if algo == "split_k":
        return out + (heads * splits * (dv + 1) * STAT if splits > 1 else 0)
    if algo == "tiled_cpu":
        if mode != "fwd":
            raise ValueError("the tiled_cpu memory model covers the forward only; measure fwd+bwd with "
                             "fa2lab.measure.memory.peak_extra_bytes")
        if block_q is None or block_k is None:
            raise ValueError("tiled_cpu needs block_q and block_k (the tile sizes of the call)")
        acc = 8 if elem == 8 else 4
        br, bc = min(block_q, nq), min(block_k, nk)
        resident = heads * nq * (d + dv + 1) * acc  # q * scale, out_p, lse_p (float32)
        if elem != acc:  # upcast copies of k and v, and the output in the input dtype
            resident += b * hkv * nk * (d + dv) * acc + out
        step = heads * (2 * br * bc + br * dv) * acc  # S of this step, P of the last, accumulator
        mask = 3 * br * bc * (hq // hkv)  # bool tiles of a partial step
        return resident + step + mask
    raise ValueError(f"unknown algorithm {algo!r}; expected naive, fa1, fa2, split_k or tiled_cpu")


@dataclass(frozen=True)
class ModelConfig:
    """The attention shape of a transformer, as far as its KV cache is concerned."""

    name: str
    layers: int  # decoder layers, each with its own cache
    kv_heads: int  # K/V heads per layer (GQA: fewer than query heads)
    head_dim: int
    dtype: str = "bfloat16"
    q_heads: int | None = None  # for reference; the cache does not depend on it
    source: str = ""


QWEN3_VL_8B = ModelConfig(
    name="Qwen3-VL-8B-Instruct (language model)", layers=36, kv_heads=8, head_dim=128, dtype="bfloat16",
    q_heads=32,
    source="GGUF metadata of Qwen/Qwen3-VL-8B-Instruct, https://ollama.com/library/qwen3-vl:8b-instruct-bf16 "
           "(qwen3vl.block_count 36, attention.head_count 32, head_count_kv 8, key_length 128), matching "
           "Qwen3-8B's config.json (num_hidden_layers 36, num_key_value_heads 8, head_dim 128); "
           "read 2026-11-22. The design notes' '32 layers' is not this model.")


def kv_cache_bytes(model: ModelConfig, tokens: int, batch: int = 1, window: int | None = None) -> int:
    """2 (K and V) * layers * kv_heads * head_dim * bytes * tokens * batch; a sliding window caps tokens."""
    if tokens < 0 or batch < 1:
        raise ValueError(f"expected tokens >= 0 and batch >= 1, got tokens={tokens}, batch={batch}")
    kept = tokens if window is None else min(tokens, window)
    return 2 * model.layers * model.kv_heads * model.head_dim * dtype_bytes(model.dtype) * kept * batch
