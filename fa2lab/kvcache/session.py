"""DecodeSession: the GPU-resident decode life cycle of the CUDA decode design fa2lab grew
from, on any device.

    init() -> load_qkv(q, k, v) -> decode() -> get_output() -> load_qkv ... -> reset() -> close()

The cache (a StaticKVCache: persistent K/V buffers) and the fp32 output buffer are allocated once
and reused every step; `decode` appends the step's K/V, attends, and so advances the length.
A call in the wrong state raises an error naming the state and the call that was expected.
`init(cache=..., filled=n)` continues a cache that already holds a prompt (the model layers'
`fa2lab.models.SplitKCache(cuda_graph=True)` hands each layer's prefilled cache to a session).
"""

from __future__ import annotations

import torch

from fa2lab import _checks
from fa2lab.kvcache.static import StaticKVCache

_NEXT = {  # state -> calls allowed in it
    "created": ("init", "close"),
    "ready": ("load_qkv", "reset", "close"),
    "loaded": ("decode", "load_qkv", "reset", "close"),  # load_qkv again replaces the loaded step
    "decoded": ("get_output", "reset", "close"),
    "closed": (),
}


class DecodeSession:
    """cuda_graph=True (CUDA only): each step - write K/V at each sequence's length, advance the
    lengths, split-K attention - is one captured CUDA graph over persistent buffers, replayed with
    no host-device sync and no kernel-launch overhead. It takes one new token per sequence per step,
    all sequences advancing together (the capacity check uses a host-side count). Its decode
    options (num_splits, softmax_scale, causal, window_size) go into the captured plan.
    output_dtype: the output buffer's dtype (default float32, as the design's fp32 output; a model
    layer asks for its activations' dtype, and the cast happens inside the graph).

    Every option is checked here, so that a decode cannot fail on one; and a decode that fails all
    the same (out of memory, an interrupt) leaves the session exactly as before it: same lengths,
    same state, and the same call can be retried."""

    def __init__(self, batch: int, heads_q: int, heads_kv: int, max_len: int, head_dim: int, *,
                 dtype=torch.float16, device="cpu", cuda_graph: bool = False, output_dtype=torch.float32,
                 **decode_kwargs):
        self.shape = dict(batch=batch, heads_q=heads_q, heads_kv=heads_kv, max_len=max_len, head_dim=head_dim)
        for name, value in self.shape.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"expected {name} to be a positive int, got {value!r}")
        if heads_q % heads_kv:
            raise ValueError(f"expected heads_q={heads_q} to be a multiple of heads_kv={heads_kv}; use heads_kv in "
                             f"{[d for d in range(1, heads_q + 1) if heads_q % d == 0]}")
        if dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"expected dtype to be one of {list(_checks.FLOAT_DTYPES)}, got {dtype!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"expected a device such as 'cpu' or 'cuda', got {device!r}") from None
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"expected cuda_graph to be True or False, got {cuda_graph!r}")
        if cuda_graph and self.device.type not in GRAPH_DEVICES:
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {self.device}; use cuda_graph=False")
        if output_dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"expected output_dtype to be one of {list(_checks.FLOAT_DTYPES)}, got {output_dtype!r}")
        self.output_dtype = output_dtype
        self.dtype, self.decode_kwargs = dtype, _check_decode_options(decode_kwargs, dtype, self.device,
                                                                      self.shape, cuda_graph)
        self.cuda_graph = cuda_graph
        self.graph = None
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

    def init(self, cache: StaticKVCache | None = None, filled: int = 0) -> "DecodeSession":
        """Allocate the buffers, or continue `cache`: a StaticKVCache of the session's shape, dtype
        and device whose sequences hold at most `filled` tokens (a host-side count: the capacity
        check of graph steps uses it and never reads the lengths back)."""
        self._enter("init")
        s = self.shape
        if cache is None:
            if filled:
                raise ValueError(f"filled={filled} describes a given cache; pass cache= with it, or filled=0")
            cache = StaticKVCache(s["batch"], s["heads_kv"], s["max_len"], s["head_dim"], dtype=self.dtype,
                                  device=self.device)
        else:
            want = (s["batch"], s["heads_kv"], s["max_len"], s["head_dim"])
            got = (cache.batch, cache.heads_kv, cache.max_len, cache.head_dim)
            if not isinstance(cache, StaticKVCache) or got != want or cache.head_dim_v != s["head_dim"]:
                raise ValueError(f"expected a StaticKVCache of (B, Hkv, max_len, D) = {want}, got "
                                 f"{got if isinstance(cache, StaticKVCache) else type(cache).__name__}")
            if cache.dtype != self.dtype or cache.device != torch.device(self.device):
                raise ValueError(f"expected the cache in {self.dtype} on {self.device}, got {cache.dtype} on "
                                 f"{cache.device}")
            if isinstance(filled, bool) or not isinstance(filled, int) or not 0 <= filled <= s["max_len"]:
                raise ValueError(f"expected filled to be an int in [0, max_len={s['max_len']}], got {filled!r}")
        self.cache = cache
        self._host_len = filled
        self.state = "ready"
        return self

    def load_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Take the step's q (B, Hq, Nq, D) and its new k, v (B, Hkv, Nq, D)."""
        self._enter("load_qkv")
        s = self.shape
        for name, x in (("q", q), ("k", k), ("v", v)):
            _checks.check_floating(name, x)
            if x.dtype != self.dtype:  # the dtype policy of every cache: no silent cast
                raise ValueError(f"expected {name} in the session's dtype {self.dtype}, got {x.dtype}; "
                                 f"convert it with {name}.to({self.dtype})")
        want_q = (s["batch"], s["heads_q"], q.shape[2] if q.dim() == 4 else -1, s["head_dim"])
        if q.dim() != 4 or tuple(q.shape) != want_q:
            raise ValueError(f"expected q of shape (B={s['batch']}, Hq={s['heads_q']}, Nq, D={s['head_dim']}), "
                             f"got {tuple(q.shape)}")
        want_kv = (s["batch"], s["heads_kv"], q.shape[2], s["head_dim"])
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape) != want_kv:
                raise ValueError(f"expected {name} of shape {want_kv} (one new token per query), got {tuple(x.shape)}")
        if self.cuda_graph:
            if q.shape[2] != 1:
                raise ValueError(f"cuda_graph=True decodes one token per step, got Nq={q.shape[2]}")
            if not hasattr(self, "_qbuf"):  # persistent inputs: the captured graph reads these addresses
                self._qbuf, self._kbuf, self._vbuf = (torch.empty_like(x, dtype=self.dtype, device=self.device)
                                                      for x in (q, k, v))
            self._qbuf.copy_(q)
            self._kbuf.copy_(k)
            self._vbuf.copy_(v)
        else:
            self._q, self._k, self._v = q.to(self.device), k.to(self.device), v.to(self.device)
        self.state = "loaded"

    def decode(self) -> None:
        """Append the loaded K/V (the length advances) and attend; the result goes to the output buffer."""
        self._enter("decode")
        # All or nothing: the append only writes past each sequence's length, so restoring the
        # lengths undoes it; the output buffer is written last.
        if self.cuda_graph and self.graph is not None:  # a replay: checks first, then nothing can fail halfway
            self._replay()
            self.steps += 1
            self.state = "decoded"
            return
        lengths, host_len = self.cache.lengths.clone(), self._host_len
        try:
            if self.cuda_graph:
                self._decode_graph()
            else:
                self.cache.append(self._k, self._v)  # raises before any change if the cache is full
                out = self.cache.attend(self._q, **self.decode_kwargs)  # (B, Hq, Nq, D)
                if self.output is None or self.output.shape != out.shape:
                    self.output = torch.empty(out.shape, dtype=self.output_dtype, device=self.device)
                self.output.copy_(out)
        except BaseException:
            self.cache.lengths.copy_(lengths)
            self._host_len = host_len
            raise
        self.steps += 1
        self.state = "decoded"

    def _graph_step(self) -> None:
        """One decode step on device tensors only (no sync): capturable. decode_attention writes
        the step's K/V at each sequence's length (in-place append) and attends; then the lengths
        advance on the device."""
        from fa2lab.decode import decode_attention

        cache = self.cache
        out = decode_attention(self._qbuf, cache.k, cache.v, self._kbuf, self._vbuf, cache_seqlens=cache.lengths,
                               plan=self._plan)
        cache.lengths.add_(1)
        self.output.copy_(out)

    def _check_room(self) -> None:
        if self._host_len + 1 > self.shape["max_len"]:
            raise ValueError(f"sequences would grow to {self._host_len + 1} tokens, past max_len="
                             f"{self.shape['max_len']}; allocate a larger session")

    def _replay(self) -> None:
        self._check_room()  # before the replay: a full cache changes nothing
        self.graph()
        self._host_len += 1

    def _decode_graph(self) -> None:
        """The first graph step: plan (one read of the lengths), warm up, capture, replay."""
        from fa2lab.decode import decode_plan

        s = self.shape
        self._check_room()
        self.output = torch.empty(s["batch"], s["heads_q"], 1, s["head_dim"], dtype=self.output_dtype,
                                  device=self.device)
        # Checked once (this reads the lengths back); every replay then runs sync-free.
        self._plan = decode_plan(self._qbuf, self.cache.k, self.cache.v, self._kbuf, self._vbuf,
                                 cache_seqlens=self.cache.lengths, **self.decode_kwargs)
        saved = self.cache.lengths.clone()
        self.graph = _capture(self._graph_step, self.device, undo=lambda: self.cache.lengths.copy_(saved))
        self._replay()

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
        self._host_len = 0
        self.steps = 0
        self.state = "ready"

    def close(self) -> None:
        self._enter("close")
        self.cache = self.output = self.graph = None
        self.state = "closed"


_DECODE_OPTIONS = ("num_splits", "softmax_scale", "causal", "window_size", "backend", "unified_max")
GRAPH_DEVICES = ("cuda",)  # where cuda_graph=True can capture (a test of the logic on a CPU widens it)


def _capture(step, device, undo):
    """Run `step` once on a side stream (compiles the kernels), `undo` its effects, capture it in
    a CUDA graph; returns the replay (a callable that launches the whole step at once)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    undo()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _check_decode_options(options: dict, dtype, device, shape: dict, cuda_graph: bool) -> dict:
    """The decode options of a session, checked once (decode_attention's meaning)."""
    from fa2lab.backends import Case, choose
    from fa2lab.decode.api import DECODE_BACKENDS

    unknown = sorted(set(options) - set(_DECODE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown decode option(s) {unknown}; DecodeSession takes {list(_DECODE_OPTIONS)} "
                         f"(the output buffer holds out only: no return_lse)")
    if cuda_graph and (options.get("unified_max") is not None or options.get("backend", "auto") not in ("auto",
                                                                                                     "triton")):
        raise ValueError(f"cuda_graph=True captures the planned Triton split-K kernel, which has no unified max "
                         f"and no other backend; got backend={options.get('backend', 'auto')!r}, unified_max="
                         f"{options.get('unified_max')!r}: drop them or use cuda_graph=False")
    n = options.get("num_splits")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"expected num_splits to be a positive int or None (auto), got {n!r}")
    try:
        _checks.resolve_scale(options.get("softmax_scale"), shape["head_dim"])
    except (TypeError, ValueError):
        raise ValueError(f"expected softmax_scale to be a finite number or None (1/sqrt(D)), got "
                         f"{options.get('softmax_scale')!r}") from None
    if not isinstance(options.get("causal", True), bool):
        raise ValueError(f"expected causal to be True or False, got {options['causal']!r}")
    if "window_size" in options:
        _checks.check_window(options["window_size"])
    backend, phi = options.get("backend", "auto"), options.get("unified_max")
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}; choose one of {list(DECODE_BACKENDS)}")
    if phi is not None:
        if isinstance(phi, bool) or not isinstance(phi, (int, float)) or phi != phi or abs(phi) == float("inf"):
            raise ValueError(f"expected unified_max to be a finite number or None, got {phi!r}")
    # The session's case, judged by the one decision point: an explicit backend that cannot run it
    # (triton on a CPU, sdpa for any cache) is refused now rather than at the first decode.
    case = Case(device.type, dtype, 1, shape["max_len"], shape["heads_q"], shape["heads_kv"], shape["head_dim"],
                shape["head_dim"], bool(options.get("causal", True)), tuple(options.get("window_size", (-1, -1))),
                True, cache="dense", unified_max=phi is not None)
    choose("decode", case, backend, log_choice=False)
    return dict(options)
