"""The longest sequence one GPU and a ring of W GPUs can hold, from measured peak memory.

    python -m fa2lab.bench.ring_memory [--world 2] [--lengths 65536 262144 524288]

On W GPUs (NCCL, one process per GPU) it runs causal forward + backward of
`fa2lab.distributed.ring_attention` at each total length N, and the same on GPU 0 alone with
`fa2lab.attention(backend="triton")`, and records `torch.cuda.max_memory_allocated` (inputs,
output, gradients and workspace; the busiest rank for the ring). FA2 memory is linear in N, so a
least-squares line peak = a + b * N over the lengths gives bytes per token, and the longest N
that fits is (free memory - a) / b. The fit is checked by its worst residual; running at that
length would take hours (the FLOPs grow as N^2), so capacity is a projection and is labelled one.
B=1, Hq=16, Hkv=4, D=128, bf16, as in the ring timing of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fa2lab.bench.ring import _spawn
from fa2lab.measure.timing import Timing, once, time_call, warning_text

SHAPE = dict(B=1, Hq=16, Hkv=4, D=128)


def _inputs(n: int, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    b, hq, hkv, d = SHAPE["B"], SHAPE["Hq"], SHAPE["Hkv"], SHAPE["D"]
    return [torch.randn(b, h, n, d, generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
            for h in (hq, hkv, hkv)]


def _peak(fn) -> tuple[int, Timing]:
    """Peak allocated bytes of one call, and its timing (once: the ring's collectives need every
    rank to make the same calls, so a contended timing is marked, not retried)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = time_call(fn, device=f"cuda:{torch.cuda.current_device()}", wall=True, warmup=0, min_repeats=1,
                  max_repeats=1, policy=once(), label="ring memory")
    return torch.cuda.max_memory_allocated(), t


def _worker(rank, world, init_file, lengths, out_file):
    from fa2lab import attention
    from fa2lab.distributed import ring_attention

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    rows = []
    for n in lengths:
        def ring():
            q, k, v = _inputs(n // world, device, rank)
            ring_attention(q, k, v, causal=True).sum().backward()

        peak, t = _peak(ring)
        rows.append(dict(mode=f"ring x{world}", rank=rank, N=n, peak_bytes=peak, seconds=t.median_s,
                         contended=t.contended or t.throttled))
        dist.barrier()
        if rank == 0:
            def single():
                q, k, v = _inputs(n, device, 0)
                attention(q, k, v, causal=True, backend="triton").sum().backward()

            peak, t = _peak(single)
            rows.append(dict(mode="single", rank=0, N=n, peak_bytes=peak, seconds=t.median_s,
                             contended=t.contended or t.throttled))
        dist.barrier()
    if rank == 0:
        free, total = torch.cuda.mem_get_info()
        rows.append(dict(mode="device", free_bytes=free, total_bytes=total, name=torch.cuda.get_device_name(0)))
    torch.save(rows, out_file)
    dist.destroy_process_group()


def fit(rows: list[dict], mode: str) -> dict:
    """Least-squares peak = a + b*N over the lengths (busiest rank per N for a ring)."""
    per_n = {}
    for r in rows:
        if r.get("mode") == mode:
            per_n[r["N"]] = max(per_n.get(r["N"], 0), r["peak_bytes"])
    ns = sorted(per_n)
    xs, ys = [float(n) for n in ns], [float(per_n[n]) for n in ns]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    worst = max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys))
    return dict(mode=mode, intercept_bytes=a, bytes_per_token=b, worst_residual=worst,
                peaks={n: per_n[n] for n in ns})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--lengths", type=int, nargs="+", default=[65536, 262144, 524288])
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = p.parse_args(argv)
    if torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs {args.world} CUDA devices; {torch.cuda.device_count()} visible")
    if len(args.lengths) < 2 or any(n % (2 * args.world) for n in args.lengths):
        raise SystemExit(f"give at least two lengths, each a multiple of 2 * world = {2 * args.world} (zig-zag)")
    with tempfile.TemporaryDirectory() as tmp:
        init, outs = os.path.join(tmp, "init"), [os.path.join(tmp, f"rows{r}.pt") for r in range(args.world)]
        _spawn([(_worker, (r, args.world, init, args.lengths, outs[r])) for r in range(args.world)])
        rows = [row for f in outs for row in torch.load(f)]
    dev = next(r for r in rows if r.get("mode") == "device")
    fits = [fit(rows, "single"), fit(rows, f"ring x{args.world}")]
    usable = dev["total_bytes"] * 0.95  # leave room for the CUDA context and fragmentation
    for f in fits:
        f["projected_max_tokens"] = (usable - f["intercept_bytes"]) / f["bytes_per_token"]
    print(f"{dev['name']}: {dev['total_bytes'] / 2**30:.1f} GiB per GPU; B=1 Hq=16 Hkv=4 D=128 bf16, causal fwd+bwd")
    print(f"{'mode':>8} " + " ".join(f"N={n:>8}" for n in args.lengths) + "  bytes/token  fit err  projected max N")
    for f in fits:
        peaks = " ".join(f"{f['peaks'][n] / 2**30:8.2f}G" for n in args.lengths)
        print(f"{f['mode']:>8} {peaks}  {f['bytes_per_token']:11.0f}  {f['worst_residual']:7.1%}  "
              f"{f['projected_max_tokens'] / 2**20:.1f} Mi tokens (projection)")
    for r in rows:
        if "seconds" in r:
            print(f"  {r['mode']:>8} rank {r['rank']} N={r['N']}: {r['peak_bytes'] / 2**30:.2f} GiB, {r['seconds']:.2f} s"
                  + ("  CONTENDED" if r.get("contended") else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ring-memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(shape=SHAPE, device=dev, fits=fits, rows=[r for r in rows if "seconds" in r]),
                               indent=1, default=str))
    print(f"wrote {path}")
    unsound = [r for r in rows if r.get("contended")]
    if unsound:  # the workers' timings are in other processes: the warning from their rows
        print("\n" + warning_text(sum("seconds" in r for r in rows), len(unsound)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
