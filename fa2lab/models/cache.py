"""KV caches for `FlashAttention2` layers.

    DynamicKVCache   keys in slots, grown by concatenation: the Hugging Face `Cache.update`
                     contract (transformers' DynamicCache and StaticCache work in its place)
    SplitKCache      one fa2lab `StaticKVCache` per layer: ragged sequences stored without their
                     padding, decode steps through split-K `decode_attention` (Flash-Decoding);
                     cuda_graph=True: each layer's one-token step is a replayed CUDA graph
                     (`fa2lab.kvcache.DecodeSession(cuda_graph=True)` over the layer's cache)

Shapes: new keys and values (B, Hkv, n, D); slots (B, Hkv, Nk, D).
"""

from __future__ import annotations

import torch

from fa2lab.kvcache.static import StaticKVCache


class DynamicKVCache:
    """Per layer, every key and value so far, in slots (padding included); no transformers needed."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        """Append n new slots to layer `layer_idx` -> all its keys, values (B, Hkv, Nk, D)."""
        if layer_idx in self.keys:
            key_states = torch.cat([self.keys[layer_idx], key_states], dim=2)
            value_states = torch.cat([self.values[layer_idx], value_states], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2] if layer_idx in self.keys else 0


class SplitKCache:
    """One `fa2lab.kvcache.StaticKVCache` per layer, allocated on first use: (B, Hkv, max_len, D)
    buffers written in place. Each sequence keeps only its real tokens (a padded prefill is
    compacted), so decode reads exactly cache_seqlens[b] keys per sequence through split-K.

    cuda_graph=True (CUDA): a decode step of one token per sequence runs, per layer, as the replay
    of one captured CUDA graph (copy the step's q, k, v into persistent buffers; write K/V at each
    length, planned split-K attention, advance the lengths, cast the output), captured at the
    layer's first step by a `DecodeSession` that continues the layer's prefilled cache. No host
    work per layer beyond the copies and the replay; steps of several tokens take the planned path."""

    def __init__(self, batch: int, max_len: int, *, num_splits: int | None = None, cuda_graph: bool = False):
        if batch < 1 or max_len < 1:
            raise ValueError(f"expected batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"expected cuda_graph to be True or False, got {cuda_graph!r}")
        self.batch, self.max_len, self.num_splits, self.cuda_graph = batch, max_len, num_splits, cuda_graph
        self.sessions: dict = {}  # layer -> DecodeSession (cuda_graph=True), made at its first step
        self.layers: dict[int, StaticKVCache] = {}
        # Per layer, the longest sequence, counted on the host: decode steps check the capacity
        # against it and never read the lengths back.
        self.host_max: dict[int, int] = {}
        self._plans: dict = {}

    def layer(self, layer_idx: int, like: torch.Tensor) -> StaticKVCache:
        """The cache of layer `layer_idx`, allocated with `like`'s heads, head dim, dtype, device."""
        if layer_idx not in self.layers:
            b, hkv, _, d = like.shape
            if b != self.batch:
                raise ValueError(f"expected keys for batch {self.batch}, got batch {b}")
            self.layers[layer_idx] = StaticKVCache(b, hkv, self.max_len, d, dtype=like.dtype, device=like.device)
        return self.layers[layer_idx]

    def seqlens(self, layer_idx: int = 0) -> torch.Tensor:
        """int32 (B,) real tokens per sequence in layer `layer_idx` (zeros before the first append)."""
        cache = self.layers.get(layer_idx)
        return cache.seqlens() if cache is not None else torch.zeros(self.batch, dtype=torch.int32)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.seqlens(layer_idx).max())

    def append(self, layer_idx: int, k, v, token_mask=None) -> None:
        """k (B, Hkv, n, D), v (B, Hkv, n, Dv); token_mask (B, n) bool keeps only real tokens, in
        order, so left- and right-padded prompts end up alike."""
        cache = self.layer(layer_idx, k)
        if token_mask is None:
            cache.append(k, v)
            self.host_max[layer_idx] = int(cache.lengths.max())
            return
        token_mask = token_mask.to(device=k.device, dtype=torch.bool)
        order = torch.argsort((~token_mask).to(torch.int8), dim=1, stable=True)  # (B, n): real tokens first
        gather = lambda x: x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))  # noqa: E731
        cache.append(gather(k), gather(v), lengths=token_mask.sum(1))
        self.host_max[layer_idx] = int(cache.lengths.max())

    def decode(self, layer_idx: int, q, k, v, **options):
        """One generation step, sync-free: write k, v (B, Hkv, n, D) at each sequence's length and
        attend q (B, Hq, n, D) through a planned `decode_attention` (in-place append), then advance
        the lengths on the device. The capacity is checked against the host-side count."""
        from fa2lab.decode import decode_attention, decode_plan

        cache, n = self.layers[layer_idx], k.shape[2]
        if self.host_max[layer_idx] + n > self.max_len:
            raise ValueError(f"a sequence would grow to {self.host_max[layer_idx] + n} tokens, past max_len="
                             f"{self.max_len}; allocate a larger SplitKCache")
        if self.cuda_graph and n == 1:
            return self._graph_step(layer_idx, cache, q, k, v, options)
        key = (tuple(q.shape), tuple(k.shape), tuple(cache.k.shape), q.dtype, q.device, tuple(sorted(options.items())))
        if key not in self._plans:  # one plan per shape, shared by every layer and step
            self._plans[key] = decode_plan(q, cache.k, cache.v, k.to(cache.k.dtype), v.to(cache.v.dtype),
                                           cache_seqlens=cache.lengths,
                                           num_splits=self.num_splits, **options)
        out = decode_attention(q, cache.k, cache.v, k.to(cache.k.dtype), v.to(cache.v.dtype),
                               cache_seqlens=cache.lengths, plan=self._plans[key])
        cache.lengths.add_(n)
        self.host_max[layer_idx] += n
        return out

    def _graph_step(self, layer_idx: int, cache: StaticKVCache, q, k, v, options):
        """One token per sequence through the layer's DecodeSession (captured at its first step)."""
        from fa2lab.kvcache.session import DecodeSession

        session = self.sessions.get(layer_idx)
        if session is None:
            b, hq, _, d = q.shape
            if cache.head_dim_v != d:
                raise ValueError(f"cuda_graph=True needs equal key and value head dims, got {d} and "
                                 f"{cache.head_dim_v}; use SplitKCache(cuda_graph=False)")
            session = DecodeSession(b, hq, cache.heads_kv, self.max_len, d, dtype=cache.dtype, device=cache.device,
                                    cuda_graph=True, output_dtype=q.dtype, num_splits=self.num_splits, **options)
            self.sessions[layer_idx] = session.init(cache=cache, filled=self.host_max[layer_idx])
        session.load_qkv(q, k.to(cache.dtype), v.to(cache.dtype))
        session.decode()
        self.host_max[layer_idx] += 1
        return session.get_output()  # (B, Hq, 1, D), overwritten by this layer's next step

    def right_aligned(self, layer_idx: int):
        """Keys, values (B, Hkv, L, D) with each sequence's tokens in the last slots, and the slot
        mask (B, L), L = the longest sequence: the layout of the naive path."""
        cache = self.layers[layer_idx]
        lens = cache.seqlens().long()  # (B,)
        n = int(lens.max())
        src = torch.arange(n, device=lens.device)[None, :] - (n - lens)[:, None]  # (B, L)
        mask = src >= 0
        idx = src.clamp(min=0)[:, None, :, None]
        k = cache.k.gather(2, idx.expand(-1, cache.heads_kv, -1, cache.head_dim))
        v = cache.v.gather(2, idx.expand(-1, cache.heads_kv, -1, cache.head_dim_v))
        return k, v, mask

    def memory_bytes(self) -> int:
        return sum(c.memory_bytes() for c in self.layers.values())
