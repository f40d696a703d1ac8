"""attn_implementation="fa2lab" on the models that need attention variants: Gemma 2 (logit
soft-capping, sliding windows) and gpt-oss (attention sinks, `s_aux`), small random configs of
transformers' own classes, against "eager": logits by the 2x rule, greedy tokens, gradients."""

import copy

import pytest
import torch
from helpers import max_err

transformers = pytest.importorskip("transformers")

import fa2lab.hf  # noqa: E402

IMPLS = ("fa2lab", "fa2lab_tiled")


@pytest.fixture(scope="module", autouse=True)
def _registered():
    fa2lab.hf.register()
    fa2lab.hf.register("fa2lab_tiled", backend="tiled")
    # The float64 truth: fa2lab's oracle (Gemma 2's eager takes its softmax in float32 even for
    # float64 models, so eager in float64 is not exact; it is checked against the oracle below).
    fa2lab.hf.register("fa2lab_reference", backend="reference")


def _gemma2(init=0.3):
    cfg = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                    attn_logit_softcapping=1.5, final_logit_softcapping=30.0, sliding_window=6,
                                    layer_types=["sliding_attention", "full_attention"], initializer_range=init,
                                    pad_token_id=0)
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(cfg).eval()


def _gpt_oss():
    cfg = transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=6, initializer_range=0.1,
                                    layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
                                    experts_implementation="eager")  # grouped_mm has no float64
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # sinks that matter: some heads dump much of their mass into them
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
    return model


MODELS = {"gemma2": _gemma2, "gpt_oss": _gpt_oss}


def _batch(n=20, lengths=(20, 11)):
    ids = torch.randint(1, 128, (len(lengths), n), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, n - length:] = 1
    return ids, mask


def _logits(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def _alone(model, ids, mask, impl):
    """float64 logits of the real tokens, each sequence run alone without padding (transformers'
    float64 eager turns left-padded rows into NaN, which then reach real rows through P V)."""
    model = copy.deepcopy(model).double()
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return torch.cat([model(input_ids=ids[b, mask[b].bool()][None]).logits[0] for b in range(ids.shape[0])])


def _loss(model, ids, mask):
    """Summed next-token loss of the real tokens."""
    labels = ids.masked_fill(mask == 0, -100)
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")


def _assert_rule(ours, theirs, truth, factor, what):
    floor = torch.finfo(torch.float32).eps * truth.abs().max().item()
    e_ours, e_torch = max_err(ours, truth), max_err(theirs, truth)
    assert e_ours <= factor * e_torch + floor, f"{what}: error {e_ours:.3g} vs eager's {e_torch:.3g}"


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_within_twice_eager_error(name):
    model = MODELS[name]()
    ids, mask = _batch()
    truth = _logits(copy.deepcopy(model).double(), "fa2lab_reference", ids, mask)
    eager = _logits(model, "eager", ids, mask)
    for impl in IMPLS:
        _assert_rule(_logits(model, impl, ids, mask), eager, truth, 2.0, f"{name} {impl}")
    # eager's own semantics, in float64 (its fp32 softmax in Gemma 2 leaves ~1e-6)
    assert max_err(_alone(model, ids, mask, "eager"), _alone(model, ids, mask, "fa2lab_reference")) < 1e-5
    assert max_err(_alone(model, ids, mask, "fa2lab_tiled"), _alone(model, ids, mask, "fa2lab_reference")) < 1e-10
    # the variant matters: without it the logits move far beyond rounding
    if name == "gpt_oss":
        for layer in model.model.layers:
            layer.self_attn.sinks.data.fill_(-1e4)
    else:
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
    assert max_err(_logits(model, "fa2lab", ids, mask), eager) > 1e3 * max_err(eager, truth)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generate_gives_identical_tokens(name):
    model = _gemma2(init=0.05) if name == "gemma2" else MODELS[name]()  # 0.3: one token repeated
    ids, mask = _batch(n=10, lengths=(10, 6))
    tokens = {}
    for impl in ("eager", *IMPLS):
        model.set_attn_implementation(impl)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        tokens[impl] = out[:, 10:].tolist()
    assert len({str(t) for t in tokens.values()}) == 1, tokens
    assert len({t for row in tokens["eager"] for t in row}) > 2  # not one repeated token


@pytest.mark.parametrize("name", list(MODELS))
def test_training_gradients_within_three_times_eager_error(name):
    model = MODELS[name]()
    ids, mask = _batch(n=16, lengths=(16, 9))

    def grads(m, impl):
        m.set_attn_implementation(impl)
        m.train()
        m.zero_grad()
        _loss(m, ids, mask).backward()
        return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}

    truth = grads(copy.deepcopy(model).double(), "fa2lab_reference")
    eager = grads(model, "eager")
    for impl in IMPLS:
        ours = grads(model, impl)
        assert set(ours) == set(truth)
        if name == "gpt_oss":
            assert any("sinks" in n for n in ours)  # the sinks learn through fa2lab
        for n in truth:  # every attention parameter by the rule; the MoE router's top-k makes
            if "self_attn" in n:  # its few gradients noisy at fp32 rounding, so all of them as one
                _assert_rule(ours[n], eager[n], truth[n], 3.0, f"{name} {impl} d{n}")
        flat = lambda g: torch.cat([g[n].flatten() for n in sorted(truth)])  # noqa: E731
        _assert_rule(flat(ours), flat(eager), flat(truth), 3.0, f"{name} {impl} all gradients")
