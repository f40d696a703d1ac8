"""The Gluon Hopper forward against the Triton (TMA) one and cuDNN, through the public call.

    python -m fa2lab.bench.gluon_gpu [--cases N:D:causal[:hq:hkv],...] [--configs] [--out DIR]

FA2-paper protocol (bf16, B*N = 32k tokens, H*D = 2048; GQA rows Hq = 32), forward only:
`fa2lab.attention(q, k, v, causal=..., backend="triton")` with FA2LAB_HOPPER_FWD=triton and =gluon
in turn (the dispatcher reads it per call), next to SDPA's cuDNN and flash backends, all in one
process; flops = 4*B*H*N*N*D (/2 causal). Every Gluon row is first checked with fa2lab's rule
(error <= 2x PyTorch's same-dtype error against float64, B=1 Hq=4 Hkv=2 N=1000). --configs adds
kernel-level rows (gluon_fwd called directly) for each candidate tile. At head dims the dispatcher
does not send to Gluon (hopper_config.GLUON_TESTED: D=256 until its GPU tests pass) the Gluon column
is the kernel called directly, marked "(Gluon: kernel)". Writes gluon-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import fa2lab
from fa2lab.bench.gpu import _bench, environment
from fa2lab.bench.hopper_sweep import _rule, _sdpa, _try
from fa2lab.kernels.gluon_fwd import GLUON_FWD, gluon_fwd
from fa2lab.kernels.hopper_config import gluon_shapes_ok

CASES = ("1024:128:0,4096:128:0,16384:128:0,4096:64:0,1024:128:1,4096:128:1,16384:128:1,4096:64:1,4096:128:1:32:8,"
         "8192:128:0:32:4,4096:256:0,4096:256:1")
_W = dict(WS=True, num_warps=4)  # warp-specialised: consumer warpgroups of 64 rows (2 by default), a producer warp
_P = dict(_W, PERSISTENT=True)  # persistent: one program per SM walks the tiles, loads run ahead across tiles
# Candidate tiles for --configs: the table's tile next to the persistent kernel (2026-12-03 evening).
# Earlier rounds' candidates (one partition, 128x64 3-4 stages, regs 232, 3 consumers non-persistent,
# 128x32 at D=256) and their figures: BENCHMARKS.md and experiments/results/gluon-*.json.
CONFIGS = {
    128: [dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, **_W), dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, **_P),
          dict(BLOCK_M=128, BLOCK_N=64, STAGES=3, **_P)],
    64: [dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, **_W), dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, **_P),
         dict(BLOCK_M=128, BLOCK_N=128, STAGES=3, **_P), dict(BLOCK_M=192, BLOCK_N=128, STAGES=2, CONSUMERS=3, **_P)],
    256: [dict(BLOCK_M=128, BLOCK_N=64, STAGES=2, **_W), dict(BLOCK_M=128, BLOCK_N=64, STAGES=2, **_P)],
}


def _parse(cases: str):
    out = []
    for c in cases.split(","):
        f = [int(x) for x in c.split(":")]
        n, d, causal = f[:3]
        hq, hkv = (f[3], f[4]) if len(f) == 5 else (2048 // d, 2048 // d)
        out.append((n, d, bool(causal), hq, hkv))
    return out


def _public(q, k, v, causal, path):
    os.environ["FA2LAB_HOPPER_FWD"] = path
    with torch.no_grad():
        return fa2lab.attention(q, k, v, causal=causal, backend="triton")


def run(cases, configs=False, log=print):
    rows = []
    for n, d, causal, hq, hkv in cases:
        b = max(1, 32768 // n)
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        flops = 4 * b * hq * n * n * d / (2 if causal else 1)
        shape = dict(N=n, D=d, B=b, Hq=hq, Hkv=hkv, causal=causal)
        row = dict(shape)
        check = _try(lambda: _rule(lambda q_, k_, v_: gluon_fwd(q_, k_, v_, scale=d ** -0.5, left=-1,
                                                                right=0 if causal else -1),
                                   lambda *a: None, d, causal), log)
        row["gluon_check"] = check
        # The public call reaches the Gluon kernel only at head dims tested on a GPU (GLUON_TESTED);
        # elsewhere the "gluon" column is the kernel called directly (row["gluon_direct"]).
        routed = gluon_shapes_ok(q, k, v)
        row["gluon_direct"] = not routed
        gluon = (lambda: _public(q, k, v, causal, "gluon")) if routed else (
            lambda: gluon_fwd(q, k, v, scale=d ** -0.5, left=-1, right=0 if causal else -1))
        for name, fn in (("triton", lambda: _public(q, k, v, causal, "triton")),
                         ("gluon", gluon),
                         ("cudnn", lambda: _sdpa(torch.nn.attention.SDPBackend.CUDNN_ATTENTION, q, k, v, causal)),
                         ("flash", lambda: _sdpa(torch.nn.attention.SDPBackend.FLASH_ATTENTION, q, k, v, causal))):
            r = _try(lambda: flops / _bench(fn).median_s / 1e12, log)
            row[name] = r if isinstance(r, float) else None
        a, c = gluon()[0] if not routed else gluon(), _public(q, k, v, causal, "triton")
        row["max_diff_vs_triton"] = (a.float() - c.float()).abs().max().item()
        if configs:
            for cfg in CONFIGS.get(d, []):
                def one(cfg=cfg):
                    t = _bench(lambda: gluon_fwd(q, k, v, scale=d ** -0.5, left=-1, right=0 if causal else -1,
                                                 config=cfg)).median_s
                    return flops / t / 1e12
                r = _try(one, log)
                row.setdefault("configs", []).append(dict(cfg, tflops=r if isinstance(r, float) else None))
        rows.append(row)
        log(json.dumps(row))
        del q, k, v
        torch.cuda.empty_cache()
    os.environ.pop("FA2LAB_HOPPER_FWD", None)
    return rows


def table(rows) -> str:
    f = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    lines = ["| case | Triton (TMA) | Gluon | cuDNN | flash | Gluon / cuDNN | Gluon / Triton | rule |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        case = f"N={r['N']} D={r['D']} {'causal' if r['causal'] else 'full'}" + (
            f" GQA {r['Hq']}:{r['Hkv']}" if r["Hq"] != r["Hkv"] else "") + (
            " (Gluon: kernel)" if r.get("gluon_direct") else "")
        ratio = lambda a, b: "-" if not (r.get(a) and r.get(b)) else f"{r[a] / r[b]:.2f}"  # noqa: E731
        ok = r["gluon_check"].get("exact") if isinstance(r["gluon_check"], dict) else None
        lines.append(f"| {case} | {f(r['triton'])} | {f(r['gluon'])} | {f(r['cudnn'])} | {f(r['flash'])} | "
                     f"{ratio('gluon', 'cudnn')} | {ratio('gluon', 'triton')} | {ok} |")
        for c in r.get("configs", []):
            ws = (" WS" if c.get("WS") else "") + (" persistent" if c.get("PERSISTENT") else "") + (f" regs {c['CONSUMER_REGS']}" if "CONSUMER_REGS" in c else "") + (
                f" {c['CONSUMERS']} consumers" if "CONSUMERS" in c else "")
            lines.append(f"|   kernel {c['BLOCK_M']}x{c['BLOCK_N']} s{c['STAGES']} w{c['num_warps']}{ws} | | "
                         f"{f(c['tflops'])} | | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=CASES)
    p.add_argument("--configs", action="store_true", help="kernel-level rows for each candidate tile")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    a = p.parse_args(argv)
    rows = run(_parse(a.cases), a.configs)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"gluon-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(environment=environment(), rows=rows, configs=GLUON_FWD), indent=1, default=str))
    print(table(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
