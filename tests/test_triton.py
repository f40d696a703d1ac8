"""The Triton kernels against the float64 oracle. Without CUDA they run under Triton's CPU
interpreter (conftest sets TRITON_INTERPRET=1), so shapes are small but awkward; `pytest -m gpu`
runs the same checks at full size on a GPU (test_triton_gpu.py)."""

import importlib.util

import pytest
import torch
from helpers import assert_within_torch_error, finite_lse, loss_and_grads, make_qkv, max_err, to_paged

import fa2lab
from fa2lab.reference import attention_ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, Hq, Hkv, Nq, Nk, D, causal, window)
CASES = [
    (1, 4, 2, 97, 232, 40, True, (-1, -1)),  # Nq < Nk, GQA, odd head dim
    (2, 2, 2, 130, 70, 64, False, (-1, -1)),  # Nq > Nk, not causal
    (1, 4, 1, 100, 100, 80, True, (16, -1)),  # sliding window, MQA
    (1, 2, 2, 17, 9, 32, True, (-1, -1)),  # rows that see no key
    (1, 2, 1, 1, 150, 128, True, (-1, -1)),  # a single query
    (1, 1, 1, 33, 47, 256, False, (5, 7)),  # the largest head dim, two-sided window
    (1, 2, 2, 40, 40, 96, True, (-1, -1)),  # head dim padded to 128
]


def _triton(q, k, v, **kw):
    return fa2lab.attention(q, k, v, backend="triton", **kw)


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,window", CASES)
def test_fp32_forward_backward_exact(b, hq, hkv, nq, nk, d, causal, window):
    q, k, v = (t.float().to(DEVICE).requires_grad_() for t in make_qkv(b, hq, hkv, nq, nk, d))
    do = torch.randn(b, hq, nq, d, dtype=torch.float64, device=DEVICE)
    dlse = torch.randn(b, hq, nq, dtype=torch.float64, device=DEVICE)
    kw = dict(causal=causal, window_size=window)
    out, lse, grads = loss_and_grads(_triton, q, k, v, do, dlse, **kw)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out_r, lse_r, grads_r = loss_and_grads(attention_ref, *leaves, do, dlse, **kw)
    assert max_err(out, out_r) < 2e-5 and torch.equal(torch.isinf(lse), torch.isinf(lse_r))
    assert max_err(finite_lse(lse), finite_lse(lse_r)) < 2e-5
    assert all(max_err(g, g_r) < 5e-5 for g, g_r in zip(grads, grads_r))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_low_precision_within_torch_rule(dtype, case):
    b, hq, hkv, nq, nk, d, causal, window = case
    q, k, v = (t.to(DEVICE) for t in make_qkv(b, hq, hkv, nq, nk, d, seed=4))
    assert_within_torch_error(_triton, q, k, v, dtype, causal=causal, window_size=window)


def test_varlen_forward_backward():
    lens_q, lens_k = [5, 0, 1, 70, 33], [5, 3, 0, 70, 50]
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    mk = lambda n, h: torch.randn(n, h, 40, generator=g).to(DEVICE).requires_grad_()  # noqa: E731
    q, k, v = mk(sum(lens_q), 4), mk(sum(lens_k), 2), mk(sum(lens_k), 2)
    kw = dict(causal=True, return_lse=True)
    out, lse = fa2lab.varlen_attention(q, k, v, cu(lens_q), cu(lens_k), backend="triton", **kw)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out_r, lse_r = fa2lab.varlen_attention(*ref_leaves, cu(lens_q), cu(lens_k), backend="reference", **kw)
    assert max_err(out, out_r) < 2e-5 and torch.equal(torch.isinf(lse), torch.isinf(lse_r))
    (out.sum() + finite_lse(lse).sum()).backward()
    (out_r.sum() + finite_lse(lse_r).sum()).backward()
    assert all(max_err(a.grad, r.grad) < 5e-5 for a, r in zip((q, k, v), ref_leaves))


@pytest.mark.parametrize("page_size", [None, 1, 16])
@pytest.mark.parametrize("nq,num_splits", [(1, 1), (1, 3), (4, 100)])
def test_decode_kernel_dense_and_paged(page_size, nq, num_splits):
    lengths = [1, 54, 200]
    b, hq, hkv, d, nmax = 3, 8, 2, 64, 208
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, hq, nq, d, generator=g).half().to(DEVICE)
    k = torch.randn(b, hkv, nmax, d, generator=g).half().to(DEVICE)
    v = torch.randn(b, hkv, nmax, d, generator=g).half().to(DEVICE)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    truth = fa2lab.decode_attention(q.double(), k.double(), v.double(), cache_seqlens=seqlens, backend="reference")
    naive = fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, backend="reference")
    if page_size is None:
        out = fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, num_splits=num_splits, backend="triton")
    else:
        kp, vp, pages = to_paged(k, v, seqlens, page_size, seed=1)
        out = fa2lab.decode_attention(q, kp, vp, cache_seqlens=seqlens, block_table=pages, num_splits=num_splits,
                                      backend="triton")
    # fp16 rule: no worse than twice naive fp16 PyTorch (which upcasts inside, like the kernel)
    assert max_err(out, truth) <= 2 * max_err(naive, truth) + 1e-3


@pytest.mark.parametrize("op", ["dense", "varlen", "decode", "ring", "model"])
def test_auto_never_picks_the_interpreter(op):
    # Checked on the CPU whatever the machine: the interpreter would run, slowly, if "auto" took it.
    from fa2lab.backends import Case, choose

    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, dtype=torch.float32)
    assert choose(op, Case.of(q, k, v, True, (4, -1), False)).name == "tiled"


def test_backward_kernels_take_row_slices_without_copies():
    # Ring attention hands the kernels row slices of (B, H, N, D) shards: strided views, not copies.
    from fa2lab.kernels.bwd import flash_bwd_triton
    from fa2lab.kernels.fwd import flash_fwd_triton

    g = torch.Generator().manual_seed(3)
    q, do = (torch.randn(2, 4, 60, 40, generator=g).to(DEVICE) for _ in range(2))
    k, v = (torch.randn(2, 2, 50, 40, generator=g).to(DEVICE) for _ in range(2))
    rows, keys = slice(7, 45), slice(3, 41)
    views = [q[:, :, rows], k[:, :, keys], v[:, :, keys], do[:, :, rows]]
    assert not any(t.is_contiguous() for t in views)
    kw = dict(scale=40 ** -0.5, left=-1, right=0)
    out, lse = flash_fwd_triton(*views[:3], **kw)
    dlse = torch.randn(lse.shape, generator=g).to(DEVICE)
    strided = flash_bwd_triton(views[3], dlse, *views[:3], out, lse, **kw)
    copied = flash_bwd_triton(*(t.contiguous() for t in (views[3], dlse, *views[:3], out, lse)), **kw)
    assert all(torch.equal(a, b) for a, b in zip(strided, copied))
    out_nc = torch.empty(out.shape[:-1] + (2 * out.shape[-1],), device=DEVICE)[..., ::2].copy_(out)  # strided O
    assert all(torch.equal(a, b) for a, b in zip(flash_bwd_triton(views[3], dlse, *views[:3], out_nc, lse, **kw),
                                                     strided))
