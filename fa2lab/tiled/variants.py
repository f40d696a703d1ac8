"""The attention variants inside the tiled loops: one tile's visibility, logits and gradients.

forward.py and backward.py call these only when a variant is on, so the plain FA2 loop reads as
the paper's. Tiles are GQA-packed (B*Hkv, Br*G, Bc); `fa2lab.variants.scores` gives the formulas.
"""

from __future__ import annotations

import torch

from fa2lab.masks import TileState
from fa2lab.tiled.layout import pack_lse, unpack_rows
from fa2lab.variants import dropout as _dropout
from fa2lab.variants.scores import logits, logits_backward, mod_visible, packed_index


class TileVariants:
    """The variants of one call, bound to its shapes; methods work on one tile."""

    def __init__(self, var, seed, b, hq, hkv, nq, nk, device):
        self.var, self.seed = var, seed
        self.b, self.hq, self.hkv, self.group, self.nq, self.nk = b, hq, hkv, hq // hkv, nq, nk
        self.device = device
        self._idx = None

    def index(self, i0, i1, j0, j1):
        key = (i0, i1, j0, j1)
        if self._idx is None or self._idx[0] != key:  # the visibility check and the logits share it
            self._idx = key, packed_index(self.b, self.hkv, self.group, i0, i1, j0, j1, self.device)
        return self._idx[1]

    def visibility(self, state, window_mask, qt, kt, i0, i1, j0, j1):
        """(state, visible or None) after the mask_mod: tiles it leaves empty become SKIPPED (a
        block mask answers without evaluating anything), tiles it leaves full keep the window's."""
        var = self.var
        if var.mask_mod is None or state is TileState.SKIPPED:
            return state, window_mask
        if var.block_mask is not None:
            block = var.block_mask.state(qt, kt)
            if block is TileState.SKIPPED:
                return TileState.SKIPPED, None
            if block is TileState.FULL:
                return state, window_mask
        keep = mod_visible(var, self.index(i0, i1, j0, j1))
        visible = keep if window_mask is None else window_mask & keep
        visible = visible.expand(self.b * self.hkv, (i1 - i0) * self.group, j1 - j0)
        if not bool(visible.any()):
            return TileState.SKIPPED, None
        return (TileState.FULL, None) if bool(visible.all()) else (TileState.PARTIAL, visible)

    def logits(self, s, i0, i1, j0, j1):
        """Scaled scores (B*Hkv, Br*G, Bc) -> (logits, tanh for the backward or None)."""
        if not self.var.changes_scores:
            return s, None
        return logits(s, self.var, self.index(i0, i1, j0, j1), self.nq, self.nk)

    def dropout_scale(self, i0, i1, j0, j1, dtype):
        """Z / (1 - p) on the tile (B*Hkv, Br*G, Bc), or None without dropout."""
        p = self.var.dropout_p
        if p == 0:
            return None
        keep = _dropout.keep_mask(self.seed, self.index(i0, i1, j0, j1), self.hq, p)
        return keep.to(dtype) / (1 - p)

    def logits_backward(self, ds, s_scaled, tanh, i0, i1, j0, j1):
        if not self.var.changes_scores:
            return ds, None
        return logits_backward(ds, s_scaled, tanh, self.var, self.index(i0, i1, j0, j1), self.nq, self.nk)

    def sinks_packed(self, dtype):
        """sinks (Hq,) as the packed rows' (B*Hkv, Nq*G)."""
        sinks = self.var.sinks.to(dtype).view(1, self.hq, 1).expand(self.b, self.hq, self.nq)
        return pack_lse(sinks, self.hkv)

    def add_bias_grad(self, dbias, ds, i0, i1, j0, j1):
        """Add a tile's dL/d(bias) into dbias (the bias's own 4-d shape), summed over broadcast dims."""
        tile = unpack_rows(ds.contiguous(), self.b, self.hq, self.hkv)  # (B, Hq, Br, Bc)
        dims = [d for d in range(4) if dbias.shape[d] == 1 and tile.shape[d] > 1]
        if dims:
            tile = tile.sum(dims, keepdim=True)
        rows = slice(i0, i1) if dbias.shape[2] > 1 else slice(0, 1)
        cols = slice(j0, j1) if dbias.shape[3] > 1 else slice(0, 1)
        dbias[:, :, rows, cols] += tile.to(dbias.dtype)


def apply_sinks(out_p, lse_p, sink_p):
    """Add exp(sink) to each row's denominator: lse' = logaddexp(lse, sink), out' = out e^(lse - lse').
    Rows that saw no key (lse = -inf) keep out = 0 and get lse' = sink."""
    lse_s = torch.logaddexp(lse_p, sink_p)
    return out_p * torch.exp(lse_p - lse_s)[..., None], lse_s


def sinks_grad(sink_p, lse_p, delta_p, b, hq, hkv):
    """dL/dsinks (Hq,): the sink's probability exp(sink - lse) times (0 - Delta), summed over rows."""
    from fa2lab.tiled.layout import unpack_lse

    g = -(torch.exp(sink_p - lse_p) * delta_p)  # (B*Hkv, Nq*G)
    return unpack_lse(g, b, hq, hkv).sum(dim=(0, 2))  # (Hq,)
