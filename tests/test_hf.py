"""attn_implementation="fa2lab" in transformers: tiny Qwen3 and Qwen3-VL built from configs with
random weights (nothing downloaded) against transformers' own "sdpa" and "eager" - logits by the
low-precision rule, greedy tokens with dynamic and static caches, gradients of a training step -
and the full-size Qwen3-VL-8B-class configuration on the meta device."""

import copy
import inspect
import logging

import pytest
import torch
from helpers import fresh_routes, max_err  # noqa: F401 (fresh_routes: an autouse fixture)

transformers = pytest.importorskip("transformers")

import fa2lab.hf  # noqa: E402
from fa2lab.models import functional, vision  # noqa: E402
from fa2lab.models.presets import QWEN3_VL_8B, qwen3_vl_8b_config, tiny_qwen3_config, tiny_qwen3_vl_config  # noqa: E402
from fa2lab.models.sizing import AttentionShape, memory_table  # noqa: E402

AutoModelForCausalLM = transformers.AutoModelForCausalLM
IMPLS = ("fa2lab", "fa2lab_tiled")  # "auto" (torch SDPA where it applies on CPU) and the PyTorch FA2
SLIDING = dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)  # layer 1 slides


@pytest.fixture(scope="module", autouse=True)
def _registered():
    fa2lab.hf.register()
    fa2lab.hf.register("fa2lab_tiled", backend="tiled")


def _qwen3(**overrides):
    torch.manual_seed(0)
    cfg = tiny_qwen3_config(initializer_range=0.1, **overrides)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def _batch(n=40, lengths=(40, 23), seed=0):
    """Token ids (B, n) and a left-padded tokenizer mask."""
    ids = torch.randint(0, 100, (len(lengths), n), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, n - length:] = 1
    return ids, mask


def _logits(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs).logits


def _assert_rule(ours, theirs, truth, factor, what):
    floor = torch.finfo(torch.float32).eps * truth.abs().max().item()
    e_ours, e_torch = max_err(ours, truth), max_err(theirs, truth)
    assert e_ours <= factor * e_torch + floor, f"{what}: error {e_ours:.3g} vs torch's {e_torch:.3g}"


@pytest.mark.parametrize("overrides", [{}, SLIDING], ids=["full", "sliding"])
def test_qwen3_logits_within_twice_sdpa_and_eager_error(overrides):
    model = _qwen3(**overrides)
    ids, mask = _batch()
    real = mask.bool()
    truth = _logits(copy.deepcopy(model).double(), "sdpa", input_ids=ids, attention_mask=mask)[real]
    torch_ref = {impl: _logits(model, impl, input_ids=ids, attention_mask=mask)[real] for impl in ("sdpa", "eager")}
    for impl in IMPLS:
        ours = _logits(model, impl, input_ids=ids, attention_mask=mask)[real]
        for name, theirs in torch_ref.items():
            _assert_rule(ours, theirs, truth, 2.0, f"{impl} vs {name}")
    model64 = copy.deepcopy(model).double()
    ours64 = _logits(model64, "fa2lab_tiled", input_ids=ids, attention_mask=mask)[real]
    assert max_err(ours64, truth) < 1e-12


@pytest.mark.parametrize("overrides", [{}, SLIDING], ids=["full", "sliding"])
def test_qwen3_greedy_generate_gives_identical_tokens(overrides):
    model = _qwen3(**overrides)
    ids, mask = _batch(n=12, lengths=(12, 5))
    tokens = {}
    for impl in ("sdpa", "eager", *IMPLS):
        model.set_attn_implementation(impl)
        for cache in ("dynamic", "static"):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                 cache_implementation=cache, pad_token_id=0)
            tokens[impl, cache] = out[:, 12:].tolist()
    assert len({str(t) for t in tokens.values()}) == 1, tokens
    assert len(set(tokens["sdpa", "dynamic"][0])) > 1  # not a degenerate repetition


def test_qwen3_training_step_gradients_within_three_times_sdpa_error():
    model = _qwen3()
    ids, mask = _batch(n=24, lengths=(24, 15))
    labels = ids.masked_fill(mask == 0, -100)

    def grads(m, impl):
        m.set_attn_implementation(impl)
        m.train()
        m.zero_grad()
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.detach().clone() for n, p in m.named_parameters()}

    truth = grads(copy.deepcopy(model).double(), "sdpa")
    theirs = grads(model, "sdpa")
    for impl in IMPLS:
        ours = grads(model, impl)
        for name in truth:
            _assert_rule(ours[name], theirs[name], truth[name], 3.0, f"{impl} d{name}")


def test_output_attentions_returns_eager_probabilities_through_the_logged_naive_path(monkeypatch, caplog):
    monkeypatch.setattr(functional, "_naive_logged", set())
    model = _qwen3(**SLIDING)
    ids, mask = _batch(n=10, lengths=(10, 6))
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fa2lab"):
        model.set_attn_implementation("fa2lab")
        ours = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        model.set_attn_implementation("eager")
        theirs = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert "output_attentions=True -> naive attention path" in caplog.text
    for a, e in zip(ours, theirs):
        assert a.shape == e.shape == (2, 4, 10, 10)
        assert max_err(a[0], e[0]) < 1e-6 and max_err(a[1, :, 4:, 4:], e[1, :, 4:, 4:]) < 1e-6


def test_packed_sequences_in_one_row_attend_only_within_their_sequence():
    model = _qwen3()
    a, b = torch.randint(0, 100, (1, 9)), torch.randint(0, 100, (1, 6))
    pos = torch.cat([torch.arange(9), torch.arange(6)])[None]
    packed = _logits(model, "fa2lab", input_ids=torch.cat([a, b], 1), position_ids=pos)
    alone = torch.cat([_logits(model, "sdpa", input_ids=a), _logits(model, "sdpa", input_ids=b)], 1)
    assert max_err(packed, alone) < 1e-5


def test_a_model_mask_function_falls_back_to_a_dense_mask_and_the_naive_path(caplog):
    from transformers.masking_utils import create_causal_mask

    model = _qwen3()
    model.set_attn_implementation("fa2lab")
    plain = fa2lab.hf.attention_mask(batch_size=2, q_length=5, kv_length=9, q_offset=4, kv_offset=0,
                                     attention_mask=torch.tensor([[1] * 9, [0] * 3 + [1] * 6]))
    assert plain.shape == (2, 9) and plain.dtype == torch.bool  # (B, Nk), never (Nq, Nk)
    if "inputs_embeds" in inspect.signature(create_causal_mask).parameters:  # transformers >= 5 flags overlays
        with caplog.at_level(logging.WARNING, logger="fa2lab"):
            dense = create_causal_mask(config=model.config, inputs_embeds=torch.zeros(1, 5, 64), attention_mask=None,
                                       past_key_values=None, or_mask_function=lambda b, h, q, kv: kv == 0)
        assert dense.shape == (1, 1, 5, 5) and dense.dtype == torch.bool and bool(dense[0, 0, 0, 0])
    ids, mask = _batch(n=8, lengths=(8, 5))
    mask4d = (torch.ones(8, 8, dtype=torch.bool).tril() & mask.bool()[:, None, :])[:, None]  # (B, 1, Nq, Nk)
    real = mask.bool()
    assert max_err(_logits(model, "fa2lab", input_ids=ids, attention_mask=mask4d)[real],
                   _logits(model, "sdpa", input_ids=ids, attention_mask=mask4d)[real]) < 1e-5


def test_qwen3_vl_text_and_vision_towers_match_and_vision_goes_through_varlen(monkeypatch):
    torch.manual_seed(0)
    model = transformers.Qwen3VLForConditionalGeneration._from_config(
        tiny_qwen3_vl_config(initializer_range=0.1), attn_implementation="sdpa").eval()
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])  # two images: 16 and 8 patches -> 4 and 2 merged tokens
    pixels = torch.randn(24, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(1))
    image = lambda n: [102] + [100] * n + [103]  # noqa: E731  vision start, image tokens, vision end
    ids = torch.tensor([[5, 6, 7, *image(4), 8, 9, *image(2), 10, 11, 12]])
    inputs = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers >= 5 asks for it
        inputs["mm_token_type_ids"] = (ids == 100).int()
    truth = _logits(copy.deepcopy(model).double(), "sdpa", **{**inputs, "pixel_values": pixels.double()})
    theirs = {impl: _logits(model, impl, **inputs) for impl in ("sdpa", "eager")}
    for impl in IMPLS:
        ours = _logits(model, impl, **inputs)
        for name, t in theirs.items():
            _assert_rule(ours, t, truth, 2.0, f"{impl} vs {name}")

    calls = []
    spy = lambda *a, **k: calls.append(k) or functional.packed_attention(*a, **k)  # noqa: E731
    monkeypatch.setattr(vision, "packed_attention", spy)
    assert fa2lab.hf.use_varlen_vision(model) == 2
    ours = _logits(model, "fa2lab", **inputs)
    assert len(calls) == 2 and all(c["causal"] is False for c in calls)  # one varlen call per vision block
    _assert_rule(ours, theirs["sdpa"], truth, 2.0, "varlen vision vs sdpa")

    tokens = {}
    for impl in ("sdpa", "fa2lab"):
        model.set_attn_implementation(impl)
        for cache in ("dynamic", "static"):
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation=cache,
                                 pad_token_id=0)
            tokens[impl, cache] = out[:, ids.shape[1]:].tolist()
    assert len({str(t) for t in tokens.values()}) == 1, tokens


def test_the_standalone_layer_runs_on_transformers_dynamic_and_static_caches():
    from fa2lab.models import FlashAttention2TransformerLayer

    cfg = tiny_qwen3_config()
    torch.manual_seed(0)
    layer = FlashAttention2TransformerLayer(cfg, 0).double().eval()
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    _, mask = _batch(n=10, lengths=(10, 7))
    with torch.no_grad():
        full, _, _ = layer(x, attention_mask=mask)
        for cache in (transformers.DynamicCache(config=cfg), transformers.StaticCache(config=cfg, max_cache_len=16)):
            out, _, cache = layer(x[:, :7], attention_mask=mask[:, :7], past_key_value=cache, use_cache=True,
                                  cache_position=torch.arange(7))
            steps = [out]
            for t in range(7, 10):
                out, _, cache = layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_value=cache,
                                      use_cache=True, cache_position=torch.tensor([t]))
                steps.append(out)
            assert max_err(torch.cat(steps, 1)[mask.bool()], full[mask.bool()]) < 1e-12, type(cache).__name__


def test_full_size_qwen3_vl_8b_config_on_meta_keeps_layers_and_heads():
    cfg = qwen3_vl_8b_config()
    with torch.device("meta"):
        model = transformers.Qwen3VLForConditionalGeneration._from_config(cfg, attn_implementation="fa2lab")
    text, vis = QWEN3_VL_8B["text"], QWEN3_VL_8B["vision"]
    layers = model.model.language_model.layers
    assert len(layers) == text["num_hidden_layers"] == 36
    for layer in layers:
        attn = layer.self_attn
        assert attn.q_proj.out_features // attn.head_dim == text["num_attention_heads"] == 32
        assert attn.k_proj.out_features // attn.head_dim == text["num_key_value_heads"] == 8
    assert len(model.model.visual.blocks) == vis["depth"] and model.model.visual.blocks[0].attn.num_heads == 16
    assert model.config.text_config._attn_implementation == "fa2lab"
    assert model.model.visual.config._attn_implementation == "fa2lab"
    assert fa2lab.hf.use_varlen_vision(model) == vis["depth"]
    params = sum(p.numel() for p in model.parameters())
    assert 8.0e9 < params < 9.5e9, params
    rows = memory_table(AttentionShape.of(cfg.text_config))
    print(f"\nQwen3-VL-8B-class on meta: {len(layers)} layers, 32 query / 8 KV heads, D=128, "
          f"{params / 1e9:.2f} B params")
    for r in rows:
        print(f"  {r['tokens']:>6} tokens: KV cache {r['kv_cache_gib']:7.2f} GiB (bf16, batch 1); one layer's "
              f"attention: naive {r['naive_attention_gib_per_layer']:9.1f} GiB vs FA2 "
              f"{r['fa2_attention_gib_per_layer']:.3f} GiB")
    assert [r["kv_cache_gib"] for r in rows] == [0.5625, 4.5, 18.0]


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "padded-mask"])
def test_qwen3_forward_compiles_fullgraph_and_matches_eager(with_mask):
    """torch.compile(fullgraph=True) traces the fa2lab attention backend: no data-dependent branch
    on a tensor (padding is found by the mask argument, never by reading its values)."""
    torch._dynamo.reset()
    model = _qwen3()
    model.set_attn_implementation("fa2lab")
    ids, mask = _batch(n=24, lengths=(24, 17))
    inputs = dict(input_ids=ids, attention_mask=mask) if with_mask else dict(input_ids=ids)
    with torch.no_grad():
        eager = model(**inputs).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs).logits  # Dynamo + fake tensors
    real = mask.bool() if with_mask else torch.ones_like(mask, dtype=torch.bool)
    sdpa = _logits(model, "sdpa", **inputs)
    torch.testing.assert_close(compiled[real], eager[real], atol=1e-4, rtol=1e-4)
    assert max_err(compiled[real], sdpa[real]) < 1e-3


def test_qwen3_static_cache_decode_step_compiles_fullgraph():
    """The standard fast generation set-up: a static cache (its fill level a device tensor) and a
    compiled forward; prefill and a decode step through fa2lab against sdpa."""
    torch._dynamo.reset()
    model = _qwen3()
    ids, _ = _batch(n=12, lengths=(12, 12))
    outs = {}
    for impl in ("sdpa", "fa2lab"):
        model.set_attn_implementation(impl)
        cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        step = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            first = step(input_ids=ids, past_key_values=cache, cache_position=torch.arange(12)).logits
            nxt = first[:, -1:].argmax(-1)  # (B, 1)
            second = step(input_ids=nxt, past_key_values=cache, cache_position=torch.tensor([12])).logits
        outs[impl] = (first, second)
    for ours, theirs in zip(outs["fa2lab"], outs["sdpa"]):
        assert max_err(ours, theirs) < 1e-3


def test_qwen3_static_cache_compiled_decode_runs_planned_split_k(monkeypatch):
    """The compiled generation step reaches the planned split-K decode: the eager prefill plans the
    one-token step against the static cache's buffers, the traced step (fullgraph) finds the plan
    and decodes over the filled slots with the device's fill level, no value read back. On the CPU
    the dispatch is told to treat the step as on a GPU (the Triton decode runs interpreted)."""
    from fa2lab import backends
    from fa2lab.models import functional as fn

    monkeypatch.setattr(backends, "_is_generation_step", lambda case: case.nq <= backends.DECODE_MAX_NQ < case.nk
                        and not case.requires_grad)
    monkeypatch.setitem(backends.AUTO_ORDER["decode"], "cpu", ("triton", "tiled"))
    monkeypatch.setattr(backends, "_CHOICES", {})  # decisions made under the real policy are not this test's
    monkeypatch.setattr(fn, "_static_plans", {})
    calls = []
    planned = fn.decode_attention
    monkeypatch.setattr(fn, "decode_attention", lambda *a, **kw: (calls.append(kw["plan"]), planned(*a, **kw))[1])
    torch._dynamo.reset()
    model = _qwen3()
    ids, _ = _batch(n=12, lengths=(12, 12))
    logits = {}
    for impl in ("sdpa", "fa2lab"):
        model.set_attn_implementation(impl)
        cache = transformers.StaticCache(config=model.config, max_cache_len=40)
        step = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            first = model(input_ids=ids, past_key_values=cache).logits  # eager prefill (as generate does)
            nxt = first[:, -1:].argmax(-1)  # (B, 1)
            second = step(input_ids=nxt, past_key_values=cache).logits
            third = step(input_ids=second[:, -1:].argmax(-1), past_key_values=cache).logits
        logits[impl] = (first, second, third)
    plans = [p for p in fn._static_plans.values() if p is not None]
    assert len(plans) == 1 and plans[0].backend == "triton" and plans[0].q_shape[2] == 1, fn._static_plans
    assert calls and all(p is plans[0] for p in calls), "the traced step did not run the planned decode"
    for ours, theirs in zip(logits["fa2lab"], logits["sdpa"]):
        assert max_err(ours, theirs) < 1e-3


def test_the_backend_is_decided_and_checked_once_per_forward_not_per_layer(monkeypatch):
    """Every layer of a forward makes the same attention call: the first one decides and checks it
    (fa2lab.backends.choose, the public call's validation), the others reuse the decision; a
    second forward of the same shapes decides nothing. Logits stay those of the undecided path."""
    decided = []
    real = functional.select_backend
    monkeypatch.setattr(functional, "select_backend", lambda *a, **kw: decided.append(a) or real(*a, **kw))
    model = _qwen3(num_hidden_layers=3)
    ids, _ = _batch(n=20, lengths=(20, 20))
    first = _logits(model, "fa2lab", input_ids=ids)
    assert len(decided) == 1
    again = _logits(model, "fa2lab", input_ids=ids)
    assert len(decided) == 1 and torch.equal(first, again)
    functional.clear_routes()
    model.set_attn_implementation("fa2lab_tiled")  # another backend: decided anew, once
    with torch.no_grad():
        tiled = model(input_ids=ids).logits
    assert len(decided) == 2 and max_err(tiled, first) < 1e-4
    assert max_err(first, _logits(model, "sdpa", input_ids=ids)) < 1e-4
