"""Generation the fast transformers way on CUDA: a static cache and
`torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`, fa2lab against sdpa.

    decode tokens/s = B * T / t(T compiled single-token steps after an N-token prefill)
    python -m fa2lab.bench.generate_compiled [--layers 28] [--prompt 1024] [--steps 64]

A Qwen3-0.6B-shaped model (fa2lab.bench.models.GPU_BENCH) with random weights; --layers cuts the
depth to keep compile time short (the figure says how many layers ran).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch


def decode_tokens_per_s(impl: str, layers: int, prompt: int, steps: int, warmup: int = 3) -> tuple[float, torch.Tensor]:
    import transformers

    from fa2lab.bench.models import GPU_BENCH, build_model

    torch._dynamo.reset()
    cfg = replace(GPU_BENCH, num_hidden_layers=layers, lengths=(prompt,), decode_steps=steps + warmup)
    model = build_model(cfg)
    model.set_attn_implementation(impl)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).cuda()
    cache = transformers.StaticCache(config=model.config, max_cache_len=prompt + steps + warmup + 1)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    logits = []
    with torch.no_grad():
        out = model(ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"), logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        for i in range(warmup + steps):
            if i == warmup:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            pos = torch.tensor([prompt + i], device="cuda")
            out = step(input_ids=token, past_key_values=cache, cache_position=pos)
            token = out.logits[:, -1:].argmax(-1).clone()
            if i == 0:
                logits.append(out.logits.float().clone())
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0), logits[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fa2lab.bench.generate_compiled", description=__doc__)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args(argv)
    import fa2lab.hf

    fa2lab.hf.register()
    res = {}
    for impl in ("sdpa", "fa2lab"):
        try:
            res[impl] = decode_tokens_per_s(impl, args.layers, args.prompt, args.steps)
            print(f"compiled static-cache decode {impl:<7} layers={args.layers} prompt={args.prompt}: "
                  f"{res[impl][0]:7.1f} tokens/s")
        except Exception as exc:  # noqa: BLE001 - a failure is a result
            print(f"compiled static-cache decode {impl}: {type(exc).__name__}: {str(exc)[:300]}")
    if len(res) == 2:
        diff = (res["fa2lab"][1] - res["sdpa"][1]).abs().max().item()
        print(f"fa2lab / sdpa compiled decode: {res['fa2lab'][0] / res['sdpa'][0]:.2f}x; first-step logits max "
              f"|diff| {diff:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
