"""Generation the fast transformers way on CUDA: a static cache and
`torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`, fa2lab against sdpa.

    decode tokens/s = B * T / t(T compiled single-token steps after an N-token prefill)
    compile s       = wall time of the first compiled step (Dynamo + Inductor + CUDA-graph capture)
    python -m fa2lab.bench.generate_compiled [--layers 28] [--prompt 1024] [--steps 64] [--impls sdpa fa2lab]

A Qwen3-0.6B-shaped model (fa2lab.bench.models.GPU_BENCH) with random weights; --layers cuts the
depth to keep compile time short (the figure says how many layers ran). The prefill runs eagerly,
as in transformers' generate; fa2lab plans its one-token steps there, and the compiled step runs
the planned split-K decode over the cache's filled slots (fa2lab.models.functional.static_decode).
Logits of the first compiled step are compared with sdpa's, next to the difference between
transformers' "eager" attention (uncompiled) and sdpa: the model-level error rule.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch


def decode_tokens_per_s(impl: str, layers: int, prompt: int, steps: int, warmup: int = 3,
                        compiled: bool = True) -> dict:
    """One implementation: eager prefill into a StaticCache, then `warmup + steps` greedy steps
    through the compiled forward (compiled=False: the plain forward, one step's logits only)."""
    import transformers

    from fa2lab.bench.models import GPU_BENCH, build_model

    torch._dynamo.reset()
    cfg = replace(GPU_BENCH, num_hidden_layers=layers, lengths=(prompt,), decode_steps=steps + warmup)
    model = build_model(cfg)
    model.set_attn_implementation(impl)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).cuda()
    cache = transformers.StaticCache(config=model.config, max_cache_len=prompt + steps + warmup + 1)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if compiled else model.forward
    res = dict(impl=impl, layers=layers, prompt=prompt, steps=steps, compiled=compiled)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        token = torch.full_like(token, 7)  # the same first step for every implementation
        for i in range(warmup + steps if compiled else 1):
            if i == warmup:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            t_step = time.perf_counter()
            out = step(input_ids=token, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1).clone()
            if i == 0:
                res["logits"] = out.logits.float().clone()
                torch.cuda.synchronize()
                res["first_step_s"] = time.perf_counter() - t_step
        torch.cuda.synchronize()
    if compiled:
        res["tokens_s"] = steps / (time.perf_counter() - t0)
    del model, cache
    torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fa2lab.bench.generate_compiled", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--impls", nargs="+", default=["sdpa", "fa2lab"])
    p.add_argument("--no-check", action="store_true", help="skip the uncompiled eager-attention logits yardstick")
    args = p.parse_args(argv)
    import fa2lab.hf

    fa2lab.hf.register()
    res = {}
    for impl in args.impls:
        try:
            res[impl] = decode_tokens_per_s(impl, args.layers, args.prompt, args.steps)
            print(f"compiled static-cache decode {impl:<7} layers={args.layers} prompt={args.prompt}: "
                  f"{res[impl]['tokens_s']:7.1f} tokens/s (first step, compile included: "
                  f"{res[impl]['first_step_s']:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - a failure is a result
            print(f"compiled static-cache decode {impl}: {type(exc).__name__}: {str(exc)[:600]}", flush=True)
    if "sdpa" in res and not args.no_check:
        eager = decode_tokens_per_s("eager", args.layers, args.prompt, args.steps, compiled=False)
        yardstick = (eager["logits"] - res["sdpa"]["logits"]).abs().max().item()
        for impl in res:
            if impl != "sdpa":
                diff = (res[impl]["logits"] - res["sdpa"]["logits"]).abs().max().item()
                print(f"{impl} / sdpa compiled decode: {res[impl]['tokens_s'] / res['sdpa']['tokens_s']:.2f}x; "
                      f"first-step logits max |{impl} - sdpa| {diff:.3g} (eager attention, uncompiled: "
                      f"{yardstick:.3g})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
