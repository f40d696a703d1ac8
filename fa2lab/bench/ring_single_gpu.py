"""What one GPU can say about a ring of W: the figures issue 19's ratios need, in one process.

    python -m fa2lab.bench.ring_single_gpu [--out DIR] [--n 131072]

In order of importance (each part's rows are written as soon as measured, as JSON lines):

1. numerics  a W = 8 ring simulated on this GPU (`simulate_ring_grads`: threads, exact hops, the
             real kernels), dK/dV travelling in fp32 and in bf16, against float64, next to one
             device's error (`bench.ring_check.simulate_check`; B=1 Hq=8 Hkv=2 D=128, N=8192)
2. memory    peak `max_memory_allocated` of causal fwd+bwd: one device on the whole sequence
             (`fa2lab.attention(backend="triton")`) and one rank of a W ring alone
             (`simulate.LoopbackRing`: it allocates every buffer of a real rank), W = 2, 4, 8,
             at three lengths; bytes per (local) token from the least-squares slope
3. time      fwd+bwd at N (default 128k), causal and full: one device on the whole sequence, and
             one rank of a W ring alone (its compute, hops as local copies): W x single / rank is
             the speedup a ring could reach if communication were free (an upper bound)

Shape B=1, Hq=32, Hkv=8, D=128, bf16 (parts 2, 3). Wall clock around a synchronised call.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fa2lab.bench.ring_memory import SHAPE, _inputs, _peak, fit


def _emit(out, row):
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, repeats=2):
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # a CPU dry run: the tiled blocks in fp32


def _single(n, causal, device, backward=True):
    from fa2lab import attention

    def run():
        q, k, v = _inputs(n, SHAPE, device, _dtype(device), 0)
        o = attention(q, k, v, causal=causal, backend="triton" if device.type == "cuda" else "tiled")
        if backward:
            o.sum().backward()
    return run


def _rank(world, n_local, causal, device):
    from fa2lab.distributed.plan import plan_ring
    from fa2lab.distributed.ring import _RingAttention
    from fa2lab.distributed.simulate import LoopbackRing

    plan = plan_ring(world, n_local, causal=causal)

    def run():
        q, k, v = _inputs(n_local, SHAPE, device, _dtype(device), 0)
        out, _ = _RingAttention.apply(q, k, v, plan, LoopbackRing(world - 1, world), SHAPE["D"] ** -0.5, True)
        out.sum().backward()
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("experiments/results"))
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--mem-lengths", type=int, nargs="+", default=[16384, 32768, 49152])
    ap.add_argument("--parts", nargs="+", default=["numerics", "memory", "time"])
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the driver at tiny sizes (tests)")
    ap.add_argument("--numerics-n", type=int, default=8192)
    args = ap.parse_args(argv)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"ring-single-gpu-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    if device.type == "cuda":
        _emit(out, dict(part="device", name=torch.cuda.get_device_name(0), torch=torch.__version__,
                        total_bytes=torch.cuda.mem_get_info()[1], shape=SHAPE))
    summary = []
    if "numerics" in args.parts:
        from fa2lab.bench.ring_check import simulate_check

        for causal in (True, False):
            rows = simulate_check(8, args.numerics_n, causal, device.type, torch.bfloat16, hq=8, hkv=2, d=128)
            for r in rows:
                _emit(out, dict(part="numerics", **r))
            for travel in dict.fromkeys(r["travel"] for r in rows):
                mine = [r for r in rows if r["travel"] == travel]
                summary.append(f"W=8 {'causal' if causal else 'full'} dK/dV in {travel}: ring/single error "
                               + " ".join(f"{r['tensor']} {r['ratio']:.2f}" for r in mine)
                               + (" ok" if all(r["ok"] for r in mine) else " FAIL"))
    if "memory" in args.parts:
        rows = []
        for mode, make in [("single", lambda n: _single(n, True, device))] + [
                (f"ring x{w}", (lambda n, w=w: _rank(w, n, True, device))) for w in (2, 4, 8)]:
            make(args.mem_lengths[0])()  # warm-up: kernels compiled outside the measurement
            for n in args.mem_lengths:
                row = dict(part="memory", mode=mode, N=n, peak_bytes=_peak(make(n), device))
                rows.append(row)
                _emit(out, row)
        single = fit(rows, "single")
        for w in (1, 2, 4, 8):
            f = fit(rows, "single" if w == 1 else f"ring x{w}")
            ratio = f["bytes_per_token"] / single["bytes_per_token"]
            _emit(out, dict(part="memory-fit", **f, ratio_to_single=ratio))
            summary.append(f"{f['mode']}: {f['bytes_per_token']:.0f} B per (local) token, x{ratio:.3f} of one GPU "
                           f"(fit err {f['worst_residual']:.1%})")
    if "time" in args.parts:
        for causal in (True, False):
            t1 = _time(_single(args.n, causal, device))
            _emit(out, dict(part="time", kind="single", N=args.n, causal=causal, seconds=t1))
            line = f"N={args.n} {'causal' if causal else 'full'} fwd+bwd: single {t1 * 1e3:.0f} ms"
            for w in (2, 4, 8):
                tw = _time(_rank(w, args.n // w, causal, device))
                _emit(out, dict(part="time", kind=f"rank of {w}", N=args.n, causal=causal, seconds=tw,
                                upper_bound_efficiency=t1 / (w * tw)))
                line += f"; rank of {w} {tw * 1e3:.0f} ms (bound {t1 / (w * tw):.3f})"
            summary.append(line)
    print("\n".join(summary[-12:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
