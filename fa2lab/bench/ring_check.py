"""Exactness of ring attention on real devices: W processes (NCCL on GPUs, gloo on CPU), output
and gradients against single-device fa2lab.attention on the gathered sequence, and both against
float64 (the error rule: ring error at most 2x the single-device error, 3x for gradients).

    python -m fa2lab.bench.ring_check --device cuda --world 2 --n 8192
    python -m fa2lab.bench.ring_check --device cuda --simulate 8 --n 8192

--simulate W runs a ring of W ranks in one process (`simulate_ring_grads`: each rank a thread,
the hops exact copies, so the numbers are those of W devices of this kind) once per dK/dV travel
dtype (fp32 and the input dtype): the check behind `ring.grad_dtype`.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _inputs(n, device, dtype, b=1, hq=16, hkv=4, d=128):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv)] + \
        [torch.randn(b, hq, n, d, generator=g).to(device, dtype)]


def _worker(rank, world, init_file, n, device_kind, causal):
    from fa2lab import attention
    from fa2lab.distributed import ring_attention

    device = torch.device(device_kind, rank) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    q, k, v, do = _inputs(n, device, dtype)
    shard = slice(rank * n // world, (rank + 1) * n // world)
    leaves = [t[:, :, shard].clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*leaves, causal=causal)
    out.backward(do[:, :, shard])
    parts = [torch.cat([t.detach() for t in (out, *[x.grad for x in leaves])], dim=1)]
    gathered = [torch.empty_like(parts[0]) for _ in range(world)]
    dist.all_gather(gathered, parts[0])
    if rank == 0:
        ring_all = torch.cat(gathered, dim=2)  # (B, Hq + Hq + 2 Hkv, N, D)
        hq, hkv = q.shape[1], k.shape[1]
        r_out, r_dq, r_dk, r_dv = ring_all.split([hq, hq, hkv, hkv], dim=1)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        s_out = attention(*full, causal=causal)
        s_out.backward(do)
        exact = [t.double().requires_grad_() for t in (q, k, v)]
        t_out = attention(*exact, causal=causal, backend="tiled")
        t_out.backward(do.double())
        report = []
        for name, ring_v, single, truth in (("out", r_out, s_out.detach(), t_out.detach()),
                                            ("dq", r_dq, full[0].grad, exact[0].grad),
                                            ("dk", r_dk, full[1].grad, exact[1].grad),
                                            ("dv", r_dv, full[2].grad, exact[2].grad)):
            e_ring = (ring_v.double() - truth).abs().max().item()
            e_single = (single.double() - truth).abs().max().item()
            factor = 2 if name == "out" else 3
            report.append(f"{name}: ring err {e_ring:.2e}, single-device err {e_single:.2e} "
                          f"({'ok' if e_ring <= factor * e_single + 1e-6 else 'FAIL'})")
        print(f"W={world} N={n} causal={causal} {dtype}: " + "; ".join(report), flush=True)
    dist.destroy_process_group()


def _warm_up(q, k, v, plan):
    """Compile every kernel variant the ranks will launch in this thread first: the ranks'
    threads then only launch (no concurrent JIT compiles)."""
    from fa2lab.distributed.ring import _RingAttention
    from fa2lab.distributed.simulate import LoopbackRing, shard

    for rank in {0, plan.world_size - 1}:
        local = [shard(t, plan, rank, plan.nq_local).detach().requires_grad_() for t in (q, k, v)]
        out, _ = _RingAttention.apply(*local, plan, LoopbackRing(rank, plan.world_size), q.shape[-1] ** -0.5, True)
        out.sum().backward()


def simulate_check(world: int, n: int, causal: bool, device="cuda", dtype=torch.bfloat16, hq=8, hkv=2, d=128,
                   travel_dtypes=(torch.float32, None)) -> list[dict]:
    """Errors against float64 of a simulated W-rank ring (per dK/dV travel dtype; None = the
    input dtype) and of one device's fa2lab.attention, with the 2x / 3x verdicts."""
    from fa2lab import attention
    from fa2lab.distributed import plan_ring, simulate_ring_grads
    from fa2lab.reference import attention_ref

    device = torch.device(device)
    q, k, v, do = _inputs(n, device, dtype, hq=hq, hkv=hkv, d=d)
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    t_out = attention_ref(*exact, causal=causal)
    t_out.backward(do.double())
    truth = [t_out.detach()] + [t.grad for t in exact]
    del exact, t_out
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    s_out = attention(*full, causal=causal)
    s_out.backward(do)
    single = [s_out.detach()] + [t.grad for t in full]
    err = lambda a, t: (a.double() - t).abs().max().item()  # noqa: E731
    e_single = [err(a, t) for a, t in zip(single, truth)]
    plan = plan_ring(world, n // world, causal=causal)
    _warm_up(q, k, v, plan)
    rows = []
    for travel in travel_dtypes:
        out, _, dq, dk, dv = simulate_ring_grads(q, k, v, do, plan, travel_dtype=travel or dtype)
        e_ring = [err(a, t) for a, t in zip((out, dq, dk, dv), truth)]
        for name, er, es, factor in zip(("out", "dq", "dk", "dv"), e_ring, e_single, (2, 3, 3, 3)):
            rows.append(dict(world=world, n=n, causal=causal, dtype=str(dtype).removeprefix("torch."),
                             travel=str(travel or dtype).removeprefix("torch."), tensor=name, ring_err=er,
                             single_err=es, ratio=er / es if es else float("inf"), ok=er <= factor * es))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--simulate", type=int, default=0, help="W ranks in one process (threads) instead of --world")
    args = ap.parse_args(argv)
    if args.simulate:
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        for causal in (True, False):
            for r in simulate_check(args.simulate, args.n, causal, args.device, dtype):
                print(f"W={r['world']} N={r['n']} causal={r['causal']} {r['dtype']} dK/dV travel {r['travel']}: "
                      f"{r['tensor']} ring {r['ring_err']:.2e} single {r['single_err']:.2e} x{r['ratio']:.2f} "
                      f"{'ok' if r['ok'] else 'FAIL'}")
        return
    for causal in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(args.world, os.path.join(tmp, "init"), args.n, args.device, causal),
                     nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
