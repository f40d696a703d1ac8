"""Exactness of ring attention on real devices: W processes (NCCL on GPUs, gloo on CPU), output
and gradients against single-device fa2lab.attention on the gathered sequence, and both against
float64 (the error rule: ring error at most 2x the single-device error, 3x for gradients).

    python -m fa2lab.bench.ring_check --device cuda --world 2 --n 8192
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n", type=int, default=4096)
    args = ap.parse_args(argv)
    for causal in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(args.world, os.path.join(tmp, "init"), args.n, args.device, causal),
                     nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
