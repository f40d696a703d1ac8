"""Notebook 12's measurements: a small Qwen3 (and the Qwen3-VL vision tower) through transformers
with attn_implementation "fa2lab", "sdpa" and "eager" - which backend each layer chose and why,
logits agreement against float64, and prefill memory against N. Random weights (nothing is
downloaded); needs transformers (pip install -e ".[hf]").

    tiny_model(...)                       a random-weight Qwen3ForCausalLM, fa2lab registered
    layer_choices(model, ids)             per attention layer: the backend fa2lab picks, and why
    captured_log()                        the `fa2lab` logger's lines while a block runs
    logits_agreement(model, ids, impls)   max |logits - float64 eager| per implementation, the 2x rule
    vision_agreement(impls)               the same for a tiny Qwen3-VL with two images
    prefill_memory(model, ns, impls)      peak extra MiB of one prefill (VmHWM, fa2lab.measure.memory)

fa2lab.viz.models draws these rows.
"""

from __future__ import annotations

import copy
import inspect
import logging
from contextlib import contextmanager

import torch

IMPLS = ("fa2lab", "sdpa", "eager")
RULE = 2.0


def tiny_model(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
               max_len: int = 4096, seed: int = 0):
    """A random-weight Qwen3ForCausalLM of the given sizes, fp32, eval mode, fa2lab registered."""
    import fa2lab.hf
    from transformers import AutoModelForCausalLM

    from fa2lab.models.presets import tiny_qwen3_config

    fa2lab.hf.register()
    torch.manual_seed(seed)
    cfg = tiny_qwen3_config(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=2 * hidden,
                            max_position_embeddings=max_len, initializer_range=0.1)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


@contextmanager
def captured_log(level=logging.INFO):
    """Collect the `fa2lab` logger's messages (a list, filled while the block runs). fa2lab logs
    each distinct backend decision once per process: a second run of the same case adds nothing."""
    lines = []

    class _Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("fa2lab")
    handler, old = _Keep(level), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, old) if old else level)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def layer_choices(model, ids) -> list[dict]:
    """For every attention layer of `model`, the shapes it saw on `ids` (recorded by a forward
    pre-hook during a real forward with "fa2lab") and the backend fa2lab.models.select_backend
    returns for them, with its reason."""
    from fa2lab.backends import Case
    from fa2lab.models import select_backend

    cfg = model.config
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs, name=name: seen.append(
        (name, getattr(mod, "layer_idx", None), (kwargs.get("hidden_states", args[0] if args else None)).shape)),
        with_kwargs=True) for name, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    try:
        model.set_attn_implementation("fa2lab")
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    dtype = next(model.parameters()).dtype
    d = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    for name, idx, shape in seen:
        b, n = shape[0], shape[1]
        q = torch.empty(b, cfg.num_attention_heads, n, d, dtype=dtype)  # (B, Hq, N, D): shapes only
        k = torch.empty(b, cfg.num_key_value_heads, n, d, dtype=dtype)  # (B, Hkv, N, D)
        choice = select_backend(Case.of(q, k, k, True, (-1, -1), False))
        rows.append(dict(layer=idx, module=name, N=n, Hq=cfg.num_attention_heads, Hkv=cfg.num_key_value_heads, D=d,
                         backend=choice.name, reason=choice.reason))
    return rows


def _logits(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def logits_agreement(model, ids, impls=IMPLS) -> list[dict]:
    """Max |logits - float64 eager logits| per implementation (fp32), next to sdpa's and eager's:
    `within_rule` when fa2lab's is at most 2x the smaller of theirs (plus an fp32 floor)."""
    truth = _logits(copy.deepcopy(model).double(), "eager", input_ids=ids).double()
    errs = {impl: (_logits(model, impl, input_ids=ids).double() - truth).abs().max().item() for impl in impls}
    peers = [errs[i] for i in errs if i != "fa2lab"]
    bound = RULE * min(peers) + 1e-6 if peers else None
    return [dict(impl=i, max_abs_err=e, within_rule=None if i != "fa2lab" or bound is None else e <= bound)
            for i, e in errs.items()]


def vision_agreement(impls=IMPLS, seed: int = 0) -> tuple[list[dict], list[str]]:
    """A tiny random Qwen3-VL (two-block vision tower) on two images of 16 and 8 patches: max
    |logits - float64| per implementation, the vision tower's attention once more through
    fa2lab's packed (varlen) path; and the fa2lab log lines of those runs."""
    import fa2lab.hf
    import transformers

    from fa2lab.models.presets import tiny_qwen3_vl_config

    fa2lab.hf.register()
    torch.manual_seed(seed)
    model = transformers.Qwen3VLForConditionalGeneration._from_config(
        tiny_qwen3_vl_config(initializer_range=0.1), attn_implementation="sdpa").eval()
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])  # (images, 3): t, h, w patches -> 4 and 2 merged tokens
    pixels = torch.randn(24, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(seed + 1))
    image = lambda n: [102] + [100] * n + [103]  # noqa: E731  vision start, image tokens, vision end
    ids = torch.tensor([[5, 6, 7, *image(4), 8, 9, *image(2), 10, 11, 12]])
    inputs = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers >= 5
        inputs["mm_token_type_ids"] = (ids == 100).int()
    truth = _logits(copy.deepcopy(model).double(), "eager", **{**inputs, "pixel_values": pixels.double()}).double()
    rows = []
    with captured_log() as lines:
        for impl in impls:
            rows.append(dict(impl=impl, max_abs_err=(_logits(model, impl, **inputs).double() - truth).abs().max().item()))
        replaced = fa2lab.hf.use_varlen_vision(model)
        rows.append(dict(impl=f"fa2lab + varlen vision ({replaced} blocks)",
                         max_abs_err=(_logits(model, "fa2lab", **inputs).double() - truth).abs().max().item()))
    return rows, lines


def prefill_memory(model, ns, impls=IMPLS, *, batch: int = 1, seed: int = 0) -> list[dict]:
    """Peak extra MiB of one prefill of N tokens (no cache, last position's logits, as generate
    asks), per implementation: eager materialises (B, Hq, N, N) scores in every layer."""
    from fa2lab.measure import memory

    rows = []
    vocab = model.config.vocab_size
    for n in ns:
        ids = torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))
        for impl in impls:
            model.set_attn_implementation(impl)

            def run():
                with torch.no_grad():
                    model(ids, use_cache=False, logits_to_keep=1)

            run()  # warm-up: one-time allocations are not the prefill's
            peak = memory.peak_extra_bytes(run)
            rows.append(dict(impl=impl, N=n, peak_mib=None if peak is None else peak / 2**20))
    return rows
