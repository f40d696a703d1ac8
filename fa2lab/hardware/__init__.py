"""Hardware knowledge: device profiles, tile sizes derived from them, and detection.

    get_profile(name) / list_profiles()   built-in profiles: gtx1080, t4, a100, rtx4090, h100, h200,
                                          i5-10210u, cpu-generic
    detect(calibrate=False)               this machine (CUDA properties, else CPU caches and cores)
    load_profile(path)                    a user profile from YAML
    profile.tile_config(d, dtype, causal) Br, Bc (+ warps, stages on a GPU), with its derivation
    profile.decode_splits(B, H, L)        split-K count for decode
"""

from fa2lab.hardware.detect import detect
from fa2lab.hardware.loading import get_profile, list_profiles, load_profile
from fa2lab.hardware.profile import HardwareProfile, dtype_bytes, dtype_name
from fa2lab.hardware.tiles import TileConfig, decode_splits, tile_config

__all__ = ["HardwareProfile", "TileConfig", "get_profile", "list_profiles", "detect", "load_profile",
           "tile_config", "decode_splits", "dtype_bytes", "dtype_name"]
