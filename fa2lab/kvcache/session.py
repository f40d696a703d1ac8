"""DecodeSession: the GPU-resident decode life cycle of the CONTEXT's CUDA design, on any device.

    init() -> load_qkv(q, k, v) -> decode() -> get_output() -> load_qkv ... -> reset() -> close()

The cache (a StaticKVCache: persistent K/V buffers) and the fp32 output buffer are allocated once
and reused every step; `decode` appends the step's K/V, attends, and so advances the length.
A call in the wrong state raises an error naming the state and the call that was expected.
"""

from __future__ import annotations

import torch

from fa2lab.kvcache.static import StaticKVCache

_NEXT = {  # state -> calls allowed in it
    "created": ("init", "close"),
    "ready": ("load_qkv", "reset", "close"),
    "loaded": ("decode", "reset", "close"),
    "decoded": ("get_output", "reset", "close"),
    "closed": (),
}


class DecodeSession:
    def __init__(self, batch: int, heads_q: int, heads_kv: int, max_len: int, head_dim: int, *,
                 dtype=torch.float16, device="cpu", **decode_kwargs):
        self.shape = dict(batch=batch, heads_q=heads_q, heads_kv=heads_kv, max_len=max_len, head_dim=head_dim)
        self.dtype, self.device, self.decode_kwargs = dtype, torch.device(device), decode_kwargs
        self.state = "created"
        self.cache: StaticKVCache | None = None
        self.output: torch.Tensor | None = None
        self.steps = 0

    def _enter(self, call: str) -> None:
        if call not in _NEXT[self.state]:
            if self.state == "closed":
                raise RuntimeError(f"DecodeSession.{call}(): the session is closed; create a new DecodeSession")
            raise RuntimeError(f"DecodeSession.{call}() called in state {self.state!r}; expected one of "
                               f"{', '.join(c + '()' for c in _NEXT[self.state])}")

    def init(self) -> "DecodeSession":
        self._enter("init")
        s = self.shape
        if s["heads_q"] % s["heads_kv"]:
            raise ValueError(f"expected heads_q={s['heads_q']} to be a multiple of heads_kv={s['heads_kv']}")
        self.cache = StaticKVCache(s["batch"], s["heads_kv"], s["max_len"], s["head_dim"], dtype=self.dtype,
                                   device=self.device)
        self.state = "ready"
        return self

    def load_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Take the step's q (B, Hq, Nq, D) and its new k, v (B, Hkv, Nq, D)."""
        self._enter("load_qkv")
        s = self.shape
        want_q = (s["batch"], s["heads_q"], q.shape[2] if q.dim() == 4 else -1, s["head_dim"])
        if q.dim() != 4 or tuple(q.shape) != want_q:
            raise ValueError(f"expected q of shape (B={s['batch']}, Hq={s['heads_q']}, Nq, D={s['head_dim']}), "
                             f"got {tuple(q.shape)}")
        want_kv = (s["batch"], s["heads_kv"], q.shape[2], s["head_dim"])
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape) != want_kv:
                raise ValueError(f"expected {name} of shape {want_kv} (one new token per query), got {tuple(x.shape)}")
        self._q, self._k, self._v = q.to(self.device), k.to(self.device), v.to(self.device)
        self.state = "loaded"

    def decode(self) -> None:
        """Append the loaded K/V (the length advances) and attend; the result goes to the output buffer."""
        self._enter("decode")
        self.cache.append(self._k, self._v)  # raises before any change if the cache is full
        out = self.cache.attend(self._q, **self.decode_kwargs)  # (B, Hq, Nq, D)
        if self.output is None or self.output.shape != out.shape:
            self.output = torch.empty(out.shape, dtype=torch.float32, device=self.device)
        self.output.copy_(out)
        self.steps += 1
        self.state = "decoded"

    def get_output(self) -> torch.Tensor:
        """The fp32 output buffer (B, Hq, Nq, D); it is overwritten by the next decode."""
        self._enter("get_output")
        self.state = "ready"
        return self.output

    @property
    def seqlens(self) -> torch.Tensor:
        return self.cache.seqlens() if self.cache is not None else torch.zeros(0, dtype=torch.int32)

    def reset(self) -> None:
        """A new generation: lengths to 0, buffers kept."""
        self._enter("reset")
        self.cache.reset()
        self.steps = 0
        self.state = "ready"

    def close(self) -> None:
        self._enter("close")
        self.cache = self.output = None
        self.state = "closed"
