"""Profiles by name, and user profiles from YAML.

A YAML profile names the fields of `HardwareProfile` (see `describe()` for their meaning); it may
start from a built-in one with `base: NAME` and override a few fields. Sizes are bytes, rates per
second; a number may carry a unit, written `NUMBER`, `NUMBER UNIT` or `NUMBER * UNIT` with UNIT one
of KiB, MiB, GiB, TiB (powers of 2), K, M, G, T, KB, MB, GB, TB (powers of 10): "163 * KiB",
"2.039 TB". Nothing else is read as a number: the file is data, never code. Text fields (name,
kind, arch, sources) are taken as written. Example:

    base: a100
    name: a100-40gb
    mem_bw: 1.555 * TB
    sources: {mem_bw: "A100 40GB datasheet: 1,555 GB/s"}

A field the file sets has the file as its source unless `sources` names one. `save_profile` (or
`HardwareProfile.to_yaml`) writes a file that loads back to an equal profile.
"""

from __future__ import annotations

import dataclasses
import math
import re
from decimal import Decimal
from pathlib import Path

import yaml

from fa2lab.hardware.builtin import BUILTIN
from fa2lab.hardware.profile import FIELD_RULES, HardwareProfile, field_problem

UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9,
         "T": 10**12, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_QUANTITY = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?:\*?\s*(" + "|".join(UNITS)
                       + r"))?\s*")
_TEXT_FIELDS = {"name", "kind", "arch"}  # descriptions, not numbers: they need no source


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


def parse_quantity(text: str) -> float:
    """'163 * KiB' -> 166912.0, '2.039 TB' -> 2.039e12, '1e9' -> 1e9; anything else raises ValueError.
    A regular expression, not an evaluator: no text of a file is ever run."""
    m = _QUANTITY.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"cannot read {text!r} as a number; write NUMBER, NUMBER UNIT or NUMBER * UNIT "
                         f"with UNIT in {', '.join(UNITS)} (e.g. '163 * KiB')")
    number, unit = m.groups()
    # In decimal, then rounded once: "2.039 TB" is the float nearest 2.039e12, as YAML's 2.039e12 is.
    return float(Decimal(number) * UNITS[unit]) if unit else float(number)


def save_profile(profile: HardwareProfile, path) -> Path:
    """Write `profile` as YAML to `path`; `load_profile(path)` gives back an equal profile."""
    path = Path(path)
    path.write_text(profile.to_yaml(), encoding="utf-8")
    return path


def load_profile(path) -> HardwareProfile:
    """A profile from a YAML file (see the module docstring for the format). Every problem - a
    missing file, a YAML syntax error, an unsafe tag, a field of the wrong type or out of range -
    is a ValueError naming the file, the field, the value and what is valid."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read hardware profile {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # syntax errors and tags safe_load refuses (!!python/...)
        raise ValueError(f"{path}: not a valid YAML profile (only plain YAML is read, no tags): {exc}") from None
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping of profile fields, got {type(spec).__name__}")
    known = [f.name for f in dataclasses.fields(HardwareProfile)]
    unknown = [k for k in spec if k not in known and k != "base"]
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(map(str, unknown))}; known: base, {', '.join(sorted(known))}")
    values = {k: _read_field(k, v, path) for k, v in spec.items() if k != "base"}
    given_sources = values.pop("sources", {})
    sources = {k: str(path) for k, v in values.items() if k not in _TEXT_FIELDS and v is not None}
    sources.update(given_sources)
    if "base" in spec:
        if not isinstance(spec["base"], str):
            raise ValueError(f"{path}: base: expected the name of a built-in profile, got {spec['base']!r}; "
                             f"known: {', '.join(BUILTIN)}")
        try:
            base = get_profile(spec["base"])
        except ValueError as exc:
            raise ValueError(f"{path}: base: {exc}") from None
        kept = {k: v for k, v in base.sources.items() if k not in values}  # an overridden number drops its source
        return _build(path, dataclasses.replace, base, **values, sources=dict(kept, **sources))
    missing = [f.name for f in dataclasses.fields(HardwareProfile)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in values]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}; give them or start from a built-in with 'base: NAME'")
    return _build(path, HardwareProfile, **values, sources=sources)


def _build(path, make, *args, **values) -> HardwareProfile:
    try:
        return make(*args, **values)
    except ValueError as exc:  # a rule across fields; each field was checked on its own already
        raise ValueError(f"{path}: {exc}") from None


def _read_field(name: str, raw, path: Path):
    """The value of field `name` as written in the file, converted and checked."""
    kind = FIELD_RULES[name][0]
    where = f"{path}: field {name}"
    try:
        if kind == "text":  # taken as written: text is never a number
            value = raw
        elif kind == "table":  # checked below; YAML has no tuples, the profiles hold them
            value = _tuples(raw)
        elif kind == "cc":
            value = _compute_capability(raw)
        elif kind == "rates":
            if not isinstance(raw, dict):
                raise ValueError(f"expected a mapping of dtype name -> FLOP/s (e.g. {{float16: 312 * T}}), got "
                                 f"{raw!r} ({type(raw).__name__})")
            value = {str(k): None if v is None else _number(v) for k, v in raw.items()}
        elif kind == "sources":
            value = {} if raw is None else raw
            if isinstance(value, dict):
                bad = [k for k in value if k not in FIELD_RULES or k == "sources"]
                if bad:
                    raise ValueError(f"expected keys that are field names, got {sorted(map(str, bad))}")
        elif kind == "float?" and raw is None:
            value = None
        else:
            value = _number(raw)
            if kind == "int":
                value = _integer(value)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    problem = field_problem(name, value)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return value


def _tuples(raw):
    if isinstance(raw, dict):
        return {k: _tuples(v) for k, v in raw.items()}
    return tuple(_tuples(v) for v in raw) if isinstance(raw, list) else raw


def _number(raw):
    if isinstance(raw, bool):  # YAML's true/false/yes/no: never a number
        raise ValueError(f"expected a number, got {raw!r} (a boolean)")
    if isinstance(raw, str):
        return parse_quantity(raw)
    if isinstance(raw, (int, float)):
        return raw
    raise ValueError(f"expected a number, got {raw!r} ({type(raw).__name__})")


def _integer(value):
    """An int from an int or an integral float (163 * KiB); 2.7 is refused, not truncated."""
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}; give a whole number")
        return int(value)
    return value


def _compute_capability(raw):
    """(major, minor) from [9, 0], "9.0" or 9.0; None stays None."""
    if raw is None:
        return None
    if isinstance(raw, (list, tuple)):
        if len(raw) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
            return tuple(raw)
    elif isinstance(raw, str) or (isinstance(raw, float) and math.isfinite(raw)):
        m = re.fullmatch(r"\s*(\d+)\.(\d)\s*", str(raw))
        if m:
            return int(m.group(1)), int(m.group(2))
    raise ValueError(f"expected [major, minor], 'major.minor' or null, e.g. [9, 0] or '8.6', got {raw!r}")
