"""Model-level CPU benchmark: a small Qwen3-shaped model (random weights) with transformers'
attn_implementation "fa2lab" (auto), "fa2lab_tiled" (the PyTorch FA2), "sdpa" and "eager".

    prefill tokens/s = B * N / t_prefill                     one forward over an N-token prompt
    decode tokens/s  = B * T / t(T steps)                    T single-token steps on a DynamicCache
    attention flops  = 4 * layers * B * Hq * N * N * D / 2   prefill, causal (half the scores)
    peak MiB         = the most memory a prefill added (fa2lab.measure.memory.peak_extra_bytes)

Ratios are against "sdpa" measured in the same run. Run: python -m fa2lab.bench.models
(needs transformers: pip install -e ".[hf]"). Importing this module changes no global state.
On a GPU: python -m fa2lab.bench.models --gpu (a Qwen3-0.6B-shaped model in bf16, N up to 16k;
peak memory from torch.cuda.max_memory_allocated). Prefill asks for the last position's logits
only (logits_to_keep=1, as generate does), so the vocabulary projection does not swamp attention.
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fa2lab.cost.flops import formula_flops
from fa2lab.measure.timing import Timing, once, print_process_warning, time_call

IMPLS = ("fa2lab", "fa2lab_tiled", "sdpa", "eager")
COLUMNS = ["impl", "N", "prefill_s", "prefill_tok_s", "attn_gflop_s", "decode_tok_s", "peak_mib",
           "prefill_vs_sdpa", "decode_vs_sdpa", "contended"]


@dataclass(frozen=True)
class ModelBench:
    """A "tiny-ish" Qwen3: big enough that attention matters at 1k-4k tokens, small enough for 2 cores."""

    hidden_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 8  # Hq
    num_key_value_heads: int = 2  # Hkv: GQA, as Qwen3
    head_dim: int = 64  # D
    intermediate_size: int = 1024
    vocab_size: int = 1024
    batch: int = 1
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    decode_steps: int = 16  # T
    rounds: int = 3  # interleaved repeats; the best is kept
    impls: tuple[str, ...] = IMPLS
    device: str = "cpu"
    dtype: str = "float32"


# Qwen3-0.6B's shape (its public config.json): 28 layers, hidden 1024, 16 query / 8 KV heads of
# 128, MLP 3072, vocabulary 151936 - about 0.6 B parameters, random weights.
GPU_BENCH = ModelBench(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936, lengths=(1024, 4096, 16384),
                       decode_steps=32, rounds=3, impls=("fa2lab", "sdpa", "eager"), device="cuda",
                       dtype="bfloat16")
NOT_MODEL = ("batch", "lengths", "decode_steps", "rounds", "impls", "device", "dtype")


def build_model(cfg: ModelBench):
    import fa2lab.hf
    from fa2lab.models.presets import tiny_qwen3_config
    from transformers import AutoModelForCausalLM

    fa2lab.hf.register()
    fa2lab.hf.register("fa2lab_tiled", backend="tiled")
    shape = {k: v for k, v in asdict(cfg).items() if k not in NOT_MODEL}
    torch.manual_seed(0)
    model_cfg = tiny_qwen3_config(max_position_embeddings=2 * max(cfg.lengths) + cfg.decode_steps, **shape)
    with torch.device(cfg.device):  # random weights drawn where they will live (seconds on a CPU for 0.6 B)
        model = AutoModelForCausalLM.from_config(model_cfg, attn_implementation="sdpa").eval()
    return model.to(cfg.device, getattr(torch, cfg.dtype))


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _once(fn, device, label) -> Timing:
    """One timed call (a round of the interleaved rounds) through fa2lab.measure.time_call."""
    _sync(device)
    return time_call(fn, device=device if torch.device(device).type == "cuda" else None, wall=True, warmup=0,
                     min_repeats=1, max_repeats=1, policy=once(), label=label)


def _prefill_seconds(model, ids) -> Timing:
    return _once(lambda: model(ids, use_cache=False, logits_to_keep=1), ids.device, f"prefill N={ids.shape[1]}")


def _decode_seconds(model, ids, steps) -> Timing:
    out = model(ids, use_cache=True, logits_to_keep=1)
    state = [out.past_key_values, out.logits[:, -1:].argmax(-1)]

    def decode():
        for _ in range(steps):
            out = model(state[1], past_key_values=state[0], use_cache=True)
            state[:] = [out.past_key_values, out.logits[:, -1:].argmax(-1)]
    return _once(decode, ids.device, f"decode {steps} steps after N={ids.shape[1]}")


def _peak_extra_bytes(fn, device) -> int | None:
    """The most memory fn() added: VmHWM on a CPU (fa2lab.measure.memory), the allocator's peak on CUDA."""
    if torch.device(device).type != "cuda":
        from fa2lab.measure import memory

        return memory.peak_extra_bytes(fn)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def decode_step_agreement(model, cfg: ModelBench, n: int) -> dict:
    """Logits of one decode step after an n-token prefill, per implementation, against "sdpa":
    max |difference|. Same-precision implementations differ by rounding; fa2lab's difference
    should be of the size of eager's (the model-level form of the error rule)."""
    ids = torch.randint(0, cfg.vocab_size, (cfg.batch, n), generator=torch.Generator().manual_seed(1)).to(cfg.device)
    logits = {}
    for impl in dict.fromkeys([*cfg.impls, "eager"]):  # eager: the size of a same-precision difference
        model.set_attn_implementation(impl)
        out = model(ids, use_cache=True, logits_to_keep=1)
        token = torch.full((cfg.batch, 1), 7, dtype=torch.long, device=cfg.device)
        logits[impl] = model(token, past_key_values=out.past_key_values, use_cache=True).logits.float()
    base = logits.get("sdpa")
    return {impl: (x - base).abs().max().item() for impl, x in logits.items() if base is not None and impl != "sdpa"}


def run(cfg: ModelBench = ModelBench(), out_csv: Path | None = None, progress=print) -> list[dict]:
    """Per length, `rounds` rounds that each time every implementation once (interleaved, so a
    burst of load from other processes hits all of them); the best round of each is kept. An
    implementation that fails at a length is reported with its error and the others go on."""
    from fa2lab.measure import memory

    memory.configure_for_timing()
    model = build_model(cfg)
    rows = []
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        model(torch.zeros(cfg.batch, 64, dtype=torch.long, device=cfg.device))  # warm-up
        if "sdpa" in cfg.impls:
            agree = decode_step_agreement(model, cfg, min(cfg.lengths))
            progress("decode-step logits, max |impl - sdpa| after a " f"{min(cfg.lengths)}-token prefill: "
                     + ", ".join(f"{k} {v:.3g}" for k, v in agree.items()))
        for n in cfg.lengths:
            ids = torch.randint(0, cfg.vocab_size, (cfg.batch, n), generator=torch.Generator().manual_seed(n))
            ids = ids.to(cfg.device)
            flops = cfg.num_hidden_layers * formula_flops(cfg.batch, cfg.num_attention_heads, n, n, cfg.head_dim,
                                                          causal=True)  # per layer 4*B*H*N*N*D / 2
            pre = {impl: float("inf") for impl in cfg.impls}
            dec, errors, unsound = dict(pre), {}, {impl: [] for impl in cfg.impls}
            for _ in range(cfg.rounds):
                for impl in cfg.impls:
                    if impl in errors:
                        continue
                    model.set_attn_implementation(impl)
                    try:
                        tp, td = _prefill_seconds(model, ids), _decode_seconds(model, ids, cfg.decode_steps)
                        pre[impl], dec[impl] = min(pre[impl], tp.median_s), min(dec[impl], td.median_s)
                        unsound[impl] += [t for t in (tp, td) if t.contended or t.throttled]
                    except Exception as exc:  # noqa: BLE001 - recorded in the row, the others go on
                        errors[impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            for impl in cfg.impls:
                if impl in errors:
                    rows.append(dict(impl=impl, N=n, prefill_s=None, prefill_tok_s=None, attn_gflop_s=None,
                                     decode_tok_s=None, peak_mib=None, error=errors[impl]))
                    progress(f"N={n:>5} {impl:<13} failed: {errors[impl]}")
                    continue
                model.set_attn_implementation(impl)
                peak = _peak_extra_bytes(lambda: model(ids, use_cache=False, logits_to_keep=1), cfg.device)
                rows.append(dict(impl=impl, N=n, prefill_s=round(pre[impl], 4),
                                 prefill_tok_s=round(cfg.batch * n / pre[impl], 1),
                                 attn_gflop_s=round(flops / pre[impl] / 1e9, 2),
                                 decode_tok_s=round(cfg.batch * cfg.decode_steps / dec[impl], 1),
                                 peak_mib=None if peak is None else round(peak / 2**20, 1),
                                 # best of rounds: a contended round only matters if it was the best
                                 contended=any(t.median_s in (pre[impl], dec[impl]) for t in unsound[impl])))
                progress(f"N={n:>5} {impl:<13} prefill {pre[impl]:7.3f} s ({rows[-1]['prefill_tok_s']:8.1f} tok/s)  "
                         f"decode {rows[-1]['decode_tok_s']:6.1f} tok/s  peak {rows[-1]['peak_mib']} MiB")
    for r in rows:
        base = next((b for b in rows if b["N"] == r["N"] and b["impl"] == "sdpa"), None)
        ok = base and base["prefill_tok_s"] and r["prefill_tok_s"]
        r["prefill_vs_sdpa"] = round(r["prefill_tok_s"] / base["prefill_tok_s"], 2) if ok else None
        r["decode_vs_sdpa"] = round(r["decode_tok_s"] / base["decode_tok_s"], 2) if ok else None
    if out_csv is not None:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        with out_csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS + ["error"], restval="")
            w.writeheader()
            w.writerows(rows)
    return rows


def layer_stack_decode(cfg: ModelBench = GPU_BENCH, n: int = 1024, steps: int = 16, rounds: int = 2) -> list[dict]:
    """fa2lab's own model layers (`fa2lab.models.FlashAttention2TransformerLayer`, cfg's shape and
    depth, random weights, no embedding or vocabulary): an n-token prefill, then `steps` one-token
    steps per cache kind, tokens/s = B * steps / t, best of `rounds`:
      SplitKCache             planned split-K decode with in-place append, one call per layer
      SplitKCache(cuda_graph) each layer's step the replay of a captured CUDA graph (DecodeSession)
      DynamicKVCache          keys grown by concatenation, split-K over the whole tensor
    The first step of each (the capture, for the graph) is left out of the timing."""
    from fa2lab.models import DynamicKVCache, FlashAttention2TransformerLayer, LayerConfig, SplitKCache

    shape = LayerConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                        intermediate_size=cfg.intermediate_size, rope_theta=1e6)
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(0)
    with torch.device(cfg.device):
        layers = [FlashAttention2TransformerLayer(shape, i).to(dtype).eval() for i in range(cfg.num_hidden_layers)]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(cfg.batch, n + steps + 1, cfg.hidden_size, generator=g) * 0.1).to(cfg.device, dtype)
    kinds = {"SplitKCache": lambda: SplitKCache(cfg.batch, n + steps + 1),
             "SplitKCache(cuda_graph)": lambda: SplitKCache(cfg.batch, n + steps + 1, cuda_graph=True),
             "DynamicKVCache": DynamicKVCache}
    if torch.device(cfg.device).type != "cuda":  # CUDA graphs: CUDA only
        del kinds["SplitKCache(cuda_graph)"]
    best = {k: float("inf") for k in kinds}
    last = {}

    def forward(h, cache):
        for layer in layers:
            h, _, cache = layer(h, past_key_value=cache, use_cache=True)
        return h, cache

    with torch.no_grad():
        for _ in range(rounds):
            for kind, make in kinds.items():
                h, cache = forward(x[:, :n], make())
                h, cache = forward(x[:, n:n + 1], cache)  # the first step (captures the graphs)

                def decode(cache=cache, kind=kind):
                    for t in range(steps):
                        h, _ = forward(x[:, n + 1 + t:n + 2 + t], cache)
                    last[kind] = h.float()
                best[kind] = min(best[kind], _once(decode, cfg.device, f"{kind} {steps} steps").median_s)
    base = last["SplitKCache"]
    return [dict(cache=k, N=n, layers=cfg.num_hidden_layers, decode_tok_s=round(cfg.batch * steps / t, 1),
                 vs_planned=round(best["SplitKCache"] / t, 2),
                 max_diff_vs_planned=float((last[k] - base).abs().max())) for k, t in best.items()]


def attention_call_cost(cfg: ModelBench = GPU_BENCH, lengths=(1024, 4096, 16384), calls: int = 500) -> list[dict]:
    """One layer's attention call as transformers makes it in a decode step (q (B, Hq, 1, D), k/v
    (B, Hkv, Nk, D), no mask), "fa2lab" against transformers' sdpa function: host microseconds
    per call (time to issue `calls` calls back to back, no sync between them) and device-bound
    microseconds per call (the same calls, synchronised at the end). The host figure is what a
    28-layer eager decode step pays 28 times."""
    import fa2lab.hf
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module(torch.nn.Module):
        is_causal, training = True, False
        num_key_value_groups = cfg.num_attention_heads // cfg.num_key_value_heads

    module, dtype, rows = Module(), getattr(torch, cfg.dtype), []
    fns = {"fa2lab": fa2lab.hf.make_attention_forward("auto"), "sdpa": sdpa_attention_forward}
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        q = torch.randn(cfg.batch, 1, cfg.num_attention_heads, cfg.head_dim, generator=g).to(cfg.device, dtype)
        q = q.transpose(1, 2)  # (B, Hq, 1, D), as the model's transpose of its projection
        k, v = (torch.randn(cfg.batch, cfg.num_key_value_heads, n, cfg.head_dim, generator=g).to(cfg.device, dtype)
                for _ in range(2))
        outs = {}
        for name, fn in fns.items():
            call = lambda: fn(module, q, k, v, None, scaling=cfg.head_dim ** -0.5)[0]  # noqa: E731
            for _ in range(20):
                call()
            _sync(cfg.device)
            t0 = time.perf_counter()
            for _ in range(calls):
                outs[name] = call()
            t_host = time.perf_counter() - t0
            _sync(cfg.device)
            t_all = time.perf_counter() - t0
            rows.append(dict(impl=name, Nk=n, host_us=round(t_host / calls * 1e6, 1),
                             synced_us=round(t_all / calls * 1e6, 1)))
        rows[-2]["max_diff_vs_sdpa"] = float((outs["fa2lab"].float() - outs["sdpa"].float()).abs().max())
    return rows


def crossover_report(cfg: ModelBench = ModelBench()) -> str:
    """Where plain attention stops beating each FA2 path at this model's head shape, measured now."""
    from fa2lab.models.selection import measure_crossover

    c = measure_crossover(head_dim=cfg.head_dim, heads=cfg.num_attention_heads, heads_kv=cfg.num_key_value_heads,
                          register=False)
    lines = [f"plain-attention crossover, causal Nq = Nk = N, D={c.head_dim}, Hq={c.heads}, Hkv={c.heads_kv} "
             f"({c.source}):", "  N:         " + " ".join(f"{n:>7}" for n in c.lengths)]
    lines += [f"  {name:<10} " + " ".join(f"{t * 1e3:7.2f}" for t in times) + "  ms"
              for name, times in c.table().items()]
    lines += [f"  plain attention is faster than {name} below N = {c.length(name)} (None: never)"
              for name in c.table() if name != "reference"]
    return "\n".join(lines)


def sizing_report() -> str:
    """The full-size Qwen3-VL-8B-class model on the meta device with fa2lab, and its attention memory."""
    from transformers import Qwen3VLForConditionalGeneration

    import fa2lab.hf
    from fa2lab.models.presets import QWEN3_VL_8B, qwen3_vl_8b_config
    from fa2lab.models.sizing import AttentionShape, memory_table

    fa2lab.hf.register()
    cfg = qwen3_vl_8b_config()
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(cfg, attn_implementation="fa2lab")
    layers = model.model.language_model.layers
    attn = layers[0].self_attn
    shape = AttentionShape.of(cfg.text_config)
    lines = [f"Qwen3-VL-8B-class on meta, attn_implementation={model.config._attn_implementation}: "
             f"{len(layers)} text layers, {attn.q_proj.out_features // attn.head_dim} query heads, "
             f"{attn.k_proj.out_features // attn.head_dim} KV heads, D={attn.head_dim}; vision "
             f"{len(model.model.visual.blocks)} blocks x {model.model.visual.blocks[0].attn.num_heads} heads; "
             f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters",
             f"  source: {QWEN3_VL_8B['source']}",
             "  kv_cache = 2 * layers * Hkv * D * 2 bytes * tokens;  naive = 2 * Hq * N^2 * 2 bytes per layer;  "
             "fa2 = Hq * N * (D * 2 + 4) bytes per layer",
             "| tokens | KV cache (bf16, B=1) | one layer's attention: naive S+P | FA2 O+LSE |", "|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['kv_cache_gib']:.2f} GiB | {r['naive_attention_gib_per_layer']:.1f} GiB | "
              f"{r['fa2_attention_gib_per_layer']:.3f} GiB |" for r in memory_table(shape)]
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = ["| N | impl | prefill tok/s | x sdpa | attn GFLOP/s | decode tok/s | x sdpa | prefill peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['N']} | {r['impl']} | {r['prefill_tok_s']} | {r['prefill_vs_sdpa']} | {r['attn_gflop_s']} | "
              f"{r['decode_tok_s']} | {r['decode_vs_sdpa']} | {r['peak_mib']} |" for r in rows]
    lines += [f"N={r['N']} {r['impl']} failed: {r['error']}" for r in rows if r.get("error")]
    lines += [f"N={r['N']} {r['impl']}: CONTENDED (other processes used the CPUs or the GPU during its best round)"
              for r in rows if r.get("contended")]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fa2lab.bench.models", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="the Qwen3-0.6B-shaped bf16 model on CUDA (GPU_BENCH)")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--impls", nargs="+", default=None, choices=IMPLS)
    p.add_argument("--steps", type=int, default=None, help="decode steps T")
    p.add_argument("--rounds", type=int, default=None, help="interleaved repeats, best kept")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=None, help="CSV (default results/models/{cpu,gpu}_models.csv)")
    p.add_argument("--call-cost", action="store_true",
                   help="only one layer's decode-step attention call: host and device microseconds, fa2lab vs sdpa")
    p.add_argument("--layer-stack", action="store_true",
                   help="only fa2lab's own layers: decode with SplitKCache, SplitKCache(cuda_graph=True), DynamicKVCache")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = GPU_BENCH if args.gpu else ModelBench()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device; none is visible (run without --gpu for the CPU model)")
    overrides = dict(lengths=tuple(args.lengths) if args.lengths else None, impls=tuple(args.impls) if args.impls
                     else None, decode_steps=args.steps, rounds=args.rounds)
    cfg = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    out = args.out or Path("results") / "models" / f"{'gpu' if args.gpu else 'cpu'}_models.csv"
    where = torch.cuda.get_device_name(0) if args.gpu else f"{torch.get_num_threads()} threads"
    print(f"fa2lab model benchmark {time.strftime('%Y-%m-%d')}: torch {torch.__version__}, {where}; {cfg}")
    if args.call_cost:
        for r in attention_call_cost(cfg, lengths=cfg.lengths):
            print(f"decode-step attention call Nk={r['Nk']:>6} {r['impl']:<7} host {r['host_us']:6.1f} us/call  "
                  f"issued and finished {r['synced_us']:6.1f} us/call"
                  + (f"  max |fa2lab - sdpa| {r['max_diff_vs_sdpa']:.3g}" if "max_diff_vs_sdpa" in r else ""))
        return 0
    if args.layer_stack:
        for r in layer_stack_decode(cfg, n=min(cfg.lengths), steps=cfg.decode_steps, rounds=cfg.rounds):
            print(f"layer stack ({r['layers']} fa2lab layers) N={r['N']} {r['cache']:<24} decode {r['decode_tok_s']:7.1f} "
                  f"tok/s  x planned {r['vs_planned']:.2f}  max |out - planned's| {r['max_diff_vs_planned']:.3g}")
        return 0
    if not args.gpu:
        print(sizing_report(), "\n")
        print(crossover_report(cfg), "\n")
    rows = run(cfg, out)
    print(markdown(rows))
    print_process_warning()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
