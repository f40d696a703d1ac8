"""Model-level CPU benchmark: a small Qwen3-shaped model (random weights) with transformers'
attn_implementation "fa2lab" (auto), "fa2lab_tiled" (the PyTorch FA2), "sdpa" and "eager".

    prefill tokens/s = B * N / t_prefill                     one forward over an N-token prompt
    decode tokens/s  = B * T / t(T steps)                    T single-token steps on a DynamicCache
    attention flops  = 4 * layers * B * Hq * N * N * D / 2   prefill, causal (half the scores)
    peak MiB         = the most memory a prefill added (fa2lab.bench.memory.peak_extra_bytes)

Ratios are against "sdpa" measured in the same run. Run: python -m fa2lab.bench.models
(needs transformers: pip install -e ".[hf]"). Importing this module changes no global state.
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

IMPLS = ("fa2lab", "fa2lab_tiled", "sdpa", "eager")
COLUMNS = ["impl", "N", "prefill_s", "prefill_tok_s", "attn_gflop_s", "decode_tok_s", "peak_mib",
           "prefill_vs_sdpa", "decode_vs_sdpa"]


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


def build_model(cfg: ModelBench):
    import fa2lab.hf
    from fa2lab.models.presets import tiny_qwen3_config
    from transformers import AutoModelForCausalLM

    fa2lab.hf.register()
    fa2lab.hf.register("fa2lab_tiled", backend="tiled")
    shape = {k: v for k, v in asdict(cfg).items() if k not in ("batch", "lengths", "decode_steps", "rounds", "impls")}
    torch.manual_seed(0)
    model_cfg = tiny_qwen3_config(max_position_embeddings=2 * max(cfg.lengths) + cfg.decode_steps, **shape)
    return AutoModelForCausalLM.from_config(model_cfg, attn_implementation="sdpa").eval()


def _prefill_seconds(model, ids) -> float:
    t0 = time.perf_counter()
    model(ids, use_cache=False)
    return time.perf_counter() - t0


def _decode_seconds(model, ids, steps) -> float:
    out = model(ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t0


def run(cfg: ModelBench = ModelBench(), out_csv: Path | None = None, progress=print) -> list[dict]:
    """Per length, `rounds` rounds that each time every implementation once (interleaved, so a
    burst of load from other processes hits all of them); the best round of each is kept."""
    from fa2lab.bench import memory

    memory.configure_for_timing()
    model = build_model(cfg)
    rows = []
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        model(torch.zeros(cfg.batch, 64, dtype=torch.long))  # warm-up
        for n in cfg.lengths:
            ids = torch.randint(0, cfg.vocab_size, (cfg.batch, n), generator=torch.Generator().manual_seed(n))
            flops = 4 * cfg.num_hidden_layers * cfg.batch * cfg.num_attention_heads * n * n * cfg.head_dim / 2
            pre = {impl: float("inf") for impl in cfg.impls}
            dec = dict(pre)
            for _ in range(cfg.rounds):
                for impl in cfg.impls:
                    model.set_attn_implementation(impl)
                    pre[impl] = min(pre[impl], _prefill_seconds(model, ids))
                    dec[impl] = min(dec[impl], _decode_seconds(model, ids, cfg.decode_steps))
            for impl in cfg.impls:
                model.set_attn_implementation(impl)
                peak = memory.peak_extra_bytes(lambda: model(ids, use_cache=False))
                rows.append(dict(impl=impl, N=n, prefill_s=round(pre[impl], 3),
                                 prefill_tok_s=round(cfg.batch * n / pre[impl], 1),
                                 attn_gflop_s=round(flops / pre[impl] / 1e9, 2),
                                 decode_tok_s=round(cfg.batch * cfg.decode_steps / dec[impl], 1),
                                 peak_mib=None if peak is None else round(peak / 2**20, 1)))
                progress(f"N={n:>5} {impl:<13} prefill {pre[impl]:7.3f} s ({rows[-1]['prefill_tok_s']:8.1f} tok/s)  "
                         f"decode {rows[-1]['decode_tok_s']:6.1f} tok/s  peak {rows[-1]['peak_mib']} MiB")
    for r in rows:
        base = next((b for b in rows if b["N"] == r["N"] and b["impl"] == "sdpa"), None)
        r["prefill_vs_sdpa"] = round(r["prefill_tok_s"] / base["prefill_tok_s"], 2) if base else None
        r["decode_vs_sdpa"] = round(r["decode_tok_s"] / base["decode_tok_s"], 2) if base else None
    if out_csv is not None:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        with out_csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
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
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fa2lab.bench.models", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(ModelBench.lengths))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--steps", type=int, default=ModelBench.decode_steps, help="decode steps T")
    p.add_argument("--rounds", type=int, default=ModelBench.rounds, help="interleaved repeats, best kept")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=Path("results") / "models" / "cpu_models.csv")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelBench(lengths=tuple(args.lengths), impls=tuple(args.impls), decode_steps=args.steps,
                     rounds=args.rounds)
    print(f"fa2lab model benchmark {time.strftime('%Y-%m-%d')}: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {cfg}")
    print(sizing_report(), "\n")
    print(crossover_report(cfg), "\n")
    rows = run(cfg, args.out)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
