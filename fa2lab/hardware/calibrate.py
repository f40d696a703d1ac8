"""Measure a CPU's rates on the spot (~10 s), for `detect(calibrate=True)`.

Roofline ceilings, each from the smallest experiment that isolates it:

    peak_flops_simd  fp32 GEMM, 1024^3 (torch.mm)                     -> FLOP/s
    exp_per_s        torch.exp over 64Ki floats (256 KiB), cache-resident
    mem_bw           copy of a 256 MiB tensor, bytes read + written
    fault_s_per_byte filling a fresh 64 MiB tensor minus refilling an old one, per byte

The step model of fa2lab's tiled forward (fa2lab.cost.roofline.cpu_tiled_forward), from tiled
runs that are NOT the ones it is later checked against (those are causal, over several N):

    step_overhead_s, score_s, row_s  least-squares fit to NON-causal runs, N=2048, D=64, `heads`
                     heads, tiles 32-512: time = steps x overhead + scores x score_s
                     + accumulator elements rescaled (Br x Dv per step) x row_s
    mask_s           a causal run, N=1024, tiles 512 (2 of its 3 tiles partial): what is left
                     after the two terms above, per partial-tile score
    spill_factor     one head per core, non-causal, tiles 1024 vs 512: per-score cost ratio when
                     the per-core working set (4 MiB) outgrows L2

All timings go through `quiet_median_seconds` (fa2lab.measure.time_call with a patient policy),
which repeats a measurement that another process disturbed (on a 2-core machine a concurrent test
run halves it); the sources of a calibrated profile say when one stayed contended.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from fa2lab.hardware.profile import HardwareProfile
from fa2lab.measure.conditions import others_share, wait_for_quiet  # noqa: F401 - re-exported
from fa2lab.measure.timing import TimingPolicy, process_warning, recent, time_call

QUIET_LIMIT = 0.1  # share of the CPUs other processes may use during a measurement


# Calibration needs quiet measurements more than quick ones: long waits, many tries.
POLICY = TimingPolicy(threshold=QUIET_LIMIT, retries=5, wait_s=2.0)


def quiet_median_seconds(fn, *, budget_s: float, progress=None, with_share: bool = False):
    """The median of fn() by fa2lab.measure.time_call under calibration's policy (POLICY: retried
    after 2, 4, 8, 16, 32 s while others use >= 10% of the CPUs, then kept and marked
    contended). With `with_share`, returns (seconds, share of the CPUs others used meanwhile)."""
    t = time_call(fn, budget_s=budget_s, policy=POLICY, progress=progress, label="calibrate")
    return (t.median_s, t.others_cpu or 0.0) if with_share else t.median_s


def _stamp(what: str, conditions: str = "") -> str:
    threads = torch.get_num_threads()
    return f"measured {time.strftime('%Y-%m-%d')} by fa2lab.hardware.calibrate ({what}), {threads} threads{conditions}"


def _conditions(timings) -> str:
    """', others used <= X% of the CPUs', or the contention warning when a timing stayed contended."""
    shares = [t.others_cpu for t in timings if t.others_cpu is not None]
    text = f", other processes used <= {max(shares):.0%} of the CPUs" if shares else ""
    warning = process_warning(timings)
    return text + (f"; {warning}" if warning else "")


def gemm_flops(n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2.0 * n**3 / quiet_median_seconds(lambda: torch.mm(a, b), budget_s=0.5)


def exp_rate(numel: int = 64 * 1024, inner: int = 100) -> float:
    x, y = torch.rand(numel) - 0.5, torch.empty(numel)

    def run():
        for _ in range(inner):
            torch.exp(x, out=y)
    return numel * inner / quiet_median_seconds(run, budget_s=0.3)


def copy_bandwidth(nbytes: int = 256 * 2**20) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2.0 * nbytes / quiet_median_seconds(lambda: dst.copy_(src), budget_s=0.5)


def _tiled_seconds(heads: int, n: int, d: int, tile: int, causal: bool = False) -> float:
    from fa2lab.tiled import tiled_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=g) for _ in range(3))  # (B, H, N, D)

    def run():
        with torch.no_grad():
            tiled_attention(q, k, v, causal=causal, block_q=tile, block_k=tile)
    return quiet_median_seconds(run, budget_s=0.5)


def fault_cost(nbytes: int = 64 * 2**20) -> float:
    """Seconds per byte of first-touching memory that glibc maps fresh (allocations >= 32 MiB)."""
    from fa2lab.measure.memory import configure_for_timing

    configure_for_timing()
    old = torch.empty(nbytes // 4)
    fresh = quiet_median_seconds(lambda: torch.empty(nbytes // 4).fill_(1.0), budget_s=0.3)
    reuse = quiet_median_seconds(lambda: old.fill_(1.0), budget_s=0.3)
    return max(0.0, fresh - reuse) / nbytes


def step_model(heads: int, d: int = 64, n: int = 2048, tiles=(32, 64, 128, 256, 512)) -> tuple[float, float, float]:
    """(step overhead, seconds per score, seconds per accumulator element) fitted by least squares
    to non-causal runs that differ only in tile size T:

        time_T = (n/T)^2 x overhead + heads*n^2 x score + heads*n*d*(n/T) x row
    """
    cols, ys = [], []
    for t in tiles:
        steps = (n // t) ** 2
        cols.append([steps, heads * n * n, heads * n * d * (n // t)])
        ys.append(_tiled_seconds(heads, n, d, t))
    a = torch.tensor(cols, dtype=torch.float64)
    scale = a.abs().amax(dim=0)  # columns differ by 10^6: solve in normalised units
    x = torch.linalg.lstsq(a / scale, torch.tensor(ys, dtype=torch.float64)[:, None]).solution[:, 0] / scale
    overhead, score, row = (max(0.0, float(v)) for v in x)
    return overhead, max(score, 1e-12), row


def mask_cost(heads: int, overhead: float, score: float, row: float, d: int = 64, n: int = 1024,
              tile: int = 512) -> float:
    from fa2lab.tiled.schedule import tile_schedule

    sched = tile_schedule(n, n, tile, tile, causal=True)
    seconds = _tiled_seconds(heads, n, d, tile, causal=True)
    rest = (seconds - sched.computed * overhead - heads * sched.computed_elements * score
            - heads * sched.q_rows * d * row)
    return max(0.0, rest / (heads * sched.partial_elements))


def spill_ratio(units: int, overhead: float, d: int = 64, fit: int = 512, spilled: int = 1024) -> float:
    """Per-score cost at `spilled` tiles over that at `fit` tiles, one head per core, N = 2 tiles."""
    def per_score(tile):
        n = 2 * tile
        return (_tiled_seconds(units, n, d, tile) - 4 * overhead) / (units * n * n)
    return max(1.0, per_score(spilled) / per_score(fit))


def calibrate_cpu(profile: HardwareProfile, heads: int | None = None) -> HardwareProfile:
    """`profile` with its rates replaced by measurements on this machine; `heads` (B*Hq per
    step, default one per core) sets the regime of the step-model runs."""
    heads = heads or profile.units
    before = len(recent())
    flops, exps, bw, fault = gemm_flops(), exp_rate(), copy_bandwidth(), fault_cost()
    overhead, score, row = step_model(heads)
    mask = mask_cost(heads, overhead, score, row)
    spill = spill_ratio(profile.units, overhead)
    conditions = _conditions(recent()[before:])  # every source carries the conditions of this calibration

    def stamp(what):
        return _stamp(what, conditions)

    sources = dict(profile.sources,
                   peak_flops_simd=stamp("fp32 torch.mm 1024^3; float64 assumed half"),
                   exp_per_s=stamp("torch.exp over 64Ki floats, out="),
                   mem_bw=stamp("copy of 256 MiB, bytes read + written"),
                   fault_s_per_byte=stamp("fill of a fresh 64 MiB tensor minus a refill, per byte"),
                   step_overhead_s=stamp(f"fit to tiled forwards, {heads} heads, N=2048, D=64, non-causal, "
                                         "tiles 32-512, least squares"),
                   score_s=stamp("the same fit"), row_s=stamp("the same fit"),
                   mask_s=stamp(f"tiled forward, {heads} heads, N=1024, causal, tiles 512, after the fit"),
                   spill_factor=stamp(f"{profile.units} heads, tiles 1024 vs 512, N = 2 tiles, per score"))
    return dataclasses.replace(
        profile, name=profile.name.replace("detected", "calibrated"),
        peak_flops_simd={"float32": flops, "float64": flops / 2}, exp_per_s=exps, mem_bw=bw,
        step_overhead_s=overhead, score_s=score, row_s=row, mask_s=mask, spill_factor=spill,
        fault_s_per_byte=fault,
        sources=sources)
