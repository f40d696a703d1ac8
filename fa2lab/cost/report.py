"""`fa2lab profile [NAME]`: a profile, its derived tile configs and a roofline table, as text."""

from __future__ import annotations

from fa2lab.cost.tiles import decode_splits, tile_config
from fa2lab.hardware.profile import HardwareProfile

ROOFLINE_NS = (512, 2048, 8192, 32768)
TOKENS = 32768  # prefill rows: batch chosen so B*N = 32k tokens, as in ANCHORS.md
PREFILL_HEADS, DECODE_HQ, DECODE_HKV = 16, 32, 8


def report_dtype(profile: HardwareProfile) -> str:
    """bf16 where the device computes it natively, else fp16, else fp32 (CPUs)."""
    for name in ("bfloat16", "float16"):
        if profile.peak_flops.get(name) or (profile.is_gpu and name in profile.peak_flops_simd):
            return name
    return "float32"


def tile_lines(profile: HardwareProfile, dtype: str, head_dims=(64, 128)) -> list[str]:
    lines = []
    for d in head_dims:
        for causal in (False, True):
            cfg = tile_config(profile, d, dtype, causal)
            extra = (f", {cfg.num_warps} warps, {cfg.num_stages} stages, {cfg.blocks_per_unit} block(s)/SM"
                     if profile.is_gpu else f", {cfg.heads_per_step} heads per step")
            lines.append(f"D={d:<4} {dtype} causal={causal!s:<5}: Br x Bc = {cfg.block_q} x {cfg.block_k}{extra}")
            if not causal:
                lines += [f"    {step}" for step in cfg.derivation]
    return lines


def roofline_rows(profile: HardwareProfile, dtype: str, d: int = 128) -> list[dict]:
    from fa2lab.cost import cpu_tiled_forward, decode, fa2_forward, formula_flops

    rows = []
    for n in ROOFLINE_NS:
        b = max(1, TOKENS // n)
        for causal in (False, True):
            r = fa2_forward(profile, b, PREFILL_HEADS, n, n, d, dtype, causal=causal)
            useful = formula_flops(b, PREFILL_HEADS, n, n, d, causal=causal)
            tiled = "-"
            if not profile.is_gpu:  # what fa2lab's eager PyTorch forward would take, step by step
                cfg = tile_config(profile, d, "float32", causal, batch_heads=b * PREFILL_HEADS, seq_len=n)
                tiled = cpu_tiled_forward(profile, b, PREFILL_HEADS, n, n, d, block_q=cfg.block_q,
                                          block_k=cfg.block_k, causal=causal).time * 1e6
            rows.append(dict(case=f"prefill {'causal' if causal else 'full'}", N=n, B=b, gflop=useful / 1e9,
                             mbytes=r.bytes / 1e6, t_compute_us=r.t_compute * 1e6, t_memory_us=r.t_memory * 1e6,
                             t_exp_us=r.t_exp * 1e6, predicted_us=r.time * 1e6, bound=r.bound,
                             rate=f"{useful / r.time / 1e12:.3g} TFLOP/s", fa2lab_tiled_us=tiled))
        splits = decode_splits(profile, 1, DECODE_HKV, n)
        r = decode(profile, 1, DECODE_HQ, DECODE_HKV, n, d, dtype, splits=splits)
        rows.append(dict(case=f"decode Hq={DECODE_HQ} Hkv={DECODE_HKV} splits={splits}", N=n, B=1,
                         gflop=r.flops / 1e9, mbytes=r.bytes / 1e6, t_compute_us=r.t_compute * 1e6,
                         t_memory_us=r.t_memory * 1e6, t_exp_us=r.t_exp * 1e6, predicted_us=r.time * 1e6,
                         bound=r.bound, rate=f"{r.bytes / r.time / 1e12:.3g} TB/s", fa2lab_tiled_us="-"))
    return rows


def render(profile: HardwareProfile) -> str:
    dtype = report_dtype(profile)
    out = [f"# {profile.name}: {profile.arch}", "", profile.describe(), "",
           "## Derived tile configs (derivation shown for the non-causal case)", *tile_lines(profile, dtype), "",
           f"## Roofline, FA2 forward, D=128, {dtype}: prefill with B*N = {TOKENS} tokens, H={PREFILL_HEADS}; "
           "decode of one token per sequence",
           "predicted = max(compute, memory, exp) + launch/step overhead; rate uses 4*B*H*N^2*D (/2 causal)"
           + ("" if profile.is_gpu else "; fa2lab_tiled_us: fa2lab.cost.roofline.cpu_tiled_forward (eager PyTorch)")]
    rows = roofline_rows(profile, dtype)
    cols = ["case", "N", "B", "gflop", "mbytes", "t_compute_us", "t_memory_us", "t_exp_us", "predicted_us",
            "bound", "rate"] + ([] if profile.is_gpu else ["fa2lab_tiled_us"])
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    out.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    out += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def cli_profile(args) -> int:
    """`fa2lab profile [NAME] [--detect [--calibrate]] [--yaml PATH]`."""
    from fa2lab.hardware import detect, get_profile, load_profile

    if args.yaml is not None:
        try:
            profile = load_profile(args.yaml)
        except ValueError as exc:
            print(f"fa2lab profile: {exc}")
            return 2
    elif args.name and not args.detect:
        try:
            profile = get_profile(args.name)
        except ValueError as exc:
            print(f"fa2lab profile: {exc}")
            return 2
    else:
        profile = detect(calibrate=args.calibrate)
    print(render(profile))
    return 0
