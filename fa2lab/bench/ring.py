"""Ring and Ulysses attention on W devices against one device: time, overlap, target ratios.

CPU: gloo, W processes sharing the cores. GPU (--device cuda): NCCL, one process per GPU; the
single-device baseline runs on GPU 0 in the same invocation, after the ring processes.

For each (W, N, mask) it spawns W processes and times, per call (slowest rank; median and
minimum of `repeats`, a barrier before each, the variants taking turns):

    overlap      ring_attention as shipped on contiguous shards: the next K/V shard is in flight
                 during the compute (causal: re-sharded into zig-zag and back inside the call)
    zigzag-in    ring_attention(layout="zigzag"): the caller's shards already zig-zag, no re-shard
    serial       the same plan as overlap, each hop waited for before the next compute
    compute      the same plan with the hops replaced by no-ops (the compute alone)
    comm         the hops alone: forward W-1 of K/V, backward W-1 more of K/V and W of dK/dV;
                 bytes per K/V hop = 2 * B * Hkv * N_local * D * itemsize
    reshard      (causal, zig-zag) moving q, k, v into the zig-zag layout and out, lse back
    ulysses      ulysses_attention (where Hkv % W == 0): two all-to-alls around one attention call

waited_ms is the time the slowest rank spent blocked in the ring's waits: all of the communication
when serial, what the compute did not cover (or a slower peer) with overlap. hidden =
1 - waited(overlap) / waited(serial): the share of the communication that overlap took off the
critical path (1.0 = all of it).
The single-process call on the whole sequence (fa2lab.attention, `tiled` on a CPU, `triton` on
CUDA: the blocks the ring runs) is the baseline; speedup = single / ring (minima), efficiency =
speedup / W. Issue 19's targets at N = 128k: causal fwd+bwd efficiency >= 0.85, full >= 0.90.
flops = 4 * B * Hq * pairs * D (2 matmuls, visible pairs only; fwd+bwd counts 3.5x).

--loopback (one device): one rank of a W ring alone (`simulate.LoopbackRing`: hops are local
copies into the ring's buffers): its compute time, so W x single / that is the speedup the ring
could reach with free communication - an upper bound, not a ring measurement.

Run: python -m fa2lab.bench.ring [--world 2 4] [--lengths 1024 4096] [--causal both]
     python -m fa2lab.bench.ring --device cuda --dtype bfloat16 --world 2 4 8 --lengths 131072 \
         --heads 32 --heads-kv 8 --head-dim 128 --kinds overlap zigzag-in ulysses --repeats 3
"""

from __future__ import annotations

import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLUMNS = ["W", "N", "causal", "mode", "kind", "B", "Hq", "Hkv", "D", "dtype", "ms", "ms_min", "waited_ms",
           "hidden", "single_over_ring", "efficiency", "hop_mib", "gflops"]
KINDS = ("overlap", "zigzag-in", "serial", "compute", "comm", "reshard", "ulysses")
TARGETS = {(True, "fwd+bwd"): 0.85, (False, "fwd+bwd"): 0.90, (False, "fwd"): 0.90}  # efficiency, issue 19


def _clocked_ring(group):
    """A Ring whose waits add up the time this rank spends blocked in them."""
    from fa2lab.distributed.comm import Ring

    class ClockedRing(Ring):
        waited = 0.0

        def shift(self, tensors, tag, what, into=None):
            pending, ring = super().shift(tensors, tag, what, into), self

            class Clocked:
                def wait(self):
                    t0 = time.perf_counter()
                    out = pending.wait()
                    ring.waited += time.perf_counter() - t0
                    return out
            return Clocked()

    return ClockedRing(group)


class _NoComm:
    """A ring whose hops are no-ops: each rank computes on its own K/V at every step."""

    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def shift(self, tensors, tag, what, into=None):
        from fa2lab.distributed.comm import Ready

        return Ready(tensors)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fns: dict, repeats: int, device=torch.device("cpu"), ring=None) -> dict:
    """Per function: (median, min, median waited) over `repeats` of the slowest rank's time, and
    of the slowest rank's time blocked in the ring's waits (with a clocked `ring`). The functions
    take turns within each repeat, so a load change on the machine hits all of them alike. Every
    rank runs the same count (the ring and the barrier need all of them)."""
    times, waits = {name: [] for name in fns}, {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            dist.barrier()
            _sync(device)
            if ring is not None:
                ring.waited = 0.0
            t0 = time.perf_counter()
            fn()
            _sync(device)
            t = torch.tensor([time.perf_counter() - t0, ring.waited if ring is not None else 0.0],
                             dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[name].append(t[0].item())
            waits[name].append(t[1].item())
    return {name: (statistics.median(ts), min(ts), statistics.median(waits[name])) for name, ts in times.items()}


def _worker(rank, world, init_file, cfg, out_file):
    from fa2lab.distributed import ring_attention, ulysses_attention
    from fa2lab.distributed.comm import TAG_DKV, TAG_KV
    from fa2lab.distributed.plan import plan_ring
    from fa2lab.distributed.ring import _RingAttention, _run, grad_dtype

    if cfg["device"] != "cuda":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # W processes share the cores
    kinds = cfg["kinds"]
    device = torch.device(cfg["device"], rank) if cfg["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    b, hq, hkv, n, d = (cfg[x] for x in ("B", "Hq", "Hkv", "N", "D"))
    causal, dtype, repeats = cfg["causal"], cfg["dtype"], cfg["repeats"]
    n_local = n // world
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(b, hq, n_local, d, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(b, hkv, n_local, d, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(b, hkv, n_local, d, generator=g).to(device, dtype).requires_grad_()
    ring, scale = _clocked_ring(dist.group.WORLD), d ** -0.5
    plan = plan_ring(world, n_local, causal=causal)
    res = {}
    qz, kz, vz = (t.detach() for t in (q, k, v))
    dkz, dvz = kz.to(grad_dtype(dtype)), vz.to(grad_dtype(dtype))

    def hops(kv, count, tag):
        for _ in range(count):
            kv = ring.shift(kv, tag, "bench").wait()

    def reshard_both_ways():  # what the zig-zag layout adds to a forward: q, k, v there, out and lse back
        from fa2lab.distributed.comm import reshard
        reshard(ring, [qz, kz, vz], True)
        reshard(ring, [qz, qz[..., 0]], False)

    if plan.layout == "zigzag" and "reshard" in kinds:
        res[("fwd", "reshard")] = _timed(dict(r=reshard_both_ways), repeats, device)["r"]
    for mode in ("fwd", "fwd+bwd"):
        def call(overlap, mode=mode):
            out, _ = _run(q, k, v, plan, ring, scale, overlap=overlap)
            if mode == "fwd+bwd":
                out.sum().backward()

        def zigzag_in(mode=mode):  # the caller's shards taken as zig-zag: nothing re-sharded
            out = ring_attention(q, k, v, causal=causal, layout="zigzag" if plan.layout == "zigzag" else "contiguous")
            if mode == "fwd+bwd":
                out.sum().backward()

        def ulysses(mode=mode):
            out = ulysses_attention(q, k, v, causal=causal)
            if mode == "fwd+bwd":
                out.sum().backward()

        def compute(mode=mode):  # the same blocks on this rank's own K/V, no hops
            out, _ = _RingAttention.apply(q, k, v, plan, _NoComm(rank, world), scale, True)
            if mode == "fwd+bwd":
                out.sum().backward()

        def comm(mode=mode):  # forward: W-1 K/V hops; backward adds W-1 K/V and W dK/dV (fp32) hops
            hops([kz, vz], world - 1, TAG_KV)
            if mode == "fwd+bwd":
                hops([kz, vz], world - 1, TAG_KV)
                hops([dkz, dvz], world, TAG_DKV)

        fns = dict(overlap=lambda: call(True), serial=lambda: call(False), compute=compute, comm=comm,
                   ulysses=ulysses)
        fns["zigzag-in"] = zigzag_in
        fns = {name: fn for name, fn in fns.items() if name in kinds and (name != "ulysses" or hkv % world == 0)}
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            medians = _timed(fns, repeats, device, ring)
        res.update({(mode, kind): t for kind, t in medians.items()})
    res["pairs"] = sum(b_.pairs for st in plan.steps[rank] for b_ in st.blocks)
    res["layout"] = plan.layout
    if rank == 0:
        torch.save(res, out_file)
    dist.destroy_process_group()


def _single(cfg, out_file):
    """The whole sequence in one process with every core: the single-device baseline."""
    from fa2lab import attention

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(cfg["device"], 0) if cfg["device"] == "cuda" else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, n, d = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["N"], cfg["D"]
    q = torch.randn(b, hq, n, d, generator=g).to(device, cfg["dtype"]).requires_grad_()
    k = torch.randn(b, hkv, n, d, generator=g).to(device, cfg["dtype"]).requires_grad_()
    v = torch.randn(b, hkv, n, d, generator=g).to(device, cfg["dtype"]).requires_grad_()
    out = {}
    for mode in ("fwd", "fwd+bwd"):
        def call(mode=mode):
            # the same block implementation the ring uses on this device: Triton on CUDA, PyTorch FA2 on CPU
            o = attention(q, k, v, causal=cfg["causal"], backend="triton" if device.type == "cuda" else "tiled")
            if mode == "fwd+bwd":
                o.sum().backward()
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            call()
            times = []
            for _ in range(cfg["repeats"]):
                _sync(device)
                t0 = time.perf_counter()
                call()
                _sync(device)
                times.append(time.perf_counter() - t0)
        out[mode] = (statistics.median(times), min(times), 0.0)
    torch.save(out, out_file)


def _spawn(targets):
    # forkserver: torch is imported once, in the server, instead of once per process
    mp.set_forkserver_preload(["torch", "torch.distributed", "fa2lab.distributed", __name__])
    ctx = mp.get_context("forkserver")
    procs = [ctx.Process(target=fn, args=args) for fn, args in targets]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a bench process failed: exit codes {[p.exitcode for p in procs]}")


def _loopback(cfg, out_file, world):
    """One rank of a W ring alone on one device (hops are local copies): compute-side time."""
    from fa2lab import attention
    from fa2lab.distributed.plan import plan_ring
    from fa2lab.distributed.ring import _RingAttention
    from fa2lab.distributed.simulate import LoopbackRing

    device = torch.device(cfg["device"], 0) if cfg["device"] == "cuda" else torch.device("cpu")
    b, hq, hkv, n, d = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["N"], cfg["D"]
    g = torch.Generator().manual_seed(0)
    n_local = n // world
    q = torch.randn(b, hq, n_local, d, generator=g).to(device, cfg["dtype"]).requires_grad_()
    k = torch.randn(b, hkv, n_local, d, generator=g).to(device, cfg["dtype"]).requires_grad_()
    v = torch.randn(b, hkv, n_local, d, generator=g).to(device, cfg["dtype"]).requires_grad_()
    plan = plan_ring(world, n_local, causal=cfg["causal"])
    rank = world - 1
    res = {}
    for mode in ("fwd", "fwd+bwd"):
        def ring_rank(mode=mode):
            out, _ = _RingAttention.apply(q, k, v, plan, LoopbackRing(rank, world), d ** -0.5, True)
            if mode == "fwd+bwd":
                out.sum().backward()
        fns = dict(loopback=ring_rank)
        if hkv % world == 0:  # Ulysses' compute: Hq/W heads over the whole sequence (all-to-alls left out)
            qs, ks, vs = (torch.randn(b, h // world, n, d, generator=g).to(device, cfg["dtype"]).requires_grad_()
                          for h in (hq, hkv, hkv))

            def uly(mode=mode):
                o = attention(qs, ks, vs, causal=cfg["causal"])
                if mode == "fwd+bwd":
                    o.sum().backward()
            fns["ulysses-loopback"] = uly
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            for name, fn in fns.items():
                fn()
                times = []
                for _ in range(cfg["repeats"]):
                    _sync(device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                res[(mode, name)] = (statistics.median(times), min(times), 0.0)
    torch.save(res, out_file)


def run(world_sizes=(2,), lengths=(1024, 4096), causal=(False, True), batch=1, heads=8, heads_kv=8, head_dim=64,
        dtype=torch.float32, repeats=7, device="cpu", progress=print, kinds=KINDS, loopback=False):
    """Rows of COLUMNS; ms is the median, ms_min the minimum (the run least disturbed by other
    load on the machine), hidden uses the minima. loopback: one device, one rank of each W alone."""
    rows = []
    for n in lengths:
        for c in causal:
            single = None
            for i_w, w in enumerate(world_sizes):
                cfg = dict(B=batch, Hq=heads, Hkv=heads_kv, N=n, D=head_dim, causal=c, dtype=dtype, repeats=repeats,
                           device=device, kinds=tuple(kinds))
                with tempfile.TemporaryDirectory() as tmp:
                    if loopback:
                        _spawn([(_loopback, (cfg, f"{tmp}/ring.pt", w))])
                    else:
                        _spawn([(_worker, (r, w, f"{tmp}/init", cfg, f"{tmp}/ring.pt")) for r in range(w)])
                    if single is None:  # one baseline per (N, mask), in the same invocation
                        _spawn([(_single, (cfg, f"{tmp}/single.pt"))])
                        single = torch.load(f"{tmp}/single.pt")
                    res = torch.load(f"{tmp}/ring.pt")
                hop_mib = 2 * batch * heads_kv * (n // w) * head_dim * dtype.itemsize / 2**20  # K and V of one shard
                pairs = n * (n + 1) // 2 if c else n * n  # visible (query, key) pairs
                new = []
                base = dict(W=w, N=n, causal=c, B=batch, Hq=heads, Hkv=heads_kv, D=head_dim,
                            dtype=str(dtype).removeprefix("torch."), hop_mib=round(hop_mib, 3))
                for (mode, kind), (med, best, waited) in sorted((k_, t) for k_, t in res.items()
                                                                if isinstance(k_, tuple)):
                    hidden = ""
                    if kind == "overlap" and (mode, "serial") in res and res[(mode, "serial")][2] > 0:
                        hidden = round(1 - waited / res[(mode, "serial")][2], 2)
                    flops = 4 * batch * heads * pairs * head_dim * (3.5 if mode == "fwd+bwd" else 1)  # bwd = 2.5x fwd
                    timed_whole = kind in ("overlap", "serial", "zigzag-in", "ulysses", "loopback", "ulysses-loopback")
                    speedup = single[mode][1] / best
                    new.append(dict(base, mode=mode, kind=kind, ms=round(med * 1e3, 2), ms_min=round(best * 1e3, 2),
                                    waited_ms=round(waited * 1e3, 2) if kind in ("overlap", "serial") else "",
                                    hidden=hidden, single_over_ring=round(speedup, 3) if timed_whole else "",
                                    efficiency=round(speedup / w, 3) if timed_whole else "",
                                    gflops=round(flops / best / 1e9, 2) if timed_whole else ""))
                for mode, (med, best, _) in (single.items() if i_w == 0 else ()):
                    flops = 4 * batch * heads * pairs * head_dim * (3.5 if mode == "fwd+bwd" else 1)
                    new.append(dict(base, W=1, mode=mode, kind="single", ms=round(med * 1e3, 2),
                                    ms_min=round(best * 1e3, 2), waited_ms="", hidden="", single_over_ring=1.0,
                                    efficiency=1.0, hop_mib="", gflops=round(flops / best / 1e9, 2)))
                new = [{col: row[col] for col in COLUMNS} for row in new]
                rows += new
                for row in new:
                    progress(f"W={row['W']} N={n:>6} causal={c!s:<5} {row['mode']:<8} {row['kind']:<16} "
                             f"median {row['ms']:9.2f} ms  min {row['ms_min']:9.2f} ms  waited {row['waited_ms']!s:>7} ms"
                             f"  hidden={row['hidden']!s:<6}"
                             f"single/ring={row['single_over_ring']!s}  efficiency={row['efficiency']!s}")
    return rows


def target_lines(rows) -> list[str]:
    """Issue 19's speed targets: efficiency = (single / ring) / W against 0.85 (causal fwd+bwd)
    and 0.90 (full), per W, N and implementation, from rows of one run."""
    lines = []
    for row in rows:
        want = TARGETS.get((row["causal"], row["mode"]))
        # the single-device baseline (efficiency 1 by definition) and untimed parts have no target; a ring
        # row whose efficiency rounds to exactly 1.0 does
        if want is None or row["efficiency"] == "" or row["kind"] == "single":
            continue
        verdict = "met" if row["efficiency"] >= want else "missed"
        if "loopback" in row["kind"]:
            verdict = "upper bound (one rank, no network)"
        lines.append(f"target W={row['W']} N={row['N']} {'causal' if row['causal'] else 'full'} {row['mode']} "
                     f"{row['kind']}: efficiency {row['efficiency']:.3f} (>= {want}) {verdict}")
    return lines


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="fa2lab bench-ring", description="ring attention: overlap and time against one device")
    ap.add_argument("--world", type=int, nargs="+", default=[2])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: NCCL, one GPU per rank")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--loopback", action="store_true", help="one device: one rank of each W alone (no network)")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not args.loopback and torch.cuda.device_count() < max(args.world):
        raise SystemExit(f"--world {max(args.world)} needs as many CUDA devices; {torch.cuda.device_count()} visible "
                         f"(--loopback measures one rank on one device)")
    rows = run(world_sizes=tuple(args.world), lengths=tuple(args.lengths), repeats=args.repeats, device=args.device,
               dtype=getattr(torch, args.dtype), batch=1, heads=args.heads, heads_kv=args.heads_kv,
               head_dim=args.head_dim, kinds=args.kinds, loopback=args.loopback,
               causal={"no": (False,), "yes": (True,), "both": (False, True)}[args.causal])
    for line in target_lines(rows):
        print(line)
    if args.out:
        import json
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
