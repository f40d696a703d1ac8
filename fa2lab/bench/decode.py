"""Decode latency on this machine: one query token against a cache of L tokens.

fa2lab's split-K decode at num_splits = 1 (plain FA2), auto and a few fixed counts, next to torch
SDPA on the same cache, in one run. bytes = 2 * B * Hkv * L * D * itemsize (K and V read once).
Each row carries the spread (min_us, max_us) and conditions of fa2lab.measure.time_call.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F

from fa2lab.decode import decode_attention
from fa2lab.decode.splitk import auto_num_splits, default_num_units
from fa2lab.measure.timing import time_call

COLUMNS = ["impl", "num_splits", "L", "B", "Hq", "Hkv", "D", "dtype", "us", "gb_per_s", "min_us", "max_us",
           "repeats", "others_cpu", "threads", "contended"]


def run(lengths=(1024, 4096, 16384, 65536), batch=1, heads_q=32, heads_kv=8, head_dim=128,
        dtype=torch.float32, splits=(1, 4, 16), out_csv: Path | None = None, budget_s=0.5, progress=print,
        policy=None):
    rows = []
    for n in lengths:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(batch, heads_q, 1, head_dim, generator=g).to(dtype)
        k = torch.randn(batch, heads_kv, n, head_dim, generator=g).to(dtype)
        v = torch.randn(batch, heads_kv, n, head_dim, generator=g).to(dtype)
        nbytes = 2 * batch * heads_kv * n * head_dim * k.element_size()  # K and V read once
        auto = auto_num_splits(batch * heads_kv, n, default_num_units(q.device))
        calls = {f"fa2lab splits={s}": (s, lambda s=s: decode_attention(q, k, v, num_splits=s)) for s in splits}
        calls[f"fa2lab auto ({auto})"] = (auto, lambda: decode_attention(q, k, v))
        calls["torch sdpa"] = ("", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=heads_q != heads_kv))
        for name, (s, fn) in calls.items():
            tm = time_call(fn, budget_s=budget_s, policy=policy, label=f"L={n} {name}")
            t = tm.median_s
            row = dict(impl=name, num_splits=s, L=n, B=batch, Hq=heads_q, Hkv=heads_kv, D=head_dim,
                       dtype=str(dtype).removeprefix("torch."), us=round(t * 1e6, 1),
                       gb_per_s=round(nbytes / t / 1e9, 2), min_us=round(tm.min_s * 1e6, 1),
                       max_us=round(tm.max_s * 1e6, 1), repeats=tm.repeats, others_cpu=tm.others_cpu,
                       threads=tm.threads, contended=tm.contended)
            rows.append(row)
            progress(f"L={n:>6} {name:<20} {t * 1e6:10.1f} us  {nbytes / t / 1e9:6.2f} GB/s"
                     + ("  CONTENDED" if tm.contended else ""))
    if out_csv is not None:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        with out_csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
    return rows
