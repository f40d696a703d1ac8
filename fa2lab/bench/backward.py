"""Notebook 10's measurements: FA2's Algorithm 2 - what the forward saves for the backward, the
order in which fa2lab.tiled.backward visits tiles, and the memory of storing P against recomputing it.

    attention_fn(impl, causal, block)     tiled (FA2) or naive attention as a function of (q, k, v)
    saved_for_backward(fn, q, k, v)       every tensor autograd keeps for the backward (measured)
    saved_memory(ns, ...)                 those bytes against N, tiled (Q K V O LSE) vs naive (P too)
    backward_schedule(nq, nk, Br, Bc)     the tiles the backward computes, in its order
    accumulation_counts(steps)            per gradient tile: updates and their span

fa2lab.viz.backward draws these rows.
"""

from __future__ import annotations

import torch

from fa2lab import masks
from fa2lab.masks import TileState


def attention_fn(impl: str, causal: bool, block: int):
    """(q, k, v) -> output of `impl`: "tiled" (fa2lab's FA2, with lse) or "naive" (the reference
    computing in the input dtype, differentiated by autograd)."""
    from fa2lab.reference import attention_ref
    from fa2lab.tiled import tiled_attention

    if impl == "tiled":
        return lambda q, k, v: tiled_attention(q, k, v, causal=causal, block_q=block, block_k=block, return_lse=True)
    if impl == "naive":
        return lambda q, k, v: attention_ref(q, k, v, causal=causal, upcast=False)
    raise ValueError(f"expected impl 'tiled' or 'naive', got {impl!r}")


def saved_for_backward(fn, q, k, v) -> list[dict]:
    """Run out = fn(q, k, v) on fresh leaves and list every distinct tensor autograd saved for the
    backward: name (Q, K, V, O, LSE when it is one of those, P / S for an (Nq, Nk) one), shape,
    dtype and MiB. Measured through torch.autograd.graph.saved_tensors_hooks, not assumed."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        result = fn(*leaves)
    out, lse = result if isinstance(result, tuple) else (result, None)
    names = {"Q": leaves[0], "K": leaves[1], "V": leaves[2], "O": out}
    if lse is not None:
        names["LSE"] = lse
    nq, nk = q.shape[-2], k.shape[-2]
    rows, seen = [], set()
    for t in saved:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        name = next((n for n, ref in names.items() if ref is not None and t.data_ptr() == ref.data_ptr()
                     and t.shape == ref.shape), None)
        if name is None:
            nxn = tuple(t.shape[-2:]) == (nq, nk)
            name = ("mask (Nq x Nk)" if t.dtype == torch.bool else "P or S (Nq x Nk)") if nxn else "other"
        rows.append(dict(name=name, shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."),
                         mib=t.numel() * t.element_size() / 2**20))
    return rows


def saved_memory(ns, impls=("tiled", "naive"), *, heads: int = 2, head_dim: int = 32, causal: bool = True,
                 block: int = 64, seed: int = 0) -> list[dict]:
    """MiB autograd saves for the backward at each N (fp32, B=1): measured with saved_for_backward,
    with the part held by (Nq, Nk) tensors apart (`nxn_mib`)."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    for n in ns:
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3))  # (B, H, N, D)
        for impl in impls:
            saved = saved_for_backward(attention_fn(impl, causal, block), q, k, v)
            rows.append(dict(impl=impl, N=n, saved_mib=sum(r["mib"] for r in saved),
                             nxn_mib=sum(r["mib"] for r in saved if "(Nq x Nk)" in r["name"]),
                             tensors=", ".join(sorted({r["name"] for r in saved}))))
    return rows


def backward_schedule(nq: int, nk: int, block_q: int, block_k: int, *, causal: bool = False,
                      window_size=(-1, -1)) -> list[dict]:
    """The tiles fa2lab.tiled.backward.flash_backward computes, in its order: key tiles j outer
    (dK_j, dV_j accumulate on chip and are written once), query tiles i inner (dQ_i += dS K_j on
    every visit, so dQ_i is complete only after the last key tile). Skipped tiles are left out."""
    left, right = masks.effective_window(causal, window_size)
    steps = []
    for j0 in range(0, nk, block_k):
        j1 = min(j0 + block_k, nk)
        lo, hi = masks.query_range(j0, j1, nq, nk, left, right)
        for i0 in range(lo - lo % block_q, hi, block_q):
            i1 = min(i0 + block_q, nq)
            state = masks.tile_state(i0, i1, j0, j1, nq, nk, left, right)
            if state is TileState.SKIPPED:
                continue
            steps.append(dict(step=len(steps), i=i0 // block_q, j=j0 // block_k, q_range=(i0, i1), k_range=(j0, j1),
                              state=state.name.lower()))
    return steps


def accumulation_counts(steps: list[dict]) -> dict:
    """Per gradient tile: how many steps add to it, and over how many steps its updates spread."""
    out = {}
    for name, key in (("dq", "i"), ("dkv", "j")):
        by = {}
        for s in steps:
            by.setdefault(s[key], []).append(s["step"])
        out[name] = {t: dict(updates=len(v), span=v[-1] - v[0] + 1) for t, v in by.items()}
    return out
