"""Property test: over random shapes, masks and tile sizes, tiled FA2 equals the naive oracle."""

import torch
from helpers import finite_lse, make_qkv, max_err
from hypothesis import given, settings
from hypothesis import strategies as st

from fa2lab import tiled_attention
from fa2lab.reference import attention_ref

bound = st.one_of(st.just(-1), st.integers(0, 40))


@settings(max_examples=40, deadline=None)
@given(nq=st.integers(0, 70), nk=st.integers(0, 70), d=st.sampled_from([8, 24, 40]),
       groups=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), causal=st.booleans(),
       left=bound, right=bound, bq=st.integers(1, 40), bk=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_tiled_equals_reference(nq, nk, d, groups, causal, left, right, bq, bk, seed):
    hq, hkv = groups
    q, k, v = make_qkv(2, hq, hkv, nq, nk, d, seed=seed, requires_grad=True)
    kw = dict(causal=causal, window_size=(left, right), return_lse=True)
    out, lse = tiled_attention(q, k, v, block_q=bq, block_k=bk, **kw)
    out_r, lse_r = attention_ref(q, k, v, **kw)
    assert max_err(out, out_r) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_r))
    assert max_err(finite_lse(lse), finite_lse(lse_r)) < 1e-12
    g = torch.autograd.grad(out.sum() + finite_lse(lse).sum(), (q, k, v))
    g_r = torch.autograd.grad(out_r.sum() + finite_lse(lse_r).sum(), (q, k, v))
    assert all(max_err(a, b) < 1e-11 for a, b in zip(g, g_r))
