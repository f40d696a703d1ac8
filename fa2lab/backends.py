"""The attention backends and the one place that decides which of them runs: `choose(op, case)`.

Every entry point asks `choose`: `fa2lab.attention` (op "dense"), `fa2lab.varlen_attention`
("varlen"), `fa2lab.decode_attention` and the KV caches ("decode"), ring attention's blocks
("ring") and the model layers of `fa2lab.models` / `fa2lab.hf` ("model"). One set of backend
names serves them all (`BACKENDS`); `support_table(op, case)` says for each backend whether it can
run a case and, when not, why. "auto" takes the first supported backend of `auto_order(op, case)`;
an explicit backend that cannot run the case raises a ValueError with the reason. Each distinct
decision (op, backend, reason) is logged once at INFO on the "fa2lab" logger, in a bounded set.

How to add a column (an option such as softcap, ALiBi, a bias, sinks, dropout, a score_mod):
  1. add a field to `Case` whose default means "off" (`softcap: float | None = None`), so every
     existing `Case(...)` and `Case.of(...)` call stays valid; set it where the entry point builds
     its case;
  2. in each backend's `unsupported(case, op)`, return a reason when the field is set and the
     backend cannot do it ("torch SDPA has no softcap"); return None where it can;
  3. add the field to the grid of tests/test_dispatch.py, which checks that every entry point
     reaches `choose`'s decision.
Adding a backend means a class here (`name`, `summary`, `unsupported`, `__call__`) and a place in
`AUTO_ORDER` for the ops it serves.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fa2lab import masks
from fa2lab.reference import attention_ref
from fa2lab.tiled.attention import tiled_attention_unchecked
from fa2lab.variants import NONE


@dataclass(frozen=True)
class Case:
    """Everything about a call that decides which backend can run it."""

    device: str
    dtype: torch.dtype
    nq: int
    nk: int
    hq: int
    hkv: int
    d: int
    dv: int
    causal: bool
    window_size: tuple[int, int]
    return_lse: bool
    # Columns added after the first eleven have defaults meaning "off" (see the module docstring).
    cache: str = "dense"  # how the K/V are held: "dense" | "paged" | "compressed" (decode) | "packed" (varlen)
    unified_max: bool = False  # decode: FlashDecoding++'s fixed softmax reference (PyTorch split-K only)
    requires_grad: bool = False  # model: a backward pass will follow (no split-K decode route then)
    # The attention variants in use (fa2lab.variants.Variants.active): "softcap", "alibi", "bias",
    # "bias_grad", "sinks", "dropout", "score_mod", "mask_mod". One column for all of them: each
    # backend's `unsupported` names the ones it cannot run.
    variants: tuple[str, ...] = ()

    @classmethod
    def of(cls, q, k, v, causal, window_size, return_lse, **columns) -> "Case":
        return cls(q.device.type, q.dtype, q.shape[-2], k.shape[-2], q.shape[1], k.shape[1],
                   q.shape[-1], v.shape[-1], bool(causal), tuple(window_size), bool(return_lse), **columns)

    @property
    def window(self) -> tuple[int, int]:
        return masks.effective_window(self.causal, self.window_size)


class Reference:
    name = "reference"
    summary = "naive materialised attention, fp32 (fp64 for fp64) inside: O(Nq*Nk) memory"

    def unsupported(self, case: Case, op: str = "dense") -> str | None:
        if op == "ring":
            return "ring attention merges FA2 blocks by their LSE: use 'tiled' or 'triton'"
        return None

    def __call__(self, q, k, v, *, causal, window_size, scale, return_lse, variants=NONE):
        return attention_ref(q, k, v, causal=causal, window_size=window_size, softmax_scale=scale,
                             upcast=True, return_lse=return_lse, variants=variants)


class Tiled:
    name = "tiled"
    summary = ("FlashAttention-2 in PyTorch (fa2lab.tiled; split-K decode: fa2lab.decode.splitk): O(N) memory, "
               "every mask, shape and variant")

    def unsupported(self, case: Case, op: str = "dense") -> str | None:
        if op == "decode" and "dropout" in case.variants:
            return "the split-K decode has no dropout (decoding in training): use 'reference'"
        return None

    def __call__(self, q, k, v, *, causal, window_size, scale, return_lse, variants=NONE):
        return tiled_attention_unchecked(q, k, v, causal=causal, window_size=window_size, scale=scale,
                                         return_lse=return_lse, variants=variants)


class Sdpa:
    name = "sdpa"
    summary = "torch.nn.functional.scaled_dot_product_attention (torch's fused kernels)"

    def unsupported(self, case: Case, op: str = "dense") -> str | None:
        left, right = case.window
        if case.variants:
            return f"torch SDPA has none of fa2lab's attention variants ({', '.join(case.variants)})"
        if op == "decode":
            return "torch SDPA does not read KV caches (per-sequence lengths, pages): use 'tiled' or 'triton'"
        if op == "ring":
            return "torch SDPA does not return the log-sum-exp that ring attention merges by"
        if case.return_lse:
            return "torch SDPA does not return the log-sum-exp"
        if left >= 0 or (right >= 0 and not case.causal):
            return f"torch SDPA has no sliding window (window_size={case.window_size})"
        if case.causal and case.nq != case.nk:
            return f"torch SDPA aligns causal masks top-left, fa2lab bottom-right (Nq={case.nq} != Nk={case.nk})"
        if case.nq > 0 and case.nk == 0:  # rows that see no key (no query rows at all: nothing to run)
            return f"torch SDPA does not define zero-length inputs (Nq={case.nq}, Nk={case.nk})"
        return None

    def __call__(self, q, k, v, *, causal, window_size, scale, return_lse, variants=NONE):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])


# find_spec walks sys.path: once per process, not per call (and torch.compile cannot trace it)
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_unavailable(device: str, dtype: torch.dtype, head_dims: tuple[int, ...]) -> str | None:
    """Why the Triton kernels cannot run a case, or None."""
    if not _triton_installed():
        return "triton is not installed (pip install triton; Linux x86-64)"
    if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the Triton kernels need a CUDA device, got {device} (TRITON_INTERPRET=1 interprets them on the CPU, slowly)"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernels take float16, bfloat16 or float32, got {dtype}"
    if max(head_dims) > 256:
        return f"the Triton kernels support head dims up to 256, got {max(head_dims)}"
    return None


class Triton:
    name = "triton"
    summary = "fa2lab's Triton FA2 kernels (fa2lab.kernels): forward + backward, every mask, GQA, varlen"

    def unsupported(self, case: Case, op: str = "dense") -> str | None:
        if op == "decode" and case.cache not in ("dense", "paged"):
            return f"the Triton decode kernel reads dense or paged caches, not a {case.cache} one"
        if op == "decode" and case.unified_max:
            return "the Triton decode kernel has no unified max (FlashDecoding++): use 'tiled'"
        extra = [n for n in case.variants if n not in TRITON_DECODE_VARIANTS]
        if op == "decode" and extra:
            return f"the Triton decode kernel has no {', '.join(extra)} (the split-K in PyTorch has them)"
        why = triton_unavailable(case.device, case.dtype, (case.d, case.dv))
        mods = [n for n in case.variants if n in TRITON_UNSUPPORTED_VARIANTS]
        if why is None and mods:
            why = f"the Triton kernels do not run {' or '.join(mods)} ({TRITON_UNSUPPORTED_VARIANTS[mods[0]]})"
        return why

    def __call__(self, q, k, v, *, causal, window_size, scale, return_lse, variants=NONE):
        from fa2lab.kernels.attention import triton_attention

        left, right = masks.effective_window(causal, window_size)
        return triton_attention(q, k, v, scale=scale, left=left, right=right, return_lse=return_lse,
                                variants=variants)


# Variants the Triton split-K decode kernel runs (fa2lab/kernels/decode.py); the others go to the
# PyTorch split-K.
TRITON_DECODE_VARIANTS = ("softcap", "alibi", "sinks")

# Variants the Triton kernels leave to the tiled backend, and why.
TRITON_UNSUPPORTED_VARIANTS = {
    "score_mod": "Python functions of index tensors run per tile on the tiled backend",
    "mask_mod": "Python functions of index tensors run per tile on the tiled backend",
    "bias_grad": "the kernels take a bias in the forward and give q, k, v gradients, not bias.grad",
}


BACKENDS = {b.name: b for b in (Reference(), Tiled(), Sdpa(), Triton())}
OPS = ("dense", "varlen", "decode", "ring", "model")

# Fastest first, per op and device class (measured: BENCHMARKS.md). Dense, varlen and model
# layers: on the CPU torch's fused kernel beats the PyTorch-level FA2 wherever it applies and the
# tiled FA2 runs everything else in O(N) memory; on CUDA fp16/bf16 the Triton kernels (1.3-1.4x
# SDPA's default flash forward, >= its backward on the H100); fp32 on CUDA: SDPA first (the
# kernels' exact-fp32 dots are slow). Decode: the Triton split-K kernel on CUDA, the PyTorch
# split-K elsewhere (never the interpreter). Ring blocks: the kernels for fp16/bf16 on CUDA.
AUTO_ORDER = {
    "dense": {"cpu": ("sdpa", "tiled"), "cuda": ("triton", "sdpa", "tiled"), "cuda-fp32": ("sdpa", "triton", "tiled")},
    "decode": {"cpu": ("tiled",), "cuda": ("triton", "tiled"), "cuda-fp32": ("triton", "tiled")},
    "ring": {"cpu": ("tiled",), "cuda": ("triton", "tiled"), "cuda-fp32": ("tiled",)},
}
AUTO_ORDER["varlen"] = AUTO_ORDER["model"] = AUTO_ORDER["dense"]
DEFAULT_AUTO_ORDER = ("sdpa", "tiled")

# Plain attention materialises Nq x Nk scores per head; never choose it beyond this many scores
# (B * Hq * Nq * Nk), whatever a measurement says: memory, not speed, is then the constraint.
MAX_PLAIN_SCORES = 1 << 24  # 64 MiB of float32 scores
DECODE_MAX_NQ = 16  # new tokens per step that a model layer still sends to split-K decode (speculative, chunked)

log = logging.getLogger("fa2lab")
_LOG_MEMORY = 256  # distinct decisions remembered for the log-once rule; the oldest is forgotten first
_logged: collections.OrderedDict = collections.OrderedDict()


@dataclass(frozen=True)
class Choice:
    """The decision: backend `name` (a key of BACKENDS), why, and the op that runs it (a model
    layer's generation step runs as op "decode")."""

    name: str
    reason: str
    op: str = "dense"


def device_class(case: Case) -> str:
    if case.device == "cuda" and case.dtype in (torch.float32, torch.float64):
        return "cuda-fp32"
    return case.device


def auto_order(op: str, case: Case) -> tuple[str, ...]:
    fallback = DEFAULT_AUTO_ORDER if op in ("dense", "varlen", "model") else ("tiled",)
    return AUTO_ORDER[op].get(device_class(case), fallback)


def _reason(backend, op: str, cases: list[Case]) -> str | None:
    """Why `backend` cannot run one of `cases` (the first such reason), or None."""
    for c in cases:
        why = backend.unsupported(c, op)
        if why:
            return why
    return None


def support_table(op: str, cases: Case | list[Case]) -> dict[str, str | None]:
    """{backend: None if it runs every case, else the reason it cannot}: the support table."""
    _check_op(op)
    cases = [cases] if isinstance(cases, Case) else list(cases)
    return {name: _reason(b, op, cases) for name, b in BACKENDS.items()}


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose one of {list(OPS)}")


def _is_generation_step(case: Case) -> bool:
    """A model layer's decode step on CUDA: a few new queries against a long cache, no gradients.
    FA2's forward would give each (sequence, head) one program and leave most SMs idle; the split-K
    kernel spreads the cache over the whole GPU."""
    return (case.device == "cuda" and case.cache == "dense" and case.nq <= DECODE_MAX_NQ < case.nk
            and case.dtype in (torch.float16, torch.bfloat16) and not case.requires_grad)


# Decisions already made: (op, cases, backend, log_choice, TRITON_INTERPRET) -> Choice, for calls without a
# crossover measurement. A model calls the same few cases in every layer and step; the support tables
# behind a decision cost several us of host time a call, the lookup well under one. Forgotten at once past
# _CHOICE_MEMORY entries; bypassed while torch.compile traces. Code that changes the policy itself
# (AUTO_ORDER, a backend's `unsupported`) clears it: `_CHOICES.clear()`.
_CHOICES: dict = {}
_CHOICE_MEMORY = 1024


def choose(op: str, cases: Case | list[Case], backend: str = "auto", *, crossover=None,
           log_choice: bool = True) -> Choice:
    """Which backend runs `cases` (one Case, or the sequences of a varlen batch, all run by one
    backend) for `op` in OPS.

    backend: "auto" or a name in BACKENDS; an explicit one that cannot run a case raises a
    ValueError naming the reason. crossover (op "model" only): a measurement with
    `plain_is_faster(backend, nq, nk)`, `length(backend)` and `source` (fa2lab.models.selection
    measures it); "auto" then picks plain attention ("reference") where it was measured faster.
    A decision depends on the cases' columns only, so repeated ones are remembered (_CHOICES)."""
    if crossover is not None or torch.compiler.is_compiling():
        return _choose(op, cases, backend, crossover=crossover, log_choice=log_choice)
    key = (op, cases if isinstance(cases, Case) else tuple(cases), backend, log_choice,
           os.environ.get("TRITON_INTERPRET"))
    choice = _CHOICES.get(key)
    if choice is None:
        choice = _choose(op, cases, backend, log_choice=log_choice)  # raises for an unsupported explicit backend
        if len(_CHOICES) >= _CHOICE_MEMORY:
            _CHOICES.clear()
        _CHOICES[key] = choice
    return choice


def _choose(op: str, cases, backend: str, *, crossover=None, log_choice: bool = True) -> Choice:
    _check_op(op)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {list(BACKENDS)}")
    cases = [cases] if isinstance(cases, Case) else list(cases)
    if not cases:
        return Choice("tiled", "empty batch", op)
    if backend != "auto":  # only the requested backend's reason; the whole table for the error message
        if _reason(BACKENDS[backend], op, cases):
            table = support_table(op, cases)
            raise ValueError(f"backend {backend!r} cannot run this {op} case: {table[backend]}; "
                             f"use backend='auto' or one of {[n for n, r in table.items() if r is None]}")
        return _logged_choice(op, Choice(backend, "requested", op), log_choice)
    case = cases[0]
    if op == "model" and len(cases) == 1 and _is_generation_step(case):
        decode = support_table("decode", cases)
        name = next((n for n in auto_order("decode", case) if decode[n] is None), "tiled")
        return _logged_choice(op, Choice(name, f"generation step (Nq <= {DECODE_MAX_NQ} < Nk on CUDA, no "
                                               f"gradients): split-K decode", "decode"), log_choice)
    order = auto_order(op, case)
    table = {n: _reason(BACKENDS[n], op, cases) for n in order}  # the backends auto may pick, no others
    supported = [n for n in order if table[n] is None]
    skipped = [f"not {n}: {table[n]}" for n in order if table[n] is not None]
    if not supported:
        return _logged_choice(op, Choice("reference", "; ".join(skipped) or "no FA2 backend supports this case", op),
                              log_choice)
    if op == "model" and crossover is not None:
        nq, nk = max(c.nq for c in cases), max(c.nk for c in cases)
        scores = sum(c.hq * c.nq * c.nk for c in cases)
        if scores <= MAX_PLAIN_SCORES and crossover.plain_is_faster(supported[0], nq, nk):
            return _logged_choice(op, Choice("reference", f"plain attention measured faster than {supported[0]} "
                                             f"below N={crossover.length(supported[0])} ({crossover.source})", op),
                                  log_choice)
    why = f"fastest supported on {device_class(case)}"
    return _logged_choice(op, Choice(supported[0], "; ".join([why, *skipped]), op), log_choice)


@functools.lru_cache(maxsize=_LOG_MEMORY)
def _reason_key(reason: str) -> str:
    return re.sub(r"\d+", "#", reason)


def _logged_choice(op: str, choice: Choice, enabled: bool = True) -> Choice:
    """Log each distinct (op, backend, reason) once, the numbers in a reason left out of the key, so
    a generation loop (Nk grows each step) logs once. The memory is bounded all the same."""
    if not enabled or torch.compiler.is_compiling():  # torch.compile cannot trace a logger call
        return choice
    key = (op, choice.name, _reason_key(choice.reason))  # Nq=1 != Nk=47 and Nk=48: one reason
    if key in _logged:
        return choice
    _logged[key] = None
    while len(_logged) > _LOG_MEMORY:
        _logged.popitem(last=False)
    log.info("fa2lab: attention backend=%s (reason: %s; op: %s)", choice.name, choice.reason, op)
    return choice
