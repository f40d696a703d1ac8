"""The CPU scaling sweep: time and peak memory of tiled FA2, torch SDPA and naive attention.

One process, one machine, every implementation measured in the same run, so ratios are fair.
Results go to a tidy CSV, one row per (impl, mode, N), written as each finishes: a sweep that
dies keeps its rows, and running it again resumes where it stopped. Each row carries its spread
(min_s, max_s, repeats) and conditions (others_cpu, threads, contended) from fa2lab.measure.time_call.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fa2lab.cost.flops import formula_flops
from fa2lab.measure.memory import configure_for_timing, peak_extra_bytes
from fa2lab.measure.timing import TimingPolicy, time_call
from fa2lab.reference import attention_ref
from fa2lab.tiled import tiled_attention

IMPLS = {
    "tiled": lambda q, k, v, causal: tiled_attention(q, k, v, causal=causal),
    "sdpa": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    "naive": lambda q, k, v, causal: attention_ref(q, k, v, causal=causal),
}
COLUMNS = ["impl", "mode", "N", "B", "H", "D", "causal", "dtype", "seconds", "gflops", "peak_extra_mib",
           "min_s", "max_s", "repeats", "others_cpu", "threads", "contended"]


@dataclass(frozen=True)
class CpuSweep:
    ns: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    causal: bool = True
    dtype: str = "float32"
    impls: tuple[str, ...] = ("tiled", "sdpa", "naive")
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    # Naive fwd+bwd keeps ~4 fp32 (N, N) matrices per head: 8 heads at N=16384 is ~34 GB, more
    # than the 24 GiB of the development machines.
    naive_max_n: int = 8192
    budget_s: float = 2.0  # timing budget per measurement (at least 3 repeats)
    seed: int = field(default=0, compare=False)
    # fa2lab.measure.TimingPolicy fields (threshold, retries, wait_s, ...); empty: the process default
    timing: dict = field(default_factory=dict, compare=False)


def attention_flops(mode: str, b: int, h: int, n: int, d: int, causal: bool) -> float:
    # 4*B*H*N*N*D: 2 matmuls (QK^T, PV) of 2*N*N*D each, /2 causal; backward = 2.5x forward (FA2 paper)
    return formula_flops(b, h, n, n, d, causal=causal, mode=mode)


def _load_done(path: Path) -> list[dict]:
    """The rows already in `path`; a file written before the columns changed is rewritten with
    today's header (its rows keep their values, new columns stay empty)."""
    if not path.exists():
        return []
    with path.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames
    if header != COLUMNS:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        rows = [{c: r.get(c, "") for c in COLUMNS} for r in rows]
    return rows


def run_sweep(cfg: CpuSweep, out_csv: Path, progress=print) -> list[dict]:
    """Measure every (impl, mode, N) of `cfg` not already in `out_csv`; returns all rows."""
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows = _load_done(out_csv)
    done = {(r["impl"], r["mode"], int(r["N"])) for r in rows}
    dtype = getattr(torch, cfg.dtype)
    policy = TimingPolicy.from_dict(cfg.timing) if cfg.timing else None
    new_file = not out_csv.exists()
    with out_csv.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        for n in cfg.ns:
            g = torch.Generator().manual_seed(cfg.seed)
            shape = (cfg.batch, cfg.heads, n, cfg.head_dim)
            q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
            do = torch.randn(shape, generator=g).to(dtype)
            for impl in cfg.impls:
                for mode in cfg.modes:
                    if (impl, mode, n) in done or (impl == "naive" and n > cfg.naive_max_n):
                        continue
                    fn = _make_call(IMPLS[impl], q, k, v, do, cfg.causal, mode)
                    t = time_call(fn, budget_s=cfg.budget_s, policy=policy, label=f"{impl} {mode} N={n}")
                    seconds = t.median_s
                    peak = peak_extra_bytes(fn)
                    flops = attention_flops(mode, cfg.batch, cfg.heads, n, cfg.head_dim, cfg.causal)
                    row = dict(impl=impl, mode=mode, N=n, B=cfg.batch, H=cfg.heads, D=cfg.head_dim,
                               causal=cfg.causal, dtype=cfg.dtype, seconds=f"{seconds:.6g}",
                               gflops=f"{flops / seconds / 1e9:.4g}",
                               peak_extra_mib="" if peak is None else f"{peak / 2**20:.4g}",
                               min_s=f"{t.min_s:.6g}", max_s=f"{t.max_s:.6g}", repeats=t.repeats,
                               others_cpu="" if t.others_cpu is None else f"{t.others_cpu:.3f}",
                               threads=t.threads, contended=t.contended)
                    writer.writerow(row)
                    f.flush()
                    rows.append(row)
                    progress(f"{impl:>6} {mode:>8} N={n:>6}: {seconds * 1e3:9.1f} ms  "
                             f"{flops / seconds / 1e9:6.1f} GFLOP/s  peak +{row['peak_extra_mib'] or '?'} MiB"
                             + (f"  CONTENDED (others {t.others_cpu:.0%} of the CPUs)" if t.contended else ""))
    return rows


def _make_call(impl, q, k, v, do, causal, mode):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                impl(q, k, v, causal)
        return call
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def call_bwd():  # autograd.grad: no .grad buffers survive between calls
        out = impl(*leaves, causal)
        torch.autograd.grad(out, leaves, grad_outputs=do)
    return call_bwd


def is_contended(row: dict) -> bool:
    """A row's `contended` flag, as written (bool) or read back from a CSV ("True")."""
    value = row.get("contended", False)
    return value is True or str(value).lower() == "true"


TIMED_COLUMNS = {"seconds", "gflops", "ms", "us", "gb_per_s"}  # figures a contended row cannot be trusted for


def fit_exponent(rows: list[dict], impl: str, mode: str, n_min: int, n_max: int, column="peak_extra_mib"):
    """Least-squares slope of log(column) against log(N) over n_min <= N <= n_max; for a timed
    column, contended rows are left out."""
    timed = column in TIMED_COLUMNS
    pts = [(math.log(int(r["N"])), math.log(float(r[column]))) for r in rows
           if r["impl"] == impl and r["mode"] == mode and n_min <= int(r["N"]) <= n_max
           and r[column] not in ("", None) and float(r[column]) > 0 and not (timed and is_contended(r))]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def _row(rows, impl, mode, n, column):
    for r in rows:
        if r["impl"] == impl and r["mode"] == mode and int(r["N"]) == n and r[column] not in ("", None):
            return r
    return None


def _value(rows, impl, mode, n, column):
    r = _row(rows, impl, mode, n, column)
    return None if r is None else float(r[column])


def targets(rows: list[dict]) -> list[dict]:
    """The foundation issue's targets, each with its measured value (None: not measured)."""
    out = []
    t_tiled, t_sdpa = _value(rows, "tiled", "fwd", 4096, "seconds"), _value(rows, "sdpa", "fwd", 4096, "seconds")
    speed = t_sdpa / t_tiled if t_tiled and t_sdpa else None
    contended = any(is_contended(r) for r in (_row(rows, "tiled", "fwd", 4096, "seconds"),
                                              _row(rows, "sdpa", "fwd", 4096, "seconds")) if r)
    out.append(dict(target="tiled fwd speed vs SDPA at N=4096" + (" (CONTENDED: not sound)" if contended else ""),
                    goal=">= 0.5", value=speed, met=None if speed is None else speed >= 0.5))
    expo = fit_exponent(rows, "tiled", "fwd+bwd", 2048, 16384)
    out.append(dict(target="tiled fwd+bwd peak-memory exponent, N=2048..16384", goal="<= 1.1", value=expo,
                    met=None if expo is None else expo <= 1.1))
    m_t = _value(rows, "tiled", "fwd+bwd", 8192, "peak_extra_mib")
    m_n = _value(rows, "naive", "fwd+bwd", 8192, "peak_extra_mib")
    frac = m_t / m_n if m_t and m_n else None
    out.append(dict(target="tiled / naive fwd+bwd peak memory at N=8192", goal="< 0.05", value=frac,
                    met=None if frac is None else frac < 0.05))
    return out


def config_dict(cfg: CpuSweep) -> dict:
    return asdict(cfg)


def scaling_rows(ns, impls=("tiled", "sdpa", "naive"), *, mode: str = "fwd", heads: int = 4, head_dim: int = 64,
                    causal: bool = True, block: int = 256, budget_s: float = 0.2, naive_max_n: int = 4096,
                    seed: int = 0, progress=None) -> list[dict]:
    """Median time and peak extra memory of each (impl, N), fp32, B=1. Rows have the columns of
    fa2lab.bench.cpu (impl, mode, N, seconds, peak_extra_mib, gflops, with the timing's spread
    min_s, max_s, `contended` and its `timing`, a fa2lab.measure.Timing), so fit_exponent reads
    them. Sets glibc's timing thresholds (fa2lab.measure.memory.configure_for_timing) first: a
    process-wide change, as every fa2lab CPU benchmark makes (notebook 03 draws these rows)."""
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {list(IMPLS)}")
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"expected mode 'fwd' or 'fwd+bwd', got {mode!r}")
    configure_for_timing()
    calls = dict(IMPLS, tiled=lambda q, k, v, c: tiled_attention(q, k, v, causal=c, block_q=block,
                                                                 block_k=block))
    rows = []
    for n in ns:
        g = torch.Generator().manual_seed(seed)
        shape = (1, heads, n, head_dim)  # (B, H, N, D)
        q, k, v, do = (torch.randn(shape, generator=g) for _ in range(4))
        for impl in impls:
            if impl == "naive" and n > naive_max_n:
                continue
            fn = _make_call(calls[impl], q, k, v, do, causal, mode)
            t = time_call(fn, min_repeats=2, budget_s=budget_s, label=f"{impl} {mode} N={n}")
            seconds = t.median_s
            # Other threads' allocations only ever add to a peak: the smaller of two readings is the call's.
            peaks = [p for p in (peak_extra_bytes(fn), peak_extra_bytes(fn)) if p is not None]
            peak = min(peaks) if peaks else None
            flops = attention_flops(mode, 1, heads, n, head_dim, causal)
            rows.append(dict(impl=impl, mode=mode, N=n, seconds=seconds, gflops=flops / seconds / 1e9,
                             peak_extra_mib=None if peak is None else peak / 2**20, min_s=t.min_s, max_s=t.max_s,
                             contended=t.contended, timing=t))
            if progress:
                progress(f"{impl:>6} {mode} N={n}: {seconds * 1e3:.1f} ms, +{rows[-1]['peak_extra_mib']} MiB")
    return rows
