"""Hardware knowledge: device profiles, detection, loading and calibration (facts, not predictions).

    get_profile(name) / list_profiles()   built-in profiles: gtx1080, t4, a100, rtx4090, h100, h200,
                                          i5-10210u, cpu-generic
    detect(calibrate=False)               this machine (CUDA properties, else CPU caches and cores)
    load_profile(path)                    a user profile from YAML
    save_profile(profile, path)           the reverse (profile.to_yaml()); loads back equal

Tile sizes and split counts derived from a profile are an optimisation over the cost model:
fa2lab.cost.tile_config(profile, ...) and fa2lab.cost.decode_splits(profile, ...). The old names
here (tile_config, decode_splits, TileConfig, profile.tile_config(...)) still work for one release,
with a DeprecationWarning.
"""

import importlib
import warnings


from fa2lab.hardware.detect import detect
from fa2lab.hardware.loading import get_profile, list_profiles, load_profile, save_profile
from fa2lab.hardware.profile import HardwareProfile, dtype_bytes, dtype_name

__all__ = ["HardwareProfile", "get_profile", "list_profiles", "detect", "load_profile", "save_profile", "dtype_bytes",
           "dtype_name"]

_MOVED = ("TileConfig", "decode_splits", "tile_config")


def __getattr__(name):
    if name in _MOVED:  # resolved on use, so that importing fa2lab.hardware loads nothing of fa2lab.cost
        warnings.warn(f"fa2lab.hardware.{name} moved to fa2lab.cost.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("fa2lab.cost.tiles"), name)
    raise AttributeError(f"module 'fa2lab.hardware' has no attribute {name!r}")
