"""fa2lab.models without transformers: the FlashAttention2 layer against a float64 per-sequence
reference (padding on either side, GQA, windows, awkward lengths), the low-precision rule, KV
caches (dynamic, split-K ragged), the logged naive path, backend selection and sizing."""

import logging
import subprocess
import sys

import pytest
import torch
from helpers import LargestTensor, fresh_routes, max_err  # noqa: F401 (fresh_routes: an autouse fixture)

from fa2lab.backends import Case, Choice
from fa2lab.kvcache.static import StaticKVCache
from fa2lab.models import (DynamicKVCache, FlashAttention2, FlashAttention2TransformerLayer, FlashAttention2Vision,
                           LayerConfig, SplitKCache, create_flash_attention_2, functional, padded_attention, selection)
from fa2lab.models.rotary import RotaryEmbedding, apply_rotary
from fa2lab.models.sizing import AttentionShape, kv_cache_bytes, memory_table
from fa2lab.reference import attention_ref


TINY = LayerConfig()  # hidden 64, Hq 4, Hkv 2, D 16


def _layer(cfg=TINY, dtype=torch.float64, seed=0, cls=FlashAttention2, **kw):
    torch.manual_seed(seed)
    layer = cls(cfg, 0, **kw).to(dtype).eval()
    with torch.no_grad():  # norms away from 1, so a missing q/k norm would show
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return layer


def _x(b, n, hidden=64, dtype=torch.float64, seed=1):
    return torch.randn(b, n, hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _mask(lengths, n, side):
    """(B, n) tokenizer mask with lengths[b] real tokens, padded on `side`."""
    m = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        if side == "left":
            m[b, n - length:] = 1
        else:
            m[b, :length] = 1
    return m


def _reference(layer: FlashAttention2, x, mask=None, upcast=True):
    """Each sequence alone, its real tokens only: projections, norms, RoPE at positions 0..n-1,
    attention_ref (materialised, float32/float64 inside unless upcast=False), o_proj."""
    b, n, _ = x.shape
    out = torch.zeros(b, n, layer.o_proj.out_features, dtype=x.dtype)
    for i in range(b):
        idx = torch.arange(n) if mask is None else mask[i].nonzero().flatten()
        xi = x[i:i + 1, idx]  # (1, n_i, hidden)
        q = layer.q_proj(xi).view(1, len(idx), -1, layer.head_dim)
        k = layer.k_proj(xi).view(1, len(idx), -1, layer.head_dim)
        v = layer.v_proj(xi).view(1, len(idx), -1, layer.head_dim)
        if layer.config.qk_norm:
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = layer.rotary(torch.arange(len(idx))[None], dtype=q.dtype)
        q, k = apply_rotary(q, k, cos, sin)
        o = attention_ref(q, k, v, causal=True, window_size=layer.window_size, upcast=upcast)
        out[i, idx] = layer.o_proj(o.transpose(1, 2).reshape(1, len(idx), -1))
    return out


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("cfg", [TINY, LayerConfig(num_key_value_heads=1, head_dim=40, sliding_window=5),
                                 LayerConfig(num_attention_heads=2, num_key_value_heads=2, qk_norm=False)])
def test_layer_matches_per_sequence_reference_float64(side, cfg):
    layer = _layer(cfg)
    x, mask = _x(3, 97), _mask([97, 1, 40], 97, side)
    with torch.no_grad():
        out, weights, cache = layer(x, attention_mask=mask)
        ref = _reference(layer, x, mask)
    assert weights is None and cache is None
    assert max_err(out, ref) < 1e-12  # padding rows are zeros on both sides


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "tiled"])
def test_layer_low_precision_within_twice_torch_error(dtype, backend):
    layer64 = _layer(backend=backend)
    layer = _layer(dtype=dtype, backend=backend)
    layer.load_state_dict(layer64.state_dict())
    x64, mask = _x(2, 232), _mask([232, 97], 232, "left")
    x = x64.to(dtype).requires_grad_()
    x64 = x64.clone().requires_grad_()
    truth = _reference(layer64, x64, mask)
    naive = _reference(layer, x, mask, upcast=False)  # plain PyTorch at this precision
    ours, _, _ = layer(x, attention_mask=mask)
    floor = torch.finfo(dtype).eps
    e_ours, e_torch = max_err(ours, truth), max_err(naive, truth)
    assert e_ours <= 2 * e_torch + floor, f"forward {e_ours:.3g} vs torch {e_torch:.3g}"
    g = torch.randn(truth.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (gt,) = torch.autograd.grad((truth * g).sum(), x64)
    (gn,) = torch.autograd.grad((naive.double() * g).sum(), x)
    (go,) = torch.autograd.grad((ours.double() * g).sum(), x)
    e_ours, e_torch = max_err(go, gt), max_err(gn, gt)
    assert e_ours <= 3 * e_torch + floor, f"grad {e_ours:.3g} vs torch {e_torch:.3g}"


@pytest.mark.parametrize("backend", ["auto", "tiled"])
def test_padding_goes_through_varlen_without_an_nq_by_nk_tensor(backend):
    n = 1025  # tiles are 256 x 256: 65536 elements, a sixteenth of N x N
    q = torch.randn(2, 1, n, 16, requires_grad=True)
    k, v = torch.randn(2, 1, n, 16), torch.randn(2, 1, n, 16)
    mask = _mask([n, 300], n, "left").bool()
    with LargestTensor() as mode:
        padded_attention(q, k, v, mask, causal=True, backend=backend).sum().backward()
    assert mode.largest < n * n // 8, f"largest tensor has {mode.largest} elements"


def test_dynamic_and_splitk_caches_match_the_full_forward():
    layer = _layer(cls=FlashAttention2TransformerLayer)
    x, mask = _x(2, 12), _mask([12, 7], 12, "left")
    with torch.no_grad():
        full, _, _ = layer(x, attention_mask=mask)
        for cache in (DynamicKVCache(), SplitKCache(batch=2, max_len=16, num_splits=2)):
            out, _, cache = layer(x[:, :9], attention_mask=mask[:, :9], past_key_value=cache, use_cache=True)
            steps = [out]
            for t in range(9, 12):  # dynamic: the mask grows with the cache; split-K: real tokens only
                step_mask = mask[:, :t + 1] if isinstance(cache, DynamicKVCache) else None
                out, _, cache = layer(x[:, t:t + 1], attention_mask=step_mask, past_key_value=cache, use_cache=True)
                steps.append(out)
            got = torch.cat(steps, 1)
            assert max_err(got[mask.bool()], full[mask.bool()]) < 1e-12, type(cache).__name__
    assert cache.seqlens(0).tolist() == [12, 7]  # ragged: the padding was never stored


def test_splitk_cache_decodes_through_a_planned_split_k_call(monkeypatch):
    import fa2lab.decode

    calls = []
    original = fa2lab.decode.decode_attention
    monkeypatch.setattr(fa2lab.decode, "decode_attention",
                        lambda *a, **kw: calls.append((len(a), kw)) or original(*a, **kw))
    layer = _layer()
    cache = SplitKCache(batch=1, max_len=8, num_splits=3)
    with torch.no_grad():
        layer(_x(1, 5), past_key_value=cache, use_cache=True)
        step, _, _ = layer(_x(1, 1, seed=2), past_key_value=cache, use_cache=True)
        full, _, _ = layer(torch.cat([_x(1, 5), _x(1, 1, seed=2)], 1))
    (n_args, kw), = calls  # one decode step: q, caches and the new k, v in one planned call
    assert n_args == 5 and kw["plan"].num_splits == 3 and cache.seqlens(0).tolist() == [6]
    assert max_err(step, full[:, 5:]) < 1e-12
    with pytest.raises(ValueError, match="past max_len=8"):
        layer(_x(1, 3, seed=3), past_key_value=cache, use_cache=True)
    assert cache.seqlens(0).tolist() == [6]  # nothing written by the refused step
    with pytest.raises(ValueError, match="takes padding only in its first"):
        layer(_x(1, 2), attention_mask=torch.tensor([[1] * 6 + [0, 1]]), past_key_value=cache, use_cache=True)


def test_output_attentions_returns_probabilities_through_a_logged_naive_path(monkeypatch, caplog):
    monkeypatch.setattr(functional, "_naive_logged", set())
    layer = _layer(LayerConfig(sliding_window=4))
    x, mask = _x(2, 9), _mask([9, 5], 9, "right")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fa2lab"):
        out, probs, _ = layer(x, attention_mask=mask, output_attentions=True)
        fast, _, _ = layer(x, attention_mask=mask)
    assert "naive attention path" in caplog.text and "output_attentions=True" in caplog.text
    assert probs.shape == (2, 4, 9, 9) and max_err(out, fast) < 1e-12
    valid = mask.bool()
    assert torch.allclose(probs.sum(-1)[valid[:, None, :].expand(-1, 4, -1)], torch.ones(()).double())
    assert probs[1, :, :, 5:].abs().max() == 0 and probs[1, :, 5:].abs().max() == 0  # padding sees / is seen by none
    assert probs[0, :, 8, :5].abs().max() == 0  # window 4: the last query sees keys 5..8 only


def test_splitk_cache_naive_path_aligns_ragged_sequences():
    layer = _layer()
    x, mask = _x(2, 6), _mask([6, 3], 6, "left")
    with torch.no_grad():
        full, _, _ = layer(torch.cat([x, _x(2, 1, seed=5)], 1), attention_mask=torch.cat([mask, torch.ones(2, 1)], 1))
        cache = SplitKCache(batch=2, max_len=8)
        out, probs, cache = layer(x, attention_mask=mask, past_key_value=cache, use_cache=True, output_attentions=True)
        step, probs1, _ = layer(_x(2, 1, seed=5), past_key_value=cache, use_cache=True, output_attentions=True)
    assert max_err(out[mask.bool()], full[:, :6][mask.bool()]) < 1e-12 and max_err(step, full[:, 6:]) < 1e-12
    assert probs.shape == (2, 4, 6, 6) and probs1.shape == (2, 4, 1, 7)


def test_multimodal_rope_reduces_to_text_rope_when_t_h_w_agree():
    pos = torch.arange(7)[None].expand(2, -1)
    plain, mm = RotaryEmbedding(16), RotaryEmbedding(16, mrope_section=(2, 3, 3))
    assert torch.equal(plain(pos)[0], mm(pos)[0]) and torch.equal(plain(pos)[1], mm(torch.stack([pos] * 3))[1])
    hw = torch.stack([pos, pos * 0 + 3, pos * 0 + 5])
    assert not torch.equal(mm(hw)[0], plain(pos)[0])


def test_vision_attention_keeps_patches_within_their_image():
    torch.manual_seed(0)
    attn = FlashAttention2Vision(32, 2).double()
    cu = torch.tensor([0, 16, 24, 25], dtype=torch.int32)  # three images: 16, 8 and 1 patches
    x = torch.randn(25, 32, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x, cu)
        q, k, v = attn.qkv(x).reshape(25, 3, 2, 16).unbind(1)
        ref = torch.cat([attention_ref(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
                         for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
        ref = attn.proj(ref.reshape(25, 32))
    assert max_err(out, ref) < 1e-12


def test_packed_rows_split_by_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert functional.cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 5, 9]
    assert functional.cu_seqlens_from_position_ids(torch.arange(5)[None]) is None


def _crossover(times, lengths=(16, 64, 256)):
    return selection.Crossover("cpu", torch.float32, 16, 4, 2, lengths, tuple(times.items()), "synthetic")


def test_selection_uses_plain_attention_only_below_a_measured_crossover(monkeypatch, caplog):
    monkeypatch.setattr(selection, "_crossovers", {})
    case = lambda n, window=(-1, -1): Case("cpu", torch.float32, n, n, 4, 2, 16, 16, True, window, False)  # noqa: E731
    assert selection.select_backend(case(32)).name == "sdpa"  # nothing measured: never plain
    c = _crossover({"reference": (1.0, 2.0, 9.0), "sdpa": (2.0, 1.0, 1.0), "tiled": (3.0, 3.0, 3.0)})
    assert c.length("sdpa") == 64 and c.length("tiled") == 256
    selection.set_crossover(c)
    assert selection.select_backend(case(32)).name == "reference"
    assert selection.select_backend(case(64)).name == "sdpa"
    assert selection.select_backend(case(100, window=(8, 0))).name == "reference"  # sdpa cannot: vs tiled
    assert selection.select_backend(case(1000, window=(8, 0))).name == "tiled"  # beyond the measurement
    with pytest.raises(ValueError, match="backend 'sdpa' cannot run this model case: torch SDPA has no sliding"):
        selection.select_backend(case(1000, window=(8, 0)), requested="sdpa")  # one rule with fa2lab.attention
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        selection.select_backend(case(8), requested="flash")


def test_measure_crossover_times_plain_and_fa2_paths(monkeypatch):
    monkeypatch.setattr(selection, "_crossovers", {})
    c = selection.measure_crossover(head_dim=8, heads=2, lengths=(8, 32), rounds=2)
    assert set(c.table()) >= {"reference", "sdpa", "tiled"} and all(t > 0 for v in c.table().values() for t in v)
    assert selection.get_crossover("cpu", torch.float32, 8) is c and "measured" in c.source


def test_factory_logs_and_validates(caplog):
    with caplog.at_level(logging.INFO, logger="fa2lab"):
        layer = create_flash_attention_2(TINY, 3, backend="tiled")
    assert layer.backend == "tiled" and "FlashAttention2 layer 3: backend=tiled" in caplog.text
    with pytest.raises(ValueError, match="unknown backend"):
        create_flash_attention_2(TINY, 0, backend="flash")


def test_kv_cache_memory_of_a_qwen3_vl_8b_shape():
    shape = AttentionShape(layers=36, heads=32, kv_heads=8, head_dim=128)
    assert kv_cache_bytes(shape, 4096) == 2 * 36 * 8 * 128 * 2 * 4096 == 576 * 2**20
    rows = memory_table(shape)
    assert [r["tokens"] for r in rows] == [4096, 32768, 131072]
    assert rows[2]["kv_cache_gib"] == 18.0 and rows[2]["naive_attention_gib_per_layer"] == 2048.0


def test_fa2lab_imports_without_transformers():
    code = ("import sys, fa2lab, fa2lab.models, fa2lab.hf\n"
            "print('imported transformers:', 'transformers' in sys.modules)\n"
            "sys.modules['transformers'] = None  # as if not installed\n"
            "try:\n    fa2lab.hf.register()\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "imported transformers: False" in done.stdout
    assert 'ImportError: fa2lab.hf needs transformers' in done.stdout and 'pip install -e ".[hf]"' in done.stdout


@pytest.mark.parametrize("nq,window", [(1, (-1, -1)), (3, (-1, -1)), (4, (5, -1))])
def test_generation_steps_take_the_split_k_path_with_the_same_result(monkeypatch, nq, window):
    # On CUDA a few new queries against a long cache go through fa2lab.decode_attention (split-K);
    # here the route is forced on the CPU to check it keeps the semantics (bottom-right, window, GQA).
    from fa2lab.models import functional

    calls = []
    real = functional.decode_attention
    forced = Choice("tiled", "forced generation step", "decode")
    monkeypatch.setattr(functional, "select_backend", lambda case, backend: forced)
    monkeypatch.setattr(functional, "decode_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    g = torch.Generator().manual_seed(nq)
    q = torch.randn(2, 4, nq, 32, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 97, 32, generator=g, dtype=torch.float64) for _ in range(2))
    out = functional.padded_attention(q, k, v, causal=True, window_size=window, softmax_scale=0.2)
    ref = attention_ref(q, k, v, causal=True, window_size=window, softmax_scale=0.2)
    assert calls and (out - ref).abs().max().item() < 1e-12


def test_split_k_route_is_for_cuda_generation_without_gradients():
    from fa2lab.backends import choose

    case = lambda device, **kw: Case(device, torch.bfloat16, 1, 500, 4, 2, 64, 64, False, (-1, -1), False, **kw)  # noqa: E731
    assert choose("model", case("cpu")).op == "model"  # CPU: torch SDPA / the tiled path, as measured there
    assert choose("model", case("cuda")) == Choice("triton", choose("model", case("cuda")).reason, "decode")
    assert choose("model", case("cuda", requires_grad=True)).op == "model"
    assert choose("model", case("cuda", cache="packed")).op == "model"


@pytest.mark.parametrize("fn", ["padded_attention", "naive_attention"])
def test_scale_is_a_deprecated_name_of_softmax_scale(fn):
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    new = getattr(functional, fn)(q, k, v, softmax_scale=0.3)
    with pytest.warns(DeprecationWarning, match=f"{fn}: scale= is deprecated, use softmax_scale="):
        old = getattr(functional, fn)(q, k, v, scale=0.3)
    assert all(torch.equal(a, b) for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (new, old))))
    with pytest.raises(ValueError, match="got both scale= and softmax_scale="):
        getattr(functional, fn)(q, k, v, scale=0.3, softmax_scale=0.3)


def _graph_vs_planned(device, dtype, steps=4, monkeypatch=None):
    """A layer's prefill (ragged, left-padded) and `steps` one-token steps through SplitKCache with
    and without cuda_graph=True -> (outputs of each, the graph cache)."""
    layer = _layer(dtype=dtype).to(device)
    x, mask = _x(2, 9 + steps, dtype=dtype).to(device), _mask([9, 6], 9, "left").to(device)
    outs = {}
    for graph in (False, True):
        cache = SplitKCache(batch=2, max_len=9 + steps, cuda_graph=graph)
        with torch.no_grad():
            layer(x[:, :9], attention_mask=mask, past_key_value=cache, use_cache=True)
            outs[graph] = torch.cat([layer(x[:, t:t + 1], past_key_value=cache, use_cache=True)[0]
                                     for t in range(9, 9 + steps)], 1)
    return outs, cache


def test_splitk_cache_cuda_graph_steps_replay_one_capture_per_layer(monkeypatch):
    """The logic of SplitKCache(cuda_graph=True) on the CPU: capture stands in for a CUDA graph
    (run once, undo, then every step replays the same function over the session's buffers), so the
    steps must read their inputs from the persistent buffers and continue the prefilled cache."""
    from fa2lab.kvcache import session

    captures = []

    def capture(step, device, undo):  # what _capture does, without the CUDA graph
        step()
        undo()
        captures.append(step)
        return step

    monkeypatch.setattr(session, "GRAPH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(session, "_capture", capture)
    outs, cache = _graph_vs_planned("cpu", torch.float64)
    assert len(captures) == 1 and list(cache.sessions) == [0]  # one layer, captured at its first step
    assert cache.sessions[0].steps == 4 and cache.seqlens(0).tolist() == [13, 10]
    assert max_err(outs[True], outs[False]) < 1e-12
    layer = _layer()
    with pytest.raises(ValueError, match="past max_len=13"), torch.no_grad():
        layer(_x(2, 1), past_key_value=cache, use_cache=True)
    assert cache.seqlens(0).tolist() == [13, 10]  # the refused step wrote nothing
    monkeypatch.setattr(session, "GRAPH_DEVICES", ("cuda",))
    cpu_cache = SplitKCache(batch=2, max_len=16, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"), torch.no_grad():
        layer(_x(2, 9), past_key_value=cpu_cache, use_cache=True)  # prefill: no graph
        layer(_x(2, 1), past_key_value=cpu_cache, use_cache=True)  # the first step: refused on a CPU


@pytest.mark.gpu
def test_splitk_cache_cuda_graph_on_cuda_matches_the_planned_steps_without_syncs():
    outs, cache = _graph_vs_planned("cuda", torch.bfloat16, steps=6)
    assert cache.seqlens(0).tolist() == [15, 12]
    assert max_err(outs[True].float(), outs[False].float()) < 2e-2  # bf16: the same kernel, one rounding apart
    layer = _layer(dtype=torch.bfloat16).cuda()
    cache = SplitKCache(batch=2, max_len=32, cuda_graph=True)
    with torch.no_grad():
        layer(_x(2, 9, dtype=torch.bfloat16).cuda(), past_key_value=cache, use_cache=True)
        layer(_x(2, 1, dtype=torch.bfloat16).cuda(), past_key_value=cache, use_cache=True)  # captures
        x = _x(2, 1, dtype=torch.bfloat16, seed=5).cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                layer(x, past_key_value=cache, use_cache=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cache.seqlens(0).tolist() == [13, 13]
