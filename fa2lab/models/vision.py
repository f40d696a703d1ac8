"""`FlashAttention2Vision`: a vision encoder's attention over packed image patches, through varlen.

A vision tower sees several images at once as one packed sequence of patches, total patches long;
cu_seqlens marks where each image (or video frame) starts. Patches attend bidirectionally within
their own image only, which `fa2lab.varlen_attention` does without an N x N block-diagonal mask:

    patches   a a a b b        cu_seqlens = [0, 3, 5]
    a  sees   x x x . .
    b  sees   . . . x x

Parameter names follow Qwen3-VL's vision attention (qkv, proj), and so does `forward`'s signature,
so `fa2lab.hf.use_varlen_vision(model)` can put it in place of transformers' module.
"""

from __future__ import annotations

import torch
from torch import nn

from fa2lab import _checks
from fa2lab.models.functional import packed_attention
from fa2lab.models.rotary import apply_rotary_vision


class FlashAttention2Vision(nn.Module):
    """forward(hidden_states (total, dim), cu_seqlens int (images + 1,), position_embeddings=(cos, sin)
    each (total, D)) -> (total, dim)."""

    def __init__(self, dim: int, num_heads: int, *, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"expected the vision width {dim} to be a multiple of num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim, self.backend = dim, num_heads, dim // num_heads, backend
        self.scaling = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "FlashAttention2Vision":
        """Wrap the weights of a module with `qkv`, `proj` and `num_heads` (e.g. Qwen3-VL's); shares
        them, does not copy."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dim, new.num_heads = module.qkv.in_features, module.num_heads
        new.head_dim, new.backend = new.dim // new.num_heads, backend
        new.scaling = getattr(module, "scaling", new.head_dim ** -0.5)
        new.qkv, new.proj = module.qkv, module.proj
        return new

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        total = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(total, 3, self.num_heads, -1).unbind(1)  # (total, H, D) each
        if position_embeddings is not None:
            q, k = apply_rotary_vision(q, k, *position_embeddings)
        cu = _checks.check_int32("cu_seqlens", cu_seqlens).to(hidden_states.device)
        out = packed_attention(q, k, v, cu, cu, causal=False, softmax_scale=self.scaling, backend=self.backend)  # (total, H, D)
        return self.proj(out.reshape(total, -1))
