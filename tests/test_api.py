"""fa2lab.attention / varlen_attention: backends, dispatch, validation, edge cases."""

import collections
import logging

import pytest
import torch
from helpers import finite_lse, loss_and_grads, make_qkv, max_err

import fa2lab
from fa2lab import attention, backends, varlen_attention
from fa2lab.reference import attention_ref


@pytest.mark.parametrize("backend", ["auto", "tiled", "reference", "sdpa"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1), (32, 8)])
def test_every_backend_matches_reference(backend, hq, hkv):
    q, k, v = make_qkv(2, hq, hkv, 97, 97, 40, requires_grad=True)
    do = torch.randn(2, hq, 97, 40, dtype=torch.float64)
    for causal in (False, True):
        out = attention(q, k, v, causal=causal, backend=backend)
        ref = attention_ref(q, k, v, causal=causal)
        assert max_err(out, ref) < 1e-12
        g = torch.autograd.grad((out * do).sum(), (q, k, v))
        g_ref = torch.autograd.grad((ref * do).sum(), (q, k, v))
        assert all(max_err(a, b) < 1e-11 for a, b in zip(g, g_ref))


@pytest.fixture
def fresh_log(monkeypatch):
    """A process that has logged nothing and decided nothing yet (decisions are remembered: a remembered
    one is not logged again)."""
    monkeypatch.setattr(backends, "_logged", collections.OrderedDict())
    monkeypatch.setattr(backends, "_CHOICES", {})


def test_auto_logs_its_choice_once_per_decision(caplog, fresh_log):
    q, k, v = make_qkv(1, 2, 2, 31, 29, 16)
    with caplog.at_level(logging.INFO, logger="fa2lab"):
        attention(q, k, v, causal=True)  # Nq != Nk: SDPA's causal would be top-left
        attention(q, k, v, causal=True)
        attention(q, k, v, causal=True, return_lse=True)  # same backend, another reason
        for n in range(40, 48):  # a generation loop: lengths change, the decision does not
            attention(*make_qkv(1, 2, 2, 1, n, 16), causal=True)
    lines = [r.getMessage() for r in caplog.records if "attention backend=" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("fa2lab: attention backend=tiled (reason:") and "top-left" in lines[0]


def test_the_log_once_memory_is_bounded(fresh_log):
    words = [f"reason {chr(97 + a)}{chr(97 + b)}" for a in range(26) for b in range(26)]  # distinct kinds
    for w in words:
        backends._logged_choice("dense", backends.Choice("tiled", w))
    assert len(backends._logged) == backends._LOG_MEMORY


def test_auto_uses_sdpa_where_it_applies(caplog, fresh_log):
    q, k, v = make_qkv(1, 2, 2, 37, 37, 16)
    with caplog.at_level(logging.INFO, logger="fa2lab"):
        attention(q, k, v, causal=True)
    assert any("backend=sdpa" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kw,match", [
    (dict(return_lse=True), "log-sum-exp"),
    (dict(window_size=(4, 4)), "sliding window"),
    (dict(causal=True), "top-left"),
])
def test_explicit_backend_that_cannot_run_raises(kw, match):
    q, k, v = make_qkv(1, 2, 2, 5, 9, 16)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, backend="sdpa", **kw)


def test_unknown_backend_lists_choices():
    q, k, v = make_qkv(1, 1, 1, 4, 4, 8)
    with pytest.raises(ValueError, match=r"unknown backend 'flash'.*'tiled'"):
        attention(q, k, v, backend="flash")


@pytest.mark.parametrize("mutate,match", [
    (lambda q, k, v: (q[0], k, v), r"q to have 4 dims"),
    (lambda q, k, v: (q, k[:1], v[:1]), r"batch size, got 2, 1, 1"),
    (lambda q, k, v: (q, k[..., :8], v), r"share head_dim, got 16 and 8"),
    (lambda q, k, v: (q[:, :3], k, v), r"Hq=3 .* Hkv=2"),
    (lambda q, k, v: (q, k, v[:, :1]), r"same number of heads, got 2 and 1"),
    (lambda q, k, v: (q, k, v[:, :, :3]), r"same length Nk, got 6 and 3"),
    (lambda q, k, v: (q.int(), k, v), r"float16, bfloat16, float32 or float64, got torch.int32"),
    (lambda q, k, v: (q, k.half(), v), r"share a dtype"),
    (lambda q, k, v: (q, k.to("meta"), v), r"one device"),
])
def test_bad_input_gets_a_clear_error(mutate, match):
    q, k, v = make_qkv(2, 4, 2, 5, 6, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        attention(*mutate(q, k, v))


@pytest.mark.parametrize("window,match", [((-2, 0), "left >= -1"), ((0, -5), "right >= -1"),
                                           ((1,), "pair"), ((1.5, 2), "int")])
def test_bad_window_sizes(window, match):
    q, k, v = make_qkv(1, 1, 1, 4, 4, 8)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, window_size=window)


@pytest.mark.parametrize("backend", ["auto", "tiled", "reference"])
@pytest.mark.parametrize("nq,nk", [(0, 5), (5, 0), (0, 0)])
def test_zero_length_sequences(backend, nq, nk):
    q, k, v = make_qkv(1, 2, 2, nq, nk, 8, requires_grad=True)
    out, lse = attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert out.shape == (1, 2, nq, 8) and (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_nan_and_inf_inputs_never_crash():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8, dtype=torch.float32)
    q[0, 0, 0, 0] = float("nan")
    k[0, 1, 1, 1] = float("inf")
    for backend in ("auto", "tiled", "reference"):
        assert attention(q, k, v, causal=True, backend=backend).shape == q.shape


# varlen

def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("backend", ["auto", "tiled", "reference"])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (7, -1)), (False, (3, 3))])
def test_varlen_matches_each_sequence_alone(backend, causal, window):
    lens_q, lens_k = [5, 0, 1, 97, 40, 0], [5, 3, 0, 97, 61, 0]  # empty and length-1 sequences
    hq, hkv, d = 4, 2, 40
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens_q), hq, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lens_k), hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lens_k), hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    out, lse = varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), causal=causal, window_size=window,
                                return_lse=True, backend=backend)
    assert out.shape == (sum(lens_q), hq, d) and lse.shape == (hq, sum(lens_q))
    (out.sum() + finite_lse(lse).sum()).backward()
    cq, ck = _cu(lens_q).tolist(), _cu(lens_k).tolist()
    for s in range(len(lens_q)):
        qs = q.detach()[cq[s]:cq[s + 1]].transpose(0, 1)[None].requires_grad_()
        ks = k.detach()[ck[s]:ck[s + 1]].transpose(0, 1)[None].requires_grad_()
        vs = v.detach()[ck[s]:ck[s + 1]].transpose(0, 1)[None].requires_grad_()
        o_r, l_r = attention_ref(qs, ks, vs, causal=causal, window_size=window, return_lse=True)
        (o_r.sum() + finite_lse(l_r).sum()).backward()
        assert max_err(out[cq[s]:cq[s + 1]], o_r[0].transpose(0, 1)) < 1e-12
        assert torch.equal(torch.isinf(lse[:, cq[s]:cq[s + 1]]), torch.isinf(l_r[0]))
        assert max_err(q.grad[cq[s]:cq[s + 1]], qs.grad[0].transpose(0, 1)) < 1e-11
        assert max_err(k.grad[ck[s]:ck[s + 1]], ks.grad[0].transpose(0, 1)) < 1e-11


@pytest.mark.parametrize("cu_q,cu_k,match", [
    (torch.tensor([0, 3, 5]), _cu([2, 3]), "int32"),
    (torch.tensor([0, 4, 3, 5], dtype=torch.int32), _cu([1, 1, 3]), "non-decreasing, got 4 then 3"),
    (_cu([2, 2]), _cu([2, 3]), r"cu_seqlens_q\[-1\] to equal the packed length 5, got 4"),
    (_cu([2, 3]), _cu([5]), "batch \\+ 1 = 3 entries"),
    (torch.tensor([1, 5], dtype=torch.int32), _cu([5]), r"\[0\] == 0"),
])
def test_varlen_bad_cu_seqlens(cu_q, cu_k, match):
    q = torch.randn(5, 2, 8)
    k = v = torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, k, v, cu_q, cu_k)


def test_varlen_max_seqlen_must_bound_lengths():
    q = k = v = torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match="max_seqlen_q=2 is below the longest sequence"):
        varlen_attention(q, k, v, _cu([2, 3]), _cu([2, 3]), max_seqlen_q=2)


def test_public_namespace():
    assert set(fa2lab.available_backends()) >= {"auto", "tiled", "sdpa", "reference"}
    assert callable(fa2lab.reference.attention_ref)
