"""Predicted vs measured: fa2lab's tiled forward on this CPU over tile sizes and lengths (issue 4,
section 3).

For every (N, tile) the sweep measures the median time and the peak extra memory of the tiled
forward and sets them against three predictions:

    roofline_ms  max(FLOPs / GEMM peak, bytes / DRAM bandwidth, exps / exp rate): a lower bound
    model_ms     fa2lab.cost.roofline.cpu_tiled_forward: steps x step overhead + scores x cost per
                 score (+ partial-tile masking, cache spill, page faults of huge score tiles), with
                 constants that fa2lab.hardware.calibrate measures on other runs than these
                 (non-causal, N=2048 / 1024)
    model_mib    fa2lab.cost.memory.peak_extra_bytes("tiled_cpu", ...)

and, per N, compares the tile the profile picks (`fa2lab.cost.tile_config`) with the sweep's fastest.
Ratios are measured / predicted. All timings of a sweep come from one process, in one run; each
is timed by fa2lab.measure.time_call under calibration's patient policy: repeated when another
process took more than 10% of the CPUs meanwhile (`others_cpu` is the share during the kept
measurement, `contended` says it stayed above that).
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fa2lab.cost.flops import executed_flops, formula_flops
from fa2lab.cost.memory import peak_extra_bytes as model_peak_bytes
from fa2lab.cost.roofline import cpu_tiled_forward
from fa2lab.cost.tiles import tile_config
from fa2lab.cost.traffic import fa2_forward_bytes
from fa2lab.hardware.calibrate import POLICY, QUIET_LIMIT
from fa2lab.hardware.profile import HardwareProfile
from fa2lab.measure.conditions import wait_for_quiet
from fa2lab.measure.memory import configure_for_timing, peak_extra_bytes
from fa2lab.measure.timing import print_process_warning, time_call
from fa2lab.tiled import tiled_attention
from fa2lab.tiled.schedule import tile_schedule

COLUMNS = ["N", "tile", "steps", "measured_ms", "model_ms", "ratio", "roofline_ms", "roofline_ratio",
           "gflops", "measured_mib", "model_mib", "mem_ratio", "min_ms", "max_ms", "repeats", "others_cpu",
           "contended"]


@dataclass(frozen=True)
class TileSweep:
    ns: tuple[int, ...] = (1024, 2048, 4096, 8192)
    tiles: tuple[int, ...] = (64, 128, 256, 512, 1024)
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    causal: bool = True
    dtype: str = "float32"
    budget_s: float = 0.6  # timing budget per (N, tile): median of >= 3 runs after a warm-up
    seed: int = field(default=0, compare=False)


def run_tile_sweep(cfg: TileSweep, profile: HardwareProfile, progress=print) -> dict:
    """Measure every (N, tile) of `cfg`; returns {"rows": [...], "choices": [...]}."""
    configure_for_timing()
    dtype = getattr(torch, cfg.dtype)
    rows, choices = [], []
    for n in cfg.ns:
        g = torch.Generator().manual_seed(cfg.seed)
        shape = (cfg.batch, cfg.heads, n, cfg.head_dim)  # (B, H, N, D)
        q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
        for tile in cfg.tiles:
            if tile > n:
                continue
            rows.append(_measure(cfg, profile, q, k, v, n, tile))
            r = rows[-1]
            progress(f"N={n:>6} tile={tile:>5}: {r['measured_ms']:9.1f} ms (model {r['model_ms']:8.1f}, "
                     f"x{r['ratio']:.2f})  {r['gflops']:6.1f} GFLOP/s  +{r['measured_mib']:.1f} MiB "
                     f"(model {r['model_mib']:.1f})")
    rows = _remeasure_disturbed(cfg, profile, rows, dtype, progress)
    choices = [_choice(cfg, profile, n, [r for r in rows if r["N"] == n]) for n in cfg.ns]
    return {"rows": rows, "choices": choices}


def _remeasure_disturbed(cfg, profile, rows, dtype, progress) -> list[dict]:
    """Measure again, once the machine is quiet, every row that another process disturbed."""
    out = []
    for r in rows:
        if r["contended"] and wait_for_quiet(QUIET_LIMIT, max_wait_s=300, progress=progress):
            g = torch.Generator().manual_seed(cfg.seed)
            shape = (cfg.batch, cfg.heads, r["N"], cfg.head_dim)  # (B, H, N, D)
            q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
            r = _measure(cfg, profile, q, k, v, r["N"], r["tile"])
            progress(f"N={r['N']:>6} tile={r['tile']:>5}: measured again, {r['measured_ms']:9.1f} ms "
                     f"(model {r['model_ms']:8.1f}, x{r['ratio']:.2f}), others used {r['others_cpu']:.0%}")
        out.append(r)
    return out


def _measure(cfg, profile, q, k, v, n, tile) -> dict:
    def run():
        with torch.no_grad():
            tiled_attention(q, k, v, causal=cfg.causal, block_q=tile, block_k=tile)

    t = time_call(run, budget_s=cfg.budget_s, policy=POLICY, progress=print, label=f"N={n} tile={tile}")
    peak = peak_extra_bytes(run)
    row = dict(N=n, tile=tile, measured_ms=t.median_s * 1e3, min_ms=t.min_s * 1e3, max_ms=t.max_s * 1e3,
               repeats=t.repeats, measured_mib=(peak or 0) / 2**20, others_cpu=t.others_cpu or 0.0,
               contended=t.contended)
    return predict(cfg, profile, row)


def predict(cfg, profile, row: dict) -> dict:
    """Add the predictions and ratios to a row holding N, tile, measured_ms and measured_mib."""
    n, tile, seconds = row["N"], row["tile"], row["measured_ms"] / 1e3
    b, h, d = cfg.batch, cfg.heads, cfg.head_dim
    model = cpu_tiled_forward(profile, b, h, n, n, d, block_q=tile, block_k=tile, causal=cfg.causal)
    # Lower bound: the work the tiles do at the measured GEMM peak, the exps, FA2's DRAM bytes.
    sched = tile_schedule(n, n, tile, tile, cfg.causal)
    flops = executed_flops(b, h, n, n, d, block_q=tile, block_k=tile, causal=cfg.causal)
    roof = max(flops / profile.flops("float32", False),
               fa2_forward_bytes(sched, b, h, d, elem=4).total / profile.mem_bw,
               b * h * sched.computed_elements / profile.exp_per_s if profile.exp_per_s else 0.0)
    elem = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    mem_model = model_peak_bytes("tiled_cpu", b, h, n, n, d, elem=elem, block_q=tile, block_k=tile)
    mib = row["measured_mib"]
    return dict(row, steps=sched.computed, model_ms=model.time * 1e3, ratio=seconds / model.time,
                roofline_ms=roof * 1e3, roofline_ratio=seconds / roof,
                gflops=formula_flops(b, h, n, n, d, causal=cfg.causal) / seconds / 1e9,
                model_mib=mem_model / 2**20, mem_ratio=mib * 2**20 / mem_model if mib else float("nan"))


def _choice(cfg, profile, n, rows) -> dict:
    cfg_tile = tile_config(profile, cfg.head_dim, cfg.dtype, cfg.causal, batch_heads=cfg.batch * cfg.heads,
                                   seq_len=n)
    best = min(rows, key=lambda r: r["measured_ms"])
    model_best = min(rows, key=lambda r: r["model_ms"])
    chosen = next((r for r in rows if r["tile"] == cfg_tile.block_q), None)
    ratio = chosen["measured_ms"] / best["measured_ms"] if chosen else None
    return dict(N=n, profile_tile=cfg_tile.block_q, best_tile=best["tile"], model_best_tile=model_best["tile"],
                chosen_ms=chosen["measured_ms"] if chosen else None, best_ms=best["measured_ms"],
                chosen_over_best=ratio, within_10pct=None if ratio is None else ratio <= 1.10,
                derivation=list(cfg_tile.derivation))


def write_results(result: dict, cfg: TileSweep, profile: HardwareProfile, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "tiles.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in result["rows"]:
            writer.writerow({c: (f"{r[c]:.4g}" if isinstance(r[c], float) else r[c]) for c in COLUMNS})
    import json

    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                threads=torch.get_num_threads(), sweep=asdict(cfg), choices=result["choices"],
                profile={k: v for k, v in asdict(profile).items()})
    (out / "tiles.json").write_text(json.dumps(meta, indent=2, default=str))


def load_sweep(path: Path | None, ns=None, tiles=None) -> TileSweep:
    from fa2lab import _checks

    try:
        spec = _checks.read_yaml_mapping(path, "tile-sweep config") if path else {}
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    known = set(TileSweep.__dataclass_fields__)
    if set(spec) - known:
        raise SystemExit(f"{path}: unknown keys {sorted(set(spec) - known)}; known: {sorted(known)}")
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    if ns:
        spec["ns"] = tuple(ns)
    if tiles:
        spec["tiles"] = tuple(tiles)
    return TileSweep(**spec)


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(x):
        return f"{x:.3g}" if isinstance(x, float) else str(x)
    widths = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(widths[c]) for c in columns))


def cli_bench_tiles(args) -> int:
    """`fa2lab bench-tiles`: calibrate this CPU, sweep tiles x N, print predicted vs measured."""
    from fa2lab.hardware import detect

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_sweep(args.config, args.ns, args.tiles)
    if not wait_for_quiet(progress=print):
        print("fa2lab bench-tiles: the machine stayed busy for 10 minutes; timings would be meaningless")
        return 2
    t0 = time.perf_counter()
    profile = detect(calibrate=True, heads=cfg.batch * cfg.heads)
    if profile.is_gpu:
        print("fa2lab bench-tiles: this benchmark times the CPU tiled backend; the GPU one waits for the "
              "Triton kernels (issue 4, section 3)")
        return 2
    print(f"fa2lab bench-tiles: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; calibrated in {time.perf_counter() - t0:.1f} s:")
    print(f"  GEMM {profile.peak_flops_simd['float32'] / 1e9:.1f} GFLOP/s, exp {profile.exp_per_s / 1e9:.2f} G/s, "
          f"copy {profile.mem_bw / 1e9:.1f} GB/s, step overhead {profile.step_overhead_s * 1e6:.1f} us, "
          f"score {profile.score_s * 1e9:.2f} ns, acc row {profile.row_s * 1e9:.2f} ns, "
          f"mask {profile.mask_s * 1e9:.2f} ns, "
          f"spill x{profile.spill_factor:.2f}, fault {profile.fault_s_per_byte * 2**30:.2f} s/GiB, "
          f"L2/core {profile.smem_per_block // 1024} KiB")
    print(f"sweep: B={cfg.batch} H={cfg.heads} D={cfg.head_dim} causal={cfg.causal} {cfg.dtype}, "
          f"N {list(cfg.ns)}, tiles {list(cfg.tiles)} (Br = Bc)")
    result = run_tile_sweep(cfg, profile)
    print("\nPredicted vs measured (ratio = measured / predicted; roofline is a lower bound):")
    print_table(result["rows"], COLUMNS)
    print("\nThe profile's tile vs the sweep's fastest (target: chosen within 10% of best):")
    print_table(result["choices"], ["N", "profile_tile", "model_best_tile", "best_tile", "chosen_ms", "best_ms",
                                    "chosen_over_best", "within_10pct"])
    write_results(result, cfg, profile, args.out)
    print(f"\nwritten to {args.out}/tiles.csv and tiles.json; total {time.perf_counter() - t0:.0f} s")
    print_process_warning()
    return 0 if all(c["within_10pct"] for c in result["choices"]) else 1


def cpu_tile_rows(ns=(512, 1024), tiles=(64, 128, 256), *, heads: int = 4, head_dim: int = 64,
                      causal: bool = True, profile=None, budget_s: float = 0.1) -> list[dict]:
    """fa2lab's tiled forward on this CPU at each (N, tile), next to the cost model's prediction
    (fa2lab.cost.roofline.cpu_tiled_forward with `profile`, default fa2lab.hardware.detect()):
    rows for fa2lab.viz.hardware.predicted_vs_measured_figure (notebook 06)."""
    from fa2lab.hardware import detect

    profile = profile or detect()
    rows = []
    for n in ns:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3))  # (B, H, N, D)
        for t in tiles:
            with torch.no_grad():
                tm = time_call(lambda: tiled_attention(q, k, v, causal=causal, block_q=t, block_k=t),
                               min_repeats=2, budget_s=budget_s, label=f"N={n} tile={t}")
            model = cpu_tiled_forward(profile, 1, heads, n, n, head_dim, block_q=t, block_k=t, causal=causal)
            rows.append(dict(label=f"N={n} tile={t}" + (" (contended)" if tm.contended else ""), group=f"tile {t}",
                             measured_s=tm.median_s, predicted_s=model.time, contended=tm.contended))
    return rows
