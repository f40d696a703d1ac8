"""Profiles by name, and user profiles from YAML.

A YAML profile names the fields of `HardwareProfile` (see `describe()` for their meaning); it may
start from a built-in one with `base: NAME` and override a few fields. Sizes are bytes, rates per
second; numbers may be written as expressions of KiB/MiB/GiB/GB/TB/T/G ("163 * KiB", "2.039 * TB").
Example:

    base: a100
    name: a100-40gb
    mem_bw: 1.555 * TB
    sources: {mem_bw: "A100 40GB datasheet: 1,555 GB/s"}
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from fa2lab.hardware.builtin import BUILTIN
from fa2lab.hardware.profile import HardwareProfile

_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "GB": 1e9, "TB": 1e12, "G": 1e9, "T": 1e12, "M": 1e6}
_INT_FIELDS = {f.name for f in dataclasses.fields(HardwareProfile) if f.type in ("int", int)}


def list_profiles() -> list[str]:
    """Names of the built-in profiles."""
    return list(BUILTIN)


def get_profile(name: str) -> HardwareProfile:
    """A built-in profile by name (case-insensitive)."""
    key = str(name).lower()
    if key not in BUILTIN:
        raise ValueError(f"unknown hardware profile {name!r}; known: {', '.join(BUILTIN)} "
                         "(or fa2lab.hardware.detect() for this machine, load_profile(path) for a YAML file)")
    return BUILTIN[key]


def load_profile(path) -> HardwareProfile:
    """A profile from a YAML file (see the module docstring for the format)."""
    path = Path(path)
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping of profile fields, got {type(spec).__name__}")
    known = {f.name for f in dataclasses.fields(HardwareProfile)}
    unknown = set(spec) - known - {"base"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: base, {', '.join(sorted(known))}")
    values = {k: _number(v, f"{path}: {k}") for k, v in spec.items() if k != "base"}
    for key in ("peak_flops", "peak_flops_simd"):
        if key in values:
            values[key] = {str(k): _number(v, f"{path}: {key}.{k}") for k, v in values[key].items()}
    if "compute_capability" in values and values["compute_capability"] is not None:
        values["compute_capability"] = tuple(values["compute_capability"])
    for key in _INT_FIELDS & set(values):
        values[key] = int(values[key])
    sources = {k: f"{path}" for k in values if k not in ("name", "sources")} | dict(values.pop("sources", {}) or {})
    if "base" in spec:
        base = get_profile(spec["base"])
        return dataclasses.replace(base, **values, sources=dict(base.sources, **sources))
    missing = [f.name for f in dataclasses.fields(HardwareProfile)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in values]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}; give them or start from a built-in with 'base: NAME'")
    return HardwareProfile(**values, sources=sources)


def _number(value, where: str):
    """Evaluate '163 * KiB'-style strings; leave other values alone."""
    if not isinstance(value, str) or not any(u in value for u in _UNITS):
        return value
    try:
        return eval(value, {"__builtins__": {}}, dict(_UNITS))  # names limited to the unit table
    except Exception as exc:  # noqa: BLE001 - reported with the offending text
        raise ValueError(f"{where}: cannot read {value!r} as a number ({exc}); write e.g. '163 * KiB'") from None
