"""Renamed keyword arguments, kept one release with a DeprecationWarning."""

from __future__ import annotations

import warnings

UNSET = object()  # default of a deprecated keyword: tells "not passed" from None


def renamed(where: str, old: str, new: str, old_value, new_value, new_default=None):
    """The value to use for `new` when a caller may still pass `old`."""
    if old_value is UNSET:
        return new_value
    if new_value is not new_default:
        raise ValueError(f"{where}: got both {old}= and {new}=; pass only {new}= ({old}= is its deprecated name)")
    warnings.warn(f"{where}: {old}= is deprecated, use {new}=", DeprecationWarning, stacklevel=3)
    return old_value
