"""The attention variants as one validated bundle: soft-capping, ALiBi, an additive bias, sinks,
dropout, and FlexAttention-style score and mask functions.

Every backend reads the same `Variants`, so the semantics live in one place (`scores.py` turns a
tile of scores into the variant's logits). The order, for query i and key j of head h:

    s = softmax_scale * q_i . k_j
    s = softcap * tanh(s / softcap)                       softcap > 0 (flash-attn >= 2.6)
    s = s - slope[b, h] * |i + Nk - Nq - j|               ALiBi, after soft-capping
    s = s + attn_bias[b, h, i, j]                         broadcast, read tile by tile
    s = score_mod(s, b, h, i, j)
    s = -inf where causal / window / mask_mod hide (i, j)
    P = exp(s - lse),  lse = log(sum_j exp(s_ij) + exp(sinks[h]))     sinks: extra denominator
    O = (P * Z / (1 - dropout_p)) V,  Z ~ Bernoulli(1 - dropout_p)   dropout on the probabilities

A row that sees no key returns zeros and lse = -inf (= sinks[h] with sinks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True, eq=False)
class Variants:
    """The options of one call, checked. `seed` is drawn once per call from `generator` (dropout)."""

    softcap: float = 0.0
    alibi_slopes: torch.Tensor | None = None  # (B, Hq) float32 after validation (broadcast from (Hq,))
    attn_bias: torch.Tensor | None = None  # 4-d view of the bias as given, each dim 1 or full: no copy
    sinks: torch.Tensor | None = None  # (Hq,) float32
    dropout_p: float = 0.0
    generator: torch.Generator | None = None
    score_mod: Callable | None = None
    mask_mod: Callable | None = None
    block_mask: object | None = None  # fa2lab.variants.BlockMask

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the options in use, e.g. ("softcap", "sinks"): what decides the backend."""
        if self is NONE:  # a plain call
            return ()
        names = []
        for name, on in (("softcap", self.softcap > 0), ("alibi", self.alibi_slopes is not None),
                         ("bias", self.attn_bias is not None), ("sinks", self.sinks is not None),
                         ("dropout", self.dropout_p > 0), ("score_mod", self.score_mod is not None),
                         ("mask_mod", self.mask_mod is not None)):
            if on:
                names.append(name)
        if self.attn_bias is not None and self.attn_bias.requires_grad:
            names.append("bias_grad")
        return tuple(names)

    @property
    def any(self) -> bool:
        return bool(self.active)

    @property
    def changes_scores(self) -> bool:
        """Options applied to the score tile (everything but sinks and dropout)."""
        return (self.softcap > 0 or self.alibi_slopes is not None or self.attn_bias is not None
                or self.score_mod is not None or self.mask_mod is not None)

    def for_sequence(self, s: int, nq: int, nk: int) -> "Variants":
        """Sequence s of a varlen batch: its row of the slopes and its (1, Hq, nq, nk) corner of the bias."""
        slopes = None if self.alibi_slopes is None else self.alibi_slopes[s:s + 1]
        bias = self.attn_bias
        if bias is not None:
            bias = bias[min(s, bias.shape[0] - 1):][:1, :, :nq, :nk]  # (1, Hq or 1, nq or 1, nk or 1)
        mods = self.score_mod, self.mask_mod
        shift = _shift_batch(s, *mods) if any(mods) else mods
        return Variants(self.softcap, slopes, bias, self.sinks, self.dropout_p, self.generator, *shift, None)


def _shift_batch(s, score_mod, mask_mod):
    """score_mod / mask_mod of sequence s see b = s, as if the packed batch were dense."""
    sm = None if score_mod is None else (lambda score, b, h, qi, ki: score_mod(score, b + s, h, qi, ki))
    mm = None if mask_mod is None else (lambda b, h, qi, ki: mask_mod(b + s, h, qi, ki))
    return sm, mm


NONE = Variants()


def check_variants(q, k, *, softcap=0.0, alibi_slopes=None, attn_bias=None, sinks=None, dropout_p=0.0,
                   generator=None, score_mod=None, mask_mod=None, block_mask=None, batch=None, nq=None,
                   nk=None) -> Variants:
    """Validate the options against q (B, Hq, Nq, D) and k (B, Hkv, Nk, D); returns `Variants`.
    batch/nq/nk override the shapes (varlen: the number of sequences and the longest lengths)."""
    if (alibi_slopes is None and attn_bias is None and sinks is None and generator is None and score_mod is None
            and mask_mod is None and block_mask is None and type(softcap) in (int, float) and softcap == 0
            and type(dropout_p) in (int, float) and dropout_p == 0):
        return NONE  # a plain call (the common one): nothing to check
    b = q.shape[0] if batch is None else batch
    hq = q.shape[1]
    nq = q.shape[-2] if nq is None else nq
    nk = k.shape[-2] if nk is None else nk
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap >= 0 or softcap == float("inf"):
        raise ValueError(f"expected softcap to be a finite float >= 0 (0 turns it off), got {softcap!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"expected 0 <= dropout_p < 1, got {dropout_p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"expected generator to be a torch.Generator or None, got {type(generator).__name__}")
    for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if fn is not None and not callable(fn):
            raise ValueError(f"expected {name} to be a function (FlexAttention's signature), got {fn!r}")
    slopes = _check_slopes(alibi_slopes, b, hq, q.device)
    bias = _check_bias(attn_bias, b, hq, nq, nk, q.device)
    sinks = _check_sinks(sinks, hq, q.device)
    if block_mask is not None:
        from fa2lab.variants.blockmask import BlockMask

        if not isinstance(block_mask, BlockMask):
            raise ValueError(f"expected block_mask from fa2lab.create_block_mask, got {type(block_mask).__name__}")
        if (block_mask.q_len, block_mask.kv_len) != (nq, nk):
            raise ValueError(f"block_mask was made for Nq={block_mask.q_len}, Nk={block_mask.kv_len}, but this call "
                             f"has Nq={nq}, Nk={nk}; build it with create_block_mask(mask_mod, B, H, {nq}, {nk})")
        if mask_mod is not None and mask_mod is not block_mask.mask_mod:
            raise ValueError("pass either mask_mod or a block_mask built from it, not two different masks")
        mask_mod = block_mask.mask_mod
    return Variants(float(softcap), slopes, bias, sinks, float(dropout_p), generator, score_mod, mask_mod,
                    block_mask)


def _check_slopes(slopes, b, hq, device):
    if slopes is None:
        return None
    if not isinstance(slopes, torch.Tensor) or slopes.shape not in ((hq,), (b, hq)):
        raise ValueError(f"expected alibi_slopes float32 of shape (Hq,) = ({hq},) or (B, Hq) = ({b}, {hq}), got "
                         f"{getattr(slopes, 'shape', slopes)}")
    if slopes.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"expected alibi_slopes to be float32, got {slopes.dtype}; use alibi_slopes.float()")
    if slopes.device != device:
        raise ValueError(f"expected alibi_slopes on {device} like q, got {slopes.device}")
    return slopes.expand(b, hq)  # (B, Hq)


def _check_bias(bias, b, hq, nq, nk, device):
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.dim() > 4:
        raise ValueError(f"expected attn_bias to be a float tensor broadcastable to (B, Hq, Nq, Nk) = "
                         f"({b}, {hq}, {nq}, {nk}), got {getattr(bias, 'shape', bias)}")
    shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    if any(n not in (1, m) for n, m in zip(shape, (b, hq, nq, nk))):
        raise ValueError(f"attn_bias of shape {tuple(bias.shape)} does not broadcast to (B, Hq, Nq, Nk) = "
                         f"({b}, {hq}, {nq}, {nk}); use size 1 (or the full size) in each dim")
    if bias.device != device:
        raise ValueError(f"expected attn_bias on {device} like q, got {bias.device}")
    return bias.view(shape)  # kernels read it through .expand(B, Hq, Nq, Nk): strides 0, no copy


def _check_sinks(sinks, hq, device):
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or sinks.shape != (hq,):
        raise ValueError(f"expected sinks float32 of shape (Hq,) = ({hq},), one logit per query head, got "
                         f"{getattr(sinks, 'shape', sinks)}")
    if not sinks.is_floating_point():
        raise ValueError(f"expected sinks to be float32, got {sinks.dtype}; use sinks.float()")
    if sinks.device != device:
        raise ValueError(f"expected sinks on {device} like q, got {sinks.device}")
    return sinks
