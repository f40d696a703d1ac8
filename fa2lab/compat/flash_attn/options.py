"""flash-attn's arguments turned into fa2lab's: backend choice, option support, windows, lse.

fa2lab's variants (softcap, ALiBi, dropout) are passed on under the keyword flash-attn uses when
the fa2lab function takes it; otherwise the call raises NotImplementedError naming the option,
before anything (a KV-cache write) has happened.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect

import torch

_backend = contextvars.ContextVar("fa2lab_compat_backend", default="auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Run the compat calls inside the block with fa2lab backend `name` instead of "auto"
    (fa2lab.attention / varlen_attention / decode_attention decide what each name can run)."""
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    return _backend.get()


@functools.cache
def accepts(fn, keyword: str) -> bool:
    """Whether fa2lab function `fn` takes `keyword` (inspected once per function and name)."""
    return keyword in inspect.signature(fn).parameters


def variant_kwargs(fn, *, softcap=0.0, alibi_slopes=None, dropout_p=0.0) -> dict:
    """The variant options that are switched on, as `fn`'s keywords; NotImplementedError for
    any that this fa2lab's `fn` does not take."""
    wanted = {}
    if softcap is not None and softcap > 0:  # flash-attn: <= 0 switches soft-capping off
        wanted["softcap"] = float(softcap)
    if alibi_slopes is not None:
        wanted["alibi_slopes"] = alibi_slopes
    if dropout_p is not None and dropout_p > 0:
        wanted["dropout_p"] = float(dropout_p)
    for name, value in wanted.items():
        if not accepts(fn, name):
            raise NotImplementedError(
                f"flash_attn option {name}={value if not isinstance(value, torch.Tensor) else 'tensor'} is not "
                f"supported: this fa2lab's {fn.__module__}.{fn.__name__} has no {name!r} option; leave it at "
                f"flash-attn's default or update fa2lab")
    return wanted


def window(window_size) -> tuple[int, int]:
    """flash-attn takes any pair (tuple, list, 2-element tensor); any negative side is unbounded."""
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"expected window_size to be a pair of ints (left, right), -1 for unbounded, got "
                         f"{window_size!r}") from None
    return max(left, -1), max(right, -1)


def flash_lse(lse: torch.Tensor) -> torch.Tensor:
    """fa2lab marks rows that see no key with lse = -inf (log 0); flash-attn's kernels write +inf
    there, so that exp(s - lse) = 0 in its backward. Return flash-attn's convention."""
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def attn_probs_placeholder(q: torch.Tensor, dropout_p: float):
    """The third value of `return_attn_probs=True`. flash-attn returns its test-only S_dmask
    only with dropout_p > 0, and an empty tensor of shape (0,) otherwise. fa2lab returns the
    same empty tensor without dropout and None with it (it does not encode its dropout pattern
    into a probability matrix)."""
    if dropout_p is not None and dropout_p > 0:
        return None
    return torch.empty(0, dtype=q.dtype, device=q.device)


def num_splits(value) -> int | None:
    """flash-attn's num_splits (0 = automatic, 1 = no split, n > 1) -> fa2lab's (None = automatic)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected num_splits to be an int >= 0 (0 = automatic), got {value!r}")
    return None if value == 0 else value
