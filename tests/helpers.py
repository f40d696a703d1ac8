"""Shared test helpers: random inputs and the low-precision error rule (CONVENTIONS.md, 9)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fa2lab.measure.exactness import GRAD_FACTOR, FWD_FACTOR, exact_floor, max_err, within_torch_error
from fa2lab.reference import attention_ref

__all__ = ["LargestTensor", "assert_within_torch_error", "finite_lse", "fresh_routes", "loss_and_grads", "make_qkv",
           "max_err", "to_paged"]


def make_qkv(b, hq, hkv, nq, nk, d, dv=None, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, nk, dv or d, generator=g, dtype=torch.float64).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def finite_lse(lse):
    return lse.masked_fill(torch.isinf(lse), 0.0)


def loss_and_grads(fn, q, k, v, do, dlse, **kw):
    """Forward with lse, a loss that uses both outputs, and the gradients in q, k, v."""
    out, lse = fn(q, k, v, return_lse=True, **kw)
    loss = (out.double() * do).sum() + (finite_lse(lse.double()) * dlse).sum()
    return out, lse, torch.autograd.grad(loss, (q, k, v), allow_unused=True)


def assert_within_torch_error(fn, q64, k64, v64, dtype, fwd_factor=FWD_FACTOR, grad_factor=GRAD_FACTOR, **kw):
    """fa2lab's error against float64 truth must be at most `factor` times that of plain PyTorch
    computing naively in `dtype` (attention_ref(upcast=False)), for outputs and gradients: the
    rule of fa2lab.measure.exactness."""
    g = torch.Generator().manual_seed(1)
    do = torch.randn(*q64.shape[:-1], v64.shape[-1], generator=g, dtype=torch.float64).to(q64.device)
    dlse = torch.zeros(q64.shape[:-1], dtype=torch.float64, device=q64.device)
    def leaves(dt):
        return [t.detach().to(dt).requires_grad_() for t in (q64, k64, v64)]

    truth_out, _, truth_g = loss_and_grads(attention_ref, *leaves(torch.float64), do, dlse, **kw)
    ours_out, _, ours_g = loss_and_grads(fn, *leaves(dtype), do, dlse, **kw)
    naive = lambda *a, **k_: attention_ref(*a, upcast=False, **k_)  # noqa: E731
    torch_out, _, torch_g = loss_and_grads(naive, *leaves(dtype), do, dlse, **kw)
    floor = exact_floor(dtype)  # when PyTorch happens to be exact (e.g. a single key)
    e_ours, e_torch = max_err(ours_out, truth_out), max_err(torch_out, truth_out)
    assert within_torch_error(e_ours, e_torch, fwd_factor, floor), f"forward error {e_ours:.3g} vs torch's {e_torch:.3g}"
    for name, a, t, r in zip("qkv", ours_g, torch_g, truth_g):
        e_ours, e_torch = max_err(a, r), max_err(t, r)
        assert within_torch_error(e_ours, e_torch, grad_factor, floor), f"d{name} error {e_ours:.3g} vs torch's {e_torch:.3g}"


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (`largest`, in elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def to_paged(k, v, seqlens, page_size, seed=0):
    """Scatter a dense cache (B, Hkv, Nmax, D) into a shuffled page pool whose unused slots hold NaN;
    returns pool K, V (num_pages, Hkv, page_size, D) and the int32 block table (B, pages per seq)."""
    b, hkv, nmax, d = k.shape
    pages_per_seq = -(-nmax // page_size)
    num_pages = b * pages_per_seq + 3
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))
    table = perm[: b * pages_per_seq].view(b, pages_per_seq).to(torch.int32).to(k.device)
    kp = torch.full((num_pages, hkv, page_size, d), float("nan"), dtype=k.dtype, device=k.device)
    vp = torch.full((num_pages, hkv, page_size, v.shape[-1]), float("nan"), dtype=v.dtype, device=v.device)
    for bi in range(b):
        n = int(seqlens[bi])
        for pos in range(0, n, page_size):
            phys, m = int(table[bi, pos // page_size]), min(page_size, n - pos)
            kp[phys, :, :m] = k[bi, :, pos:pos + m]
            vp[phys, :, :m] = v[bi, :, pos:pos + m]
    return kp, vp, table


def raised(fn):
    """What calling fn raised, as a picklable dict (a gloo worker sends it to the parent, which asserts
    on the type and message): {"raised": None} when it returned."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the parent asserts on type and message
        return {"raised": type(e).__name__, "message": str(e)}
    return {"raised": None}


@pytest.fixture(autouse=True)
def fresh_routes():
    """Autouse in the modules that import it: decided calls are kept per shape
    (fa2lab.models.functional); a test that patches the dispatch must not leave its decisions to
    the next test, nor find an earlier test's."""
    from fa2lab.models import functional

    functional.clear_routes()
    yield
    functional.clear_routes()
