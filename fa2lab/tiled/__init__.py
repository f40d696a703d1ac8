"""FlashAttention-2 in readable PyTorch: forward, backward, tracer, and the autograd glue."""

from fa2lab.tiled.attention import DEFAULT_TILES, TileSizes, tiled_attention
from fa2lab.tiled.trace import TileStep, TileTracer

__all__ = ["tiled_attention", "TileSizes", "DEFAULT_TILES", "TileTracer", "TileStep"]
