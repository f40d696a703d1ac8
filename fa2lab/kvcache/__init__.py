"""KV caches for decoding: static, paged, sliding-window, int8 and low-rank, and a decode session."""

from fa2lab.kvcache.base import KVCache
from fa2lab.kvcache.lowrank import LowRankKVCache
from fa2lab.kvcache.paged import PagedKVCache
from fa2lab.kvcache.quantized import QuantizedKVCache
from fa2lab.kvcache.session import DecodeSession
from fa2lab.kvcache.static import StaticKVCache
from fa2lab.kvcache.window import SlidingWindowKVCache

__all__ = ["KVCache", "StaticKVCache", "PagedKVCache", "SlidingWindowKVCache", "QuantizedKVCache",
           "LowRankKVCache", "DecodeSession"]
