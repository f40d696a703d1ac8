"""Bytes per token of one device and of a rank of W, and the longest sequence each can hold,
from measured peak memory of causal forward + backward.

    python -m fa2lab.bench.ring_memory --device cpu --world 2 [--lengths 1024 2048 4096]
    python -m fa2lab.bench.ring_memory --device cuda --world 2 [--lengths 65536 262144 524288]

Per total length N it runs causal fwd+bwd of each implementation with inputs created inside the
measured call, on every rank, and the same on one device with `fa2lab.attention` on the whole
sequence (the block implementation the ring runs there: `tiled` on a CPU, `triton` on CUDA):

    ring         ring_attention(layout="zigzag"): the caller's shards already zig-zag
    ring-contig  ring_attention on contiguous shards (re-sharded into zig-zag and back inside)
    ulysses      ulysses_attention (head-parallel all-to-all; needs Hkv % W == 0)

Peak: on CUDA `torch.cuda.max_memory_allocated` (NCCL, one process per GPU); on a CPU the peak
extra resident memory of the call from the kernel's own accounting (`fa2lab.measure.memory
.peak_extra_bytes`, gloo, one process per rank). Memory is linear in N, so a least-squares line
peak = a + b * N gives bytes per token (the worst residual is printed); per local token a rank's
figure is b * W. Ratios printed against the single device in the same run:

    bytes per local token / single bytes per token      target <= 1.2 (issue 19, CPU and GPU)
    projected longest N on W devices / (W * single's)   target >= 0.9 (capacity, GPU)

Longest N = (0.95 x device memory - a) / b is a projection (running there would take hours: FLOPs
grow as N^2), labelled one. On a CPU the projection is not made (host memory is shared).
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

IMPLS = ("ring", "ring-contig", "ulysses")
SHAPE = dict(B=1, Hq=32, Hkv=8, D=128)  # Llama-3-8B's attention: Ulysses up to W = 8 needs Hkv >= 8


def _inputs(n: int, shape: dict, device, dtype, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    b, hq, hkv, d = shape["B"], shape["Hq"], shape["Hkv"], shape["D"]
    return [torch.randn(b, h, n, d, generator=g, device=device, dtype=dtype).requires_grad_() for h in (hq, hkv, hkv)]


def _peak(fn, device) -> int:
    """Peak bytes of one call on top of what was held before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from fa2lab.measure.memory import peak_extra_bytes

    peak = peak_extra_bytes(fn)
    if peak is None:
        raise SystemExit("peak host memory needs Linux with glibc (/proc/self/clear_refs); not available here")
    return peak


def _call(impl: str, n_local: int, shape, device, dtype, rank, world):
    from fa2lab.distributed import ring_attention, ulysses_attention

    def run():
        q, k, v = _inputs(n_local, shape, device, dtype, rank)
        if impl == "ulysses":
            out = ulysses_attention(q, k, v, causal=True)
        else:
            out = ring_attention(q, k, v, causal=True, layout="zigzag" if impl == "ring" else "contiguous")
        out.sum().backward()
    return run


def _worker(rank, world, init_file, cfg, out_file):
    device = torch.device("cuda", rank) if cfg["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=900))
    dtype, shape, rows = getattr(torch, cfg["dtype"]), cfg["shape"], []
    for impl in cfg["impls"]:
        _call(impl, cfg["lengths"][0] // world, shape, device, dtype, rank, world)()  # warm-up: caches, kernels
        for n in cfg["lengths"]:
            dist.barrier()
            t0 = time.perf_counter()
            peak = _peak(_call(impl, n // world, shape, device, dtype, rank, world), device)
            rows.append(dict(mode=f"{impl} x{world}", rank=rank, N=n, peak_bytes=peak,
                             seconds=time.perf_counter() - t0))
    if device.type == "cuda" and rank == 0:
        rows += _single_rows(cfg, device)
        free, total = torch.cuda.mem_get_info()
        rows.append(dict(mode="device", free_bytes=free, total_bytes=total, name=torch.cuda.get_device_name(0)))
    torch.save(rows, out_file)
    dist.destroy_process_group()


def _single_rows(cfg, device) -> list[dict]:
    from fa2lab import attention

    dtype, shape, rows = getattr(torch, cfg["dtype"]), cfg["shape"], []
    backend = "triton" if device.type == "cuda" else "tiled"

    def call(n):
        def run():
            q, k, v = _inputs(n, shape, device, dtype, 0)
            attention(q, k, v, causal=True, backend=backend).sum().backward()
        return run

    call(cfg["lengths"][0])()  # warm-up
    for n in cfg["lengths"]:
        t0 = time.perf_counter()
        rows.append(dict(mode="single", rank=0, N=n, peak_bytes=_peak(call(n), device),
                         seconds=time.perf_counter() - t0))
    return rows


def _single_cpu(cfg, out_file):
    torch.set_num_threads(os.cpu_count() or 1)
    torch.save(_single_rows(cfg, torch.device("cpu")), out_file)


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


def summarize(rows: list[dict], world: int, total_bytes: float | None = None) -> list[dict]:
    """One fit per mode, with bytes per local token, its ratio to the single device's bytes per
    token (target <= 1.2) and, given the device's memory, the projected capacity ratio (>= 0.9)."""
    modes = ["single"] + sorted({r["mode"] for r in rows if r.get("mode") not in ("single", "device")})
    fits = [fit(rows, m) for m in modes]
    single = fits[0]
    for f in fits:
        w = 1 if f["mode"] == "single" else world
        f["world"] = w
        f["bytes_per_local_token"] = f["bytes_per_token"] * w
        f["ratio_to_single"] = f["bytes_per_local_token"] / single["bytes_per_token"]
        if total_bytes:
            f["projected_max_tokens"] = (0.95 * total_bytes - f["intercept_bytes"]) / f["bytes_per_token"]
    if total_bytes:
        for f in fits:
            f["capacity_ratio"] = f["projected_max_tokens"] / (f["world"] * single["projected_max_tokens"])
    return fits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="total lengths N (default: cpu 1024 2048 4096, cuda 65536 262144 524288)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--heads", type=int, default=SHAPE["Hq"])
    p.add_argument("--heads-kv", type=int, default=SHAPE["Hkv"])
    p.add_argument("--head-dim", type=int, default=SHAPE["D"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on a CPU, bfloat16 on CUDA")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    lengths = args.lengths or ([65536, 262144, 524288] if cuda else [1024, 2048, 4096])
    if cuda and torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs {args.world} CUDA devices; {torch.cuda.device_count()} visible")
    if len(lengths) < 2 or any(n % (2 * args.world) for n in lengths):
        raise SystemExit(f"give at least two lengths, each a multiple of 2 * world = {2 * args.world} (zig-zag)")
    impls = [i for i in args.impls if i != "ulysses" or args.heads_kv % args.world == 0]
    if len(impls) < len(args.impls):
        print(f"ulysses skipped: it splits the {args.heads_kv} K/V heads over {args.world} ranks (Hkv % W != 0)")
    shape = dict(B=1, Hq=args.heads, Hkv=args.heads_kv, D=args.head_dim)
    cfg = dict(device=args.device, lengths=lengths, impls=impls, shape=shape,
               dtype=args.dtype or ("bfloat16" if cuda else "float32"))
    with tempfile.TemporaryDirectory() as tmp:
        init, outs = os.path.join(tmp, "init"), [os.path.join(tmp, f"rows{r}.pt") for r in range(args.world)]
        _spawn([(_worker, (r, args.world, init, cfg, outs[r])) for r in range(args.world)])
        if not cuda:  # the single process after the ring: it gets every core, and no rank shares memory with it
            _spawn([(_single_cpu, (cfg, os.path.join(tmp, "single.pt")))])
            outs.append(os.path.join(tmp, "single.pt"))
        rows = [row for f in outs for row in torch.load(f)]
    dev = next((r for r in rows if r.get("mode") == "device"), None)
    fits = summarize(rows, args.world, dev["total_bytes"] if dev else None)
    where = (f"{dev['name']}, {dev['total_bytes'] / 2**30:.1f} GiB per GPU (NCCL)" if dev else
             f"CPU, {args.world} gloo processes, peak extra resident memory")
    print(f"{where}; B=1 Hq={args.heads} Hkv={args.heads_kv} D={args.head_dim} {cfg['dtype']}, causal fwd+bwd")
    print(f"{'mode':>14} " + " ".join(f"N={n:>8}" for n in lengths)
          + "  B/token  B/local token  x single (<=1.2)  fit err" + ("  projected max N  capacity (>=0.9)" if dev else ""))
    for f in fits:
        peaks = " ".join(f"{f['peaks'][n] / 2**20:9.1f}M" for n in lengths)
        line = (f"{f['mode']:>14} {peaks}  {f['bytes_per_token']:7.0f}  {f['bytes_per_local_token']:13.0f}  "
                f"{f['ratio_to_single']:16.3f}  {f['worst_residual']:7.1%}")
        if dev:
            line += f"  {f['projected_max_tokens'] / 2**20:8.1f} Mi (proj.)  {f['capacity_ratio']:.3f}"
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ring-memory-{args.device}-w{args.world}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(shape=shape, cfg=cfg, device=dev, fits=fits,
                                    rows=[r for r in rows if "seconds" in r]), indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
