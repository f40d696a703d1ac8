"""fa2lab.compat.flash_attn at full size on a GPU (`pytest -m gpu`); skipped without CUDA.
Same checks as test_compat_flash_attn.py: float64 oracle, 2x rule (3x for gradients)."""

import pytest
import torch
from compat_ref import ref_attention
from test_compat_flash_attn import cache_reference, cu, make_cache_case, rand, within_rule, written_cache

from fa2lab.compat.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,b,nq,nk,h,hkv,d,causal,window", [
    (torch.bfloat16, 2, 2048, 2048, 16, 4, 128, True, (-1, -1)),
    (torch.float16, 2, 1025, 3000, 8, 8, 64, True, (-1, -1)),
    (torch.bfloat16, 1, 3000, 1000, 8, 2, 80, True, (256, -1)),
])
def test_flash_attn_func_full_size(dtype, b, nq, nk, h, hkv, d, causal, window):
    q64, k64, v64 = (rand(*s, seed=i).cuda() for i, s in enumerate([(b, nq, h, d), (b, nk, hkv, d), (b, nk, hkv, d)]))
    do = rand(b, nq, h, d, seed=9).cuda()

    def run(fn, dt):
        leaves = [t.to(dt).requires_grad_() for t in (q64, k64, v64)]
        out = fn(*leaves)
        return out, torch.autograd.grad((out.double() * do).sum(), leaves)

    kw = dict(causal=causal, window=window)
    ours, g_ours = run(lambda *a: flash_attn_func(*a, causal=causal, window_size=window), dtype)
    assert ours.is_contiguous() and ours.shape == (b, nq, h, d)
    truth, g_truth = run(lambda *a: ref_attention(*a, **kw)[0], torch.float64)
    naive, g_naive = run(lambda *a: ref_attention(*a, upcast=False, **kw)[0], dtype)
    within_rule(ours, truth, naive, dtype)
    for a, t, n in zip(g_ours, g_truth, g_naive):
        within_rule(a, t, n, dtype, factor=3.0)


def test_varlen_full_size():
    lens = [1, 1000, 0, 2047, 513]
    dtype = torch.bfloat16
    q64, k64, v64 = (rand(sum(lens), h, 128, seed=i).cuda() for i, h in enumerate((16, 4, 4)))
    out = flash_attn_varlen_func(q64.to(dtype), k64.to(dtype), v64.to(dtype), cu(lens).cuda(), cu(lens).cuda(),
                                 max(lens), max(lens), causal=True)
    for a, e in zip(cu(lens), cu(lens)[1:]):
        seq = [t[a:e][None] for t in (q64, k64, v64)]
        truth, _ = ref_attention(*seq, causal=True)
        naive, _ = ref_attention(*(t.to(dtype) for t in seq), causal=True, upcast=False)
        within_rule(out[a:e], truth[0], naive[0], dtype)


@pytest.mark.parametrize("page_size,batch_idx,leftpad,nq,n_new", [
    (None, False, False, 1, 1), (None, True, True, 4, 4), (16, False, False, 1, 1), (256, False, False, 4, 2),
    (1, False, True, 2, 2),
])
def test_kvcache_full_size(page_size, batch_idx, leftpad, nq, n_new):
    dtype = torch.bfloat16
    case, exp_k, exp_v = make_cache_case(b=4, nq=nq, n_new=n_new, h=32, hkv=8, d=128, nmax=4096, page_size=page_size,
                                         batch_idx=batch_idx, leftpad=leftpad, rotary_dim=64, dtype=dtype, seed=5)
    on_gpu = {k: v.cuda() for k, v in case.items()}
    out = flash_attn_with_kvcache(**on_gpu, causal=True, rotary_interleaved=False).cpu()
    written = dict(case, k_cache=on_gpu["k_cache"].cpu(), v_cache=on_gpu["v_cache"].cpu())
    truth, _ = cache_reference(case, exp_k.double(), exp_v.double(), causal=True, window=(-1, -1), interleaved=False)
    naive, _ = cache_reference(case, exp_k, exp_v, causal=True, window=(-1, -1), interleaved=False, upcast=False)
    got_k, got_v = written_cache(written, exp_k.shape)
    torch.testing.assert_close(got_k, exp_k)
    assert torch.equal(got_v, exp_v)
    within_rule(out, truth, naive, dtype)
