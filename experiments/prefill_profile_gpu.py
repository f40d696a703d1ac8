"""Where a 1k-token eager prefill of the Qwen3-0.6B-shaped model (fa2lab.bench.models.GPU_BENCH, 28 layers,
random weights, bf16) spends its time with attn_implementation "fa2lab" against "sdpa", on a GPU.

1. Wall time per prefill, 10 calls per round, 5 rounds interleaved between the two, median of rounds;
   also the host time of the same calls without waiting for the GPU (enqueue only): when the two agree,
   the prefill is host-bound and every microsecond of Python per layer shows in it.
2. One prefill of each under cProfile; the functions whose own time grows most from sdpa to fa2lab,
   per call of the model (profiled microseconds: cProfile inflates Python time ~2x, so compare within).
Run: PYTHONPATH=. python experiments/prefill_profile_gpu.py [N]"""
import cProfile, pstats, statistics, sys, time
import torch
from fa2lab.bench.models import GPU_BENCH, build_model

n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
model = build_model(GPU_BENCH)
ids = torch.randint(0, GPU_BENCH.vocab_size, (1, n), device="cuda")
impls = ("sdpa", "fa2lab")


def prefill():
    model(ids, use_cache=False, logits_to_keep=1)


wall = {i: [] for i in impls}
host = {i: [] for i in impls}
with torch.no_grad():
    for impl in impls:
        model.set_attn_implementation(impl)
        for _ in range(3):
            prefill()
    torch.cuda.synchronize()
    for _ in range(5):
        for impl in impls:
            model.set_attn_implementation(impl)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                prefill()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            host[impl].append((t1 - t0) / 10)
            wall[impl].append((t2 - t0) / 10)
    print(f"N={n}, 28 layers, per prefill (median of 5 rounds of 10):")
    for impl in impls:
        print(f"  {impl:<7} wall {statistics.median(wall[impl]) * 1e3:7.2f} ms   host enqueue "
              f"{statistics.median(host[impl]) * 1e3:7.2f} ms")
    ratio = statistics.median(wall["sdpa"]) / statistics.median(wall["fa2lab"])
    print(f"  fa2lab / sdpa (tokens/s): {ratio:.3f}")

    own = {}
    for impl in impls:
        model.set_attn_implementation(impl)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            prefill()
        prof.disable()
        torch.cuda.synchronize()
        stats = pstats.Stats(prof).stats
        own[impl] = {}
        for (path, line, name), (cc, nc, tt, ct, callers) in stats.items():
            key = f"{path.split('site-packages/')[-1].split('/work/main/')[-1]}:{line}({name})"
            own[impl][key] = (own[impl].get(key, (0, 0))[0] + tt / 5, nc // 5)
        print(f"  {impl:<7} profiled Python per prefill: {sum(t for t, _ in own[impl].values()) * 1e3:7.2f} ms")
    keys = set(own["sdpa"]) | set(own["fa2lab"])
    delta = sorted(keys, key=lambda k: own["fa2lab"].get(k, (0, 0))[0] - own["sdpa"].get(k, (0, 0))[0], reverse=True)
    print("  own time per prefill, fa2lab - sdpa (profiled us; calls per prefill fa2lab / sdpa):")
    for key in delta[:22]:
        f, s = own["fa2lab"].get(key, (0, 0)), own["sdpa"].get(key, (0, 0))
        print(f"    {(f[0] - s[0]) * 1e6:9.1f}  {f[1]:>5} / {s[1]:<5} {key}")
