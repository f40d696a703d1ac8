"""Attention variants: soft-capping, ALiBi, additive bias, sinks, dropout, score/mask functions,
block masks and the attention probabilities (see `options.py` for the semantics)."""

from fa2lab.variants.options import NONE, Variants, check_variants

__all__ = ["Variants", "check_variants", "NONE"]
