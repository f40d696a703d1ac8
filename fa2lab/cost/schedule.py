"""The FA2 tile grid, counted: `fa2lab.tiled.schedule` (the tiled forward's own visiting rule),
re-exported here as part of the cost model's API."""

from fa2lab.tiled.schedule import Schedule, tile_schedule, visible_pairs

__all__ = ["Schedule", "tile_schedule", "visible_pairs"]
