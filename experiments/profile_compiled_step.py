"""GPU kernels of one compiled static-cache decode step, sdpa against fa2lab (4 layers of
Qwen3-0.6B's shape, random weights, bf16, StaticCache, torch.compile(mode="reduce-overhead",
fullgraph=True)): torch.profiler's kernel records per step, largest first.

    PYTHONPATH=. python experiments/profile_compiled_step.py

This is how the double decode launch per layer was found on 2026-12-03 (BENCHMARKS.md, model
integration on the GPU)."""
from dataclasses import replace

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

import fa2lab.hf
from fa2lab.bench.models import GPU_BENCH, build_model

fa2lab.hf.register()
layers, prompt, steps = 4, 1024, 10
for impl in ("sdpa", "fa2lab"):
    torch._dynamo.reset()
    cfg = replace(GPU_BENCH, num_hidden_layers=layers, lengths=(prompt,), decode_steps=steps + 5)
    model = build_model(cfg)
    model.set_attn_implementation(impl)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt)).cuda()
    cache = transformers.StaticCache(config=model.config, max_cache_len=prompt + 40)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        model(ids, past_key_values=cache, logits_to_keep=1)
        tok = torch.full((1, 1), 7, device="cuda")
        for _ in range(5):
            tok = step(input_ids=tok, past_key_values=cache).logits[:, -1:].argmax(-1).clone()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                tok = step(input_ids=tok, past_key_values=cache).logits[:, -1:].argmax(-1).clone()
            torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.self_device_time_total > 0]  # GPU kernels and copies
    ev.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in ev)
    print(f"== {impl}: GPU time per step {total / steps:.1f} us ({layers} layers)")
    for e in ev[:18]:
        print(f"  {e.self_device_time_total / steps:8.2f} us/step  x{e.count / steps:5.1f}/step  {e.key[:110]}")
    del model, cache
    torch.cuda.empty_cache()
