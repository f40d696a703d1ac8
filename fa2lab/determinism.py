"""A request for a bit-reproducible backward, per call: `deterministic_backward()`.

fa2lab's backward passes add no partial sums in a run-dependent order except one: on Hopper, the
one-pass Gluon backwards (plain calls, at the head dims whose hopper_config.BWD row holds one) add each
key block's dQ by TMA reduce-adds.
`torch.use_deterministic_algorithms(True)` keeps every backward on the two passes globally; inside
`with deterministic_backward():`, the eager Triton attention calls made there record the same
request for their own backward (it runs later, outside the block); a torch.compile graph follows
the global switch only. flash-attn's `deterministic=True` (fa2lab.compat) uses it.
"""

from __future__ import annotations

import contextlib
import threading

_state = threading.local()


@contextlib.contextmanager
def deterministic_backward(enabled: bool = True):
    """Attention calls inside the block get a bit-reproducible backward (nested blocks keep an outer request)."""
    before = getattr(_state, "requested", False)
    _state.requested = before or bool(enabled)
    try:
        yield
    finally:
        _state.requested = before


def deterministic_requested() -> bool:
    return getattr(_state, "requested", False)


__all__ = ["deterministic_backward", "deterministic_requested"]
