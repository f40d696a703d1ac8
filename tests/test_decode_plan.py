"""decode_plan, in-place append and many query rows against a cache, on the readable split-K and on
the Triton kernel (under the interpreter on a CPU), each against the float64 oracle."""

import importlib.util

import pytest
import torch
from helpers import max_err

import fa2lab

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["tiled", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]


def _randn(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def _to_pages(k, lengths, page_size, g, spare=2):
    """Dense (B, Hkv, Nmax, D) -> NaN-filled pages in random order + block table (B, pages per seq)."""
    b, hkv, nmax, d = k.shape
    per_seq = -(-nmax // page_size)
    n_pages = b * per_seq + spare
    table = torch.randperm(n_pages, generator=g)[: b * per_seq].view(b, per_seq).to(torch.int32)
    pages = torch.full((n_pages, hkv, page_size, d), float("nan"), dtype=k.dtype)
    for bi in range(b):
        for pos in range(lengths[bi]):
            pages[table[bi, pos // page_size], :, pos % page_size] = k[bi, :, pos].cpu()
    return pages.to(DEVICE), table.to(DEVICE)


def _truth(q, k, v, lengths, **kw):
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return fa2lab.decode_attention(q.double(), k.double(), v.double(), cache_seqlens=seqlens, backend="reference",
                                   return_lse=True, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 16])
def test_plan_equals_no_plan_and_stays_valid_while_lengths_grow(backend, page_size):
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, nmax, d = 3, 8, 2, 200, 40
    q = _randn(b, hq, 1, d, g=g)
    k, v = _randn(b, hkv, nmax, d, g=g), _randn(b, hkv, nmax, d, g=g)
    kc, vc, table = k, v, None
    if page_size:
        kc, vc, table = _paired_pages(k, v, [nmax] * b, page_size, seed=1)
    seqlens = torch.tensor([1, 97, 150], dtype=torch.int32, device=DEVICE)
    plan = fa2lab.decode_plan(q, kc, vc, cache_seqlens=seqlens, block_table=table, backend=backend)
    for step in range(3):  # one plan, lengths growing
        lens = (seqlens + 20 * step).clamp(max=nmax)
        planned, lse_p = fa2lab.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, plan=plan,
                                                 return_lse=True)
        plain, lse = fa2lab.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, backend=backend,
                                             return_lse=True)
        assert torch.equal(planned, plain) and torch.equal(lse_p, lse)
        truth, lse_t = _truth(q, k, v, lens.tolist())
        assert max_err(planned, truth) < 2e-5 and max_err(lse_p, lse_t) < 2e-5


def _paired_pages(k, v, lengths, page_size, seed):
    kp, table = _to_pages(k, lengths, page_size, torch.Generator().manual_seed(seed))
    vp, table_v = _to_pages(v, lengths, page_size, torch.Generator().manual_seed(seed))
    assert torch.equal(table, table_v)
    return kp, vp, table


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 1, 16, 64])
@pytest.mark.parametrize("planned", [False, True])
def test_in_place_append(backend, page_size, planned):
    g = torch.Generator().manual_seed(1)
    b, hq, hkv, nmax, d, n_new = 3, 4, 2, 128, 40, 3
    old = [0, 57, 97]
    q = _randn(b, hq, n_new, d, g=g)
    k, v = _randn(b, hkv, nmax, d, g=g), _randn(b, hkv, nmax, d, g=g)
    k_new, v_new = _randn(b, hkv, n_new, d, g=g), _randn(b, hkv, n_new, d, g=g)
    full_k, full_v = k.clone(), v.clone()  # what the cache should hold after the append
    for bi, n in enumerate(old):
        full_k[bi, :, n:n + n_new], full_v[bi, :, n:n + n_new] = k_new[bi], v_new[bi]
    if page_size is None:
        kc, vc, table = k.clone(), v.clone(), None
    else:
        kc, vc, table = _paired_pages(k, v, [nmax] * b, page_size, seed=2)
    seqlens = torch.tensor(old, dtype=torch.int32, device=DEVICE)
    kw = dict(cache_seqlens=seqlens, block_table=table)
    plan = fa2lab.decode_plan(q, kc, vc, k_new, v_new, backend=backend, **kw) if planned else None
    out, lse = fa2lab.decode_attention(q, kc, vc, k_new, v_new, return_lse=True, plan=plan, backend=backend, **kw)
    assert seqlens.tolist() == old  # the caller advances the lengths
    lengths = [n + n_new for n in old]
    truth, lse_t = _truth(q, full_k, full_v, lengths)
    assert max_err(out, truth) < 2e-5 and max_err(lse, lse_t) < 2e-5
    for bi, n in enumerate(lengths):  # the cache now holds the new tokens, and only there
        for pos in range(n):
            if page_size is None:
                got = kc[bi, :, pos], vc[bi, :, pos]
            else:
                page = table[bi, pos // page_size]
                got = kc[page, :, pos % page_size], vc[page, :, pos % page_size]
            assert torch.equal(got[0], full_k[bi, :, pos]) and torch.equal(got[1], full_v[bi, :, pos])
    if page_size is None:
        assert torch.equal(kc[0, :, n_new:], k[0, :, n_new:])  # nothing past the new tokens


def test_append_past_capacity_raises_and_writes_nothing():
    g = torch.Generator().manual_seed(3)
    q, k, v = _randn(2, 2, 2, 16, g=g), _randn(2, 2, 10, 16, g=g), _randn(2, 2, 10, 16, g=g)
    k_new = _randn(2, 2, 2, 16, g=g)
    before = k.clone()
    with pytest.raises(ValueError, match="cache capacity 10"):
        fa2lab.decode_attention(q, k, v, k_new, k_new, cache_seqlens=torch.tensor([3, 9], dtype=torch.int32,
                                                                                  device=DEVICE))
    assert torch.equal(k, before)
    with pytest.raises(ValueError, match="cache_seqlens"):
        fa2lab.decode_attention(q, k, v, k_new, k_new)


@pytest.mark.parametrize("backend", BACKENDS)
def test_planned_call_is_memory_safe_for_any_lengths_and_pages(backend):
    """A plan checks nothing on the device: lengths outside [0, capacity] are clamped and pages
    outside the pool read a valid page, whatever the caller passes."""
    g = torch.Generator().manual_seed(4)
    b, hq, hkv, nmax, d, page = 3, 4, 2, 64, 32, 16
    q = _randn(b, hq, 1, d, g=g)
    k, v = _randn(b, hkv, nmax, d, g=g), _randn(b, hkv, nmax, d, g=g)
    good = torch.tensor([5, 64, 30], dtype=torch.int32, device=DEVICE)
    plan = fa2lab.decode_plan(q, k, v, cache_seqlens=good, backend=backend)
    wild = torch.tensor([-7, 1000, 30], dtype=torch.int32, device=DEVICE)
    out = fa2lab.decode_attention(q, k, v, cache_seqlens=wild, plan=plan)
    truth, _ = _truth(q, k, v, [0, nmax, 30])
    assert max_err(out, truth) < 2e-5
    kp, vp, table = _paired_pages(k, v, [nmax] * b, page, seed=5)
    plan = fa2lab.decode_plan(q, kp, vp, cache_seqlens=good, block_table=table, backend=backend)
    bad_table = table.clone()
    bad_table[0, 0] = 10_000
    bad_table[1, 1] = -3
    out = fa2lab.decode_attention(q, kp, vp, cache_seqlens=wild, block_table=bad_table, plan=plan)
    assert out.shape == (b, hq, 1, d) and max_err(out[2], truth[2]) < 2e-5
    with pytest.raises(ValueError, match="points outside the pool"):
        fa2lab.decode_attention(q, kp, vp, cache_seqlens=good, block_table=bad_table, backend=backend)


def test_plan_mismatch_is_named():
    g = torch.Generator().manual_seed(5)
    q, k, v = _randn(1, 4, 1, 16, g=g), _randn(1, 2, 32, 16, g=g), _randn(1, 2, 32, 16, g=g)
    plan = fa2lab.decode_plan(q, k, v)
    with pytest.raises(ValueError, match="made for q of shape"):
        fa2lab.decode_attention(q[:, :2], k[:, :1], v[:, :1], plan=plan)
    with pytest.raises(ValueError, match="window_size"):
        fa2lab.decode_attention(q, k, v, window_size=(4, 0), plan=plan)
    with pytest.raises(ValueError, match="expected plan"):
        fa2lab.decode_attention(q, k, v, plan="plan")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size,window", [(None, (-1, -1)), (1, (-1, -1)), (16, (40, -1)), (64, (-1, -1))])
def test_many_query_rows_against_a_paged_cache_gqa(backend, page_size, window):
    """Chunked prefill: Nq = 97 new tokens per sequence, GQA 8:1 (776 packed rows, several row tiles
    in the kernel), causal bottom-right, ragged lengths."""
    g = torch.Generator().manual_seed(6)
    b, hq, hkv, nq, nmax, d = 2, 8, 1, 97, 232, 40
    lengths = [97, 232]
    q = _randn(b, hq, nq, d, g=g)
    k, v = _randn(b, hkv, nmax, d, g=g), _randn(b, hkv, nmax, d, g=g)
    if page_size is None:
        kc, vc, table = k, v, None
    else:
        kc, vc, table = _paired_pages(k, v, lengths, page_size, seed=7)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    plan = fa2lab.decode_plan(q, kc, vc, cache_seqlens=seqlens, block_table=table, window_size=window, backend=backend)
    out, lse = fa2lab.decode_attention(q, kc, vc, cache_seqlens=seqlens, block_table=table, plan=plan,
                                       return_lse=True)
    truth, lse_t = _truth(q, k, v, lengths, window_size=window)
    assert max_err(out, truth) < 2e-5
    finite = torch.isfinite(lse_t)
    assert torch.equal(torch.isfinite(lse), finite) and max_err(lse[finite], lse_t[finite]) < 2e-5


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_low_precision_many_rows_within_torch_rule(dtype):
    g = torch.Generator().manual_seed(8)
    b, hq, hkv, nq, nmax, d = 1, 8, 1, 33, 150, 80
    q64, k64, v64 = _randn(b, hq, nq, d, g=g), _randn(b, hkv, nmax, d, g=g), _randn(b, hkv, nmax, d, g=g)
    seqlens = torch.tensor([150], dtype=torch.int32, device=DEVICE)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    out = fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, num_splits=3, backend="triton")
    truth = fa2lab.decode_attention(q.double(), k.double(), v.double(), cache_seqlens=seqlens, backend="reference")
    naive = fa2lab.decode_attention(q, k, v, cache_seqlens=seqlens, backend="reference")
    assert max_err(out, truth) <= 2 * max_err(naive, truth) + torch.finfo(dtype).eps


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_entry_points_trace_fullgraph_as_custom_ops():
    """torch.compile(fullgraph=True) over attention (forward and backward) and a planned decode with
    append: the Triton calls become fa2lab:: operators, checked by torch.library.opcheck."""
    from fa2lab.kernels import ops

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(9)
    q, k, v = (_randn(1, h, 24, 16, g=g).requires_grad_() for h in (4, 2, 2))
    attn = torch.compile(lambda q, k, v: fa2lab.attention(q, k, v, causal=True, backend="triton"), fullgraph=True,
                         backend="aot_eager")
    out = attn(q, k, v)
    ref = fa2lab.attention(q.double(), k.double(), v.double(), causal=True, backend="reference")
    assert max_err(out, ref) < 2e-5
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    grads_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    assert all(max_err(a, b) < 5e-5 for a, b in zip(grads, grads_ref))

    qd, kc, vc = _randn(1, 4, 1, 16, g=g), _randn(1, 2, 80, 16, g=g), _randn(1, 2, 80, 16, g=g)
    kn, vn = _randn(1, 2, 1, 16, g=g), _randn(1, 2, 1, 16, g=g)
    seqlens = torch.tensor([50], dtype=torch.int32, device=DEVICE)
    plan = fa2lab.decode_plan(qd, kc, vc, kn, vn, cache_seqlens=seqlens, num_splits=3, backend="triton")
    step = torch.compile(lambda q, s: fa2lab.decode_attention(q, kc, vc, kn, vn, cache_seqlens=s, plan=plan),
                         fullgraph=True, backend="aot_eager")
    got = step(qd, seqlens)
    full_k, full_v = kc.clone(), vc.clone()
    assert torch.equal(kc[0, :, 50], kn[0, :, 0])
    truth, _ = _truth(qd, full_k, full_v, [51])
    assert max_err(got, truth) < 2e-5
    o_part, l_part, locks = plan.workspace
    torch.library.opcheck(ops.decode_op, (qd, kc, vc, seqlens, None, o_part, l_part, locks, 0.25, -1, 0, 3, 0,
                                          16, 64, 4, 3), test_utils=("test_schema", "test_faketensor"))
    assert int(locks.sum()) == 0  # the last program of each tile resets its counter


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_no_query_rows(backend):
    g = torch.Generator().manual_seed(10)
    for b, nq in ((0, 1), (2, 0)):
        q, k, v = _randn(b, 4, nq, 16, g=g), _randn(b, 2, 32, 16, g=g), _randn(b, 2, 32, 16, g=g)
        k_new, v_new = _randn(b, 2, 1, 16, g=g), _randn(b, 2, 1, 16, g=g)
        seqlens = torch.full((b,), 10, dtype=torch.int32, device=DEVICE)
        plan = fa2lab.decode_plan(q, k, v, k_new, v_new, cache_seqlens=seqlens, backend=backend)
        out, lse = fa2lab.decode_attention(q, k, v, k_new, v_new, cache_seqlens=seqlens, plan=plan, return_lse=True)
        assert out.shape == (b, 4, nq, 16) and lse.shape == (b, 4, nq) and bool(torch.isinf(lse).all())
        if b:  # no query row, but the new tokens are still written
            assert torch.equal(k[:, :, 10], k_new[:, :, 0]) and torch.equal(v[:, :, 10], v_new[:, :, 0])
