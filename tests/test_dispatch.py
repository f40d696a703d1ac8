"""One dispatch point: every entry point reaches the decision of `fa2lab.backends.choose`.

The grid (device x dtype x head dim x op x mask) is walked on synthetic cases, so the CUDA rows are
checked on a CPU too; the spies check on real CPU calls that each entry point asks `choose`."""

import itertools

import pytest
import torch
from helpers import make_qkv

import fa2lab
from fa2lab import api, backends
from fa2lab.backends import BACKENDS, OPS, Case, Choice, choose
from fa2lab.models import functional, selection

DEVICES = ("cpu", "cuda")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEAD_DIMS = (40, 128, 320)
# (Nq, Nk, causal, window_size)
MASKS = {"full": (97, 97, False, (-1, -1)), "causal": (97, 97, True, (-1, -1)),
         "causal Nq != Nk": (33, 232, True, (-1, -1)), "window": (97, 97, True, (16, -1)),
         "decode step": (1, 1025, True, (-1, -1))}
GRID = list(itertools.product(DEVICES, DTYPES, HEAD_DIMS, MASKS))


def _case(device, dtype, d, mask, **columns):
    nq, nk, causal, window = MASKS[mask]
    return Case(device, dtype, nq, nk, 8, 2, d, d, causal, window, False, **columns)


@pytest.fixture(autouse=True)
def _no_crossover(monkeypatch):
    monkeypatch.setattr(selection, "_crossovers", {})


@pytest.mark.parametrize("device,dtype,d,mask", GRID)
def test_every_entry_point_reaches_the_same_decision(device, dtype, d, mask):
    case = _case(device, dtype, d, mask)
    dense = choose("dense", case)
    assert api._resolve_backend("auto", [case]) == dense.name  # fa2lab.attention
    assert api._resolve_backend("auto", [case], "varlen") == choose("varlen", case).name == dense.name
    model = selection.select_backend(case)  # fa2lab.models, fa2lab.hf
    assert model == choose("model", case)
    if model.op == "decode":  # a generation step goes where decode_attention would send it
        assert model.name == choose("decode", case).name == ("triton" if d <= 256 else "tiled")
        assert device == "cuda" and dtype in (torch.float16, torch.bfloat16)
    else:  # the bug this test was written for: fp32 CUDA ran "triton" in models, "sdpa" in attention
        assert model.name == dense.name
    for op in OPS:
        chosen = choose(op, case)
        assert chosen.name in BACKENDS and chosen.op in (op, "decode")
        assert backends.support_table(op, case)[chosen.name] is None or chosen.name == "reference"


@pytest.mark.parametrize("device,dtype,d,mask", GRID)
def test_decode_and_ring_follow_the_support_table(device, dtype, d, mask):
    case = _case(device, dtype, d, mask)
    kernel_ok = backends.triton_unavailable(device, dtype, (d, d)) is None
    assert choose("decode", case).name == ("triton" if device == "cuda" and kernel_ok else "tiled")
    assert choose("decode", _case(device, dtype, d, mask, cache="compressed")).name == "tiled"
    assert choose("decode", _case(device, dtype, d, mask, unified_max=True)).name == "tiled"
    fp16 = dtype in (torch.float16, torch.bfloat16)
    assert choose("ring", case).name == ("triton" if device == "cuda" and fp16 and kernel_ok else "tiled")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_an_explicit_backend_that_cannot_run_raises_the_reason(op, backend):
    case = _case("cpu", torch.float32, 64, "window")
    reason = backends.support_table(op, case)[backend]
    if reason is None:
        assert choose(op, case, backend) == Choice(backend, "requested", op)
    else:
        with pytest.raises(ValueError, match=f"backend '{backend}' cannot run this {op} case"):
            choose(op, case, backend)
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        choose(op, case, "flash")


def test_sdpa_is_one_name_for_decode_too():
    q, k, v = make_qkv(1, 2, 2, 1, 20, 16)
    with pytest.raises(ValueError, match="torch SDPA does not read KV caches"):
        fa2lab.decode_attention(q, k, v, backend="sdpa")


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = backends.choose

    def recording(op, cases, backend="auto", **kw):
        choice = real(op, cases, backend, **kw)
        calls.append((op, choice.name))
        return choice

    for module in (backends, api, functional):
        if hasattr(module, "choose"):
            monkeypatch.setattr(module, "choose", recording)
    import fa2lab.decode.api as decode_api
    import fa2lab.distributed.ring as ring
    monkeypatch.setattr(decode_api, "choose", recording)
    monkeypatch.setattr(ring, "choose", recording)
    return calls


def test_each_entry_point_asks_choose(spy):
    q, k, v = make_qkv(1, 4, 2, 5, 40, 16)
    fa2lab.attention(q, k, v, causal=True)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 40], dtype=torch.int32)
    flat = lambda x: x[0].transpose(0, 1)  # noqa: E731 (B=1, H, N, D) -> (N, H, D)
    fa2lab.varlen_attention(flat(q), flat(k), flat(v), cu, cu_k, causal=True)
    fa2lab.decode_attention(q[:, :, :1], k, v)
    functional.padded_attention(q, k, v)
    from fa2lab.distributed.ring import _use_kernels
    _use_kernels(q, k, v)
    assert [op for op, _ in spy] == ["dense", "varlen", "decode", "model", "dense", "ring"], spy


def test_repeated_decisions_are_remembered_and_stay_exact(monkeypatch):
    """choose remembers a decision per (op, cases, backend, log flag, TRITON_INTERPRET): the same Choice
    again without the support tables; an explicit backend that cannot run still raises every time; the
    interpreter switch is part of the key; a crossover measurement is never remembered; memory is bounded."""
    monkeypatch.setattr(backends, "_CHOICES", {})
    case = Case("cpu", torch.bfloat16, 97, 97, 4, 2, 40, 40, True, (-1, -1), False)
    asked = []
    real = backends._reason
    monkeypatch.setattr(backends, "_reason", lambda *a: asked.append(a) or real(*a))
    first = choose("dense", case)
    n = len(asked)
    assert choose("dense", case) == first and len(asked) == n  # remembered: no table asked again
    assert choose("dense", [case]) == first  # one case or a list of it: the same decision
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for _ in range(2):
        with pytest.raises(ValueError, match="need a CUDA device"):
            choose("dense", case, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose("dense", case, "triton") == Choice("triton", "requested", "dense")

    class Crossover:
        source = "test"

        def plain_is_faster(self, backend, nq, nk):
            return True

        def length(self, backend):
            return 128

    before = len(backends._CHOICES)
    assert choose("model", case, crossover=Crossover()).name == "reference"
    assert len(backends._CHOICES) == before
    monkeypatch.setattr(backends, "_CHOICE_MEMORY", 3)
    for nq in range(1, 8):
        choose("dense", Case("cpu", torch.float32, nq, 8, 2, 2, 16, 16, False, (-1, -1), False))
        assert len(backends._CHOICES) <= 3
