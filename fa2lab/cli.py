"""Command line: `python -m fa2lab run` (the main job), sweeps, reports and benchmarks (`--help` lists them)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from fa2lab import _checks
from fa2lab.bench import cpu
from fa2lab.measure import memory
from fa2lab.measure.exactness import within_torch_error
from fa2lab.sweep.spec import REPO

EXPERIMENTS = REPO / "experiments"


def _load_sweep(path: Path, ns: list[int] | None) -> cpu.CpuSweep:
    try:
        spec = _checks.read_yaml_mapping(path, "benchmark config")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    known = set(cpu.CpuSweep.__dataclass_fields__)
    unknown = set(spec) - known
    if unknown:
        raise SystemExit(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    if ns:
        spec["ns"] = tuple(ns)
    return cpu.CpuSweep(**spec)


def _machine() -> dict:
    return dict(date=time.strftime("%Y-%m-%d"), python=platform.python_version(), torch=torch.__version__,
                machine=platform.machine(), processor=platform.processor() or "unknown",
                threads=torch.get_num_threads())


def _print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(widths[c]) for c in columns))


def _fmt(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def cmd_sweep(args, config: Path, out: Path, with_check: bool) -> int:
    memory.configure_for_timing()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _load_sweep(config, args.ns)
    out.mkdir(parents=True, exist_ok=True)
    info = dict(_machine(), config=str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
                sweep=cpu.config_dict(cfg))
    (out / "run.json").write_text(json.dumps(info, indent=2))
    print(f"fa2lab {args.command}: {info['date']} torch {info['torch']} threads {info['threads']} -> {out}")
    if with_check:
        from fa2lab.bench.check import correctness_rows
        rows = correctness_rows()
        print("\nExactness against the float64 oracle (ratio = error / PyTorch's own same-dtype error):")
        _print_table(rows, ["case", "dtype", "backend", "max_abs_err", "torch_same_dtype_err", "ratio"])
        (out / "correctness.json").write_text(json.dumps(rows, indent=2))
        bad = [r for r in rows if not within_torch_error(r["max_abs_err"], r["torch_same_dtype_err"], floor=1e-6)]
        if bad:
            print(f"FAILED: {len(bad)} results exceed 2x PyTorch's own error")
            return 1
    print("\nTiming and peak extra memory (results resume from", out / "sweep.csv", "if present):")
    rows = cpu.run_sweep(cfg, out / "sweep.csv")
    tg = cpu.targets(rows)
    (out / "targets.json").write_text(json.dumps(tg, indent=2))
    print("\nTargets of the foundation issue (None: not measured by this sweep):")
    _print_table(tg, ["target", "goal", "value", "met"])
    from fa2lab.measure.timing import TimingPolicy, default_policy

    _print_conditions(rows, (TimingPolicy.from_dict(cfg.timing) if cfg.timing else default_policy()).threshold)
    return 0


def _print_conditions(rows: list[dict], threshold: float = 0.10) -> None:
    """The contention warning over a CPU sweep's rows, resumed ones included (fa2lab.measure)."""
    from fa2lab.bench.cpu import is_contended
    from fa2lab.measure.timing import warning_text

    timed = [r for r in rows if r.get("contended") not in (None, "")]
    shares = [float(r["others_cpu"]) for r in timed if is_contended(r) and r.get("others_cpu") not in (None, "")]
    text = warning_text(len(timed), sum(is_contended(r) for r in timed), worst_share=max(shares, default=None),
                        threshold=threshold)
    if text:
        print("\n" + text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fa2lab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "main job: exactness check + a small CPU sweep (experiments/smoke.yaml)"),
                        ("bench-cpu", "full CPU scaling benchmark (experiments/cpu_scaling.yaml)")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", type=Path, default=None, help="sweep YAML (fields of fa2lab.bench.cpu.CpuSweep)")
        s.add_argument("--out", type=Path, default=None, help="results folder (resumes if it holds a sweep.csv)")
        s.add_argument("--ns", type=int, nargs="+", default=None, help="override the sequence lengths")
        s.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    d = sub.add_parser("bench-decode", help="decode latency vs cache length: split-K vs torch SDPA")
    d.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    d.add_argument("--out", type=Path, default=REPO / "results" / "decode" / "decode.csv")
    pr = sub.add_parser("profile", help="a hardware profile: its numbers, derived tiles, roofline table")
    pr.add_argument("name", nargs="?", default=None, help="built-in profile (default: this machine, as --detect)")
    pr.add_argument("--detect", action="store_true", help="profile this machine (CUDA properties or CPU caches)")
    pr.add_argument("--calibrate", action="store_true", help="with --detect on a CPU: measure its rates (~10 s)")
    pr.add_argument("--yaml", type=Path, default=None, help="a user profile (fa2lab.hardware.load_profile)")
    bt = sub.add_parser("bench-tiles", help="tiled forward over tile sizes on this CPU: predicted vs measured")
    bt.add_argument("--config", type=Path, default=EXPERIMENTS / "tile_sweep.yaml",
                    help="sweep YAML (fields of fa2lab.bench.tiles.TileSweep)")
    bt.add_argument("--ns", type=int, nargs="+", default=None, help="override the sequence lengths")
    bt.add_argument("--tiles", type=int, nargs="+", default=None, help="override the tile sizes")
    bt.add_argument("--out", type=Path, default=REPO / "results" / "tiles")
    bt.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    # GPU benchmarks keep their own options: everything after the subcommand is passed through.
    g = sub.add_parser("bench", add_help=False, help="GPU: Triton kernels vs SDPA backends and FlexAttention "
                       "(python -m fa2lab.bench.gpu; options: --quick --no-bwd --only fwd|decode --out DIR)")
    r = sub.add_parser("bench-ring", add_help=False, help="ring attention vs one device (python -m fa2lab.bench.ring; "
                       "options: --world --lengths --causal --device cpu|cuda --dtype)")
    from fa2lab.sweep.cli import add_parsers as add_sweep_parsers

    add_sweep_parsers(sub)
    args, rest = p.parse_known_args(argv)
    if rest and args.command not in ("bench", "bench-ring"):
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in ("bench", "bench-ring"):
        args.rest = rest
    if args.command in ("sweep", "report"):
        from fa2lab.sweep.cli import cli_report, cli_sweep

        return cli_sweep(args) if args.command == "sweep" else cli_report(args)
    if args.command == "bench":
        if not torch.cuda.is_available():
            raise SystemExit("fa2lab bench times GPU kernels and needs a CUDA device; none is visible here. "
                             "On a CPU use `fa2lab bench-cpu`, `fa2lab bench-decode` or `fa2lab bench-tiles`.")
        from fa2lab.bench import gpu

        return gpu.main(args.rest)
    if args.command == "bench-ring":
        from fa2lab.bench import ring

        return ring.main(args.rest)
    if args.command == "profile":
        from fa2lab.cost.report import cli_profile

        return cli_profile(args)
    if args.command == "bench-tiles":
        from fa2lab.bench.tiles import cli_bench_tiles

        return cli_bench_tiles(args)
    if args.command == "bench-decode":
        from fa2lab.bench import decode
        from fa2lab.measure.timing import print_process_warning

        print(f"fa2lab bench-decode: {_machine()}")
        decode.run(lengths=tuple(args.lengths), out_csv=args.out)
        print_process_warning()
        return 0
    stem = "smoke" if args.command == "run" else "cpu_scaling"
    config = args.config or EXPERIMENTS / f"{stem}.yaml"
    out = args.out or REPO / "results" / stem
    return cmd_sweep(args, config, out, with_check=args.command == "run")


if __name__ == "__main__":
    sys.exit(main())
