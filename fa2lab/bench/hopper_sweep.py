"""Sweep of the Hopper kernels' launch configurations, each checked for exactness, next to cuDNN.

    python -m fa2lab.bench.hopper_sweep [--parts fwd,bwd,portable] [--out DIR]

For every (head dim, causal) of the FA2-paper protocol (bf16, B*N = 32k tokens, H*D = 2048,
N = 4096) and every candidate configuration: an exactness check on an awkward small shape
(B=1, Hq=4, Hkv=2, N=1000: GQA, a ragged last block) against float64 with fa2lab's rule (error
<= 2x PyTorch's same-dtype error forward, 3x for gradients), then a `do_bench` median at full
size. Kernel-level figures (hopper_fwd / hopper_bwd called directly, no autograd): the public
call's figures come from `fa2lab bench`. Peers (SDPA cuDNN and flash, through autograd) in the
same run. flops = 4*B*H*N*N*D (/2 causal), backward 2.5x. Writes hopper-sweep-*.json.
"""

from __future__ import annotations

import ast

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fa2lab.bench.gpu import _bench, environment, peaks, save_results
from fa2lab.kernels.bwd import flash_bwd_triton
from fa2lab.kernels.hopper_bwd import hopper_bwd
from fa2lab.kernels.hopper_fwd import hopper_fwd
from fa2lab.measure.timing import print_process_warning
from fa2lab.reference import attention_ref


def _f(bm, bn, w, s, **flags):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, **flags)


# Per-program device descriptors against host descriptors (HOST_DESC) at the tiles chosen by the
# first sweep (hopper_config.py cites it); the dispatcher's configs use host descriptors.
FWD = {
    64: [_f(128, 64, 8, 3), _f(128, 64, 8, 3, HOST_DESC=True)],
    128: [_f(128, 128, 8, 3), _f(128, 128, 8, 3, HOST_DESC=True), _f(128, 128, 8, 3, HOST_DESC=True, PERSISTENT=True)],
    256: [_f(128, 64, 8, 2, WARP_SPECIALIZE=True), _f(128, 64, 8, 2, WARP_SPECIALIZE=True, HOST_DESC=True)],
}
# Second sweep (issue 15's forward): the chosen configs against lazy rescaling, warp specialisation
# with host descriptors, tiles small enough for two programs per SM (one program's softmax under the
# other's matmuls, as FA3's ping-pong of two warpgroups), and the longest-first order across heads.
H = dict(HOST_DESC=True)
FWD2 = {
    (128, False): [_f(128, 128, 8, 3, **H), _f(128, 128, 8, 3, LAZY_RESCALE=True, **H),
                   _f(128, 128, 8, 3, WARP_SPECIALIZE=True, **H), _f(128, 64, 8, 3, **H),
                   _f(128, 64, 8, 2, maxnreg=128, **H), _f(64, 64, 4, 3, **H)],
    "pipe": [_f(128, 64, 8, 3, PIPELINE_QK=True, **H), _f(128, 128, 8, 2, PIPELINE_QK=True, **H)],
    (128, True): [_f(128, 128, 8, 3, **H), _f(128, 128, 8, 3, LAZY_RESCALE=True, **H),
                  _f(128, 128, 8, 3, M_MAJOR=True, **H), _f(64, 64, 4, 3, **H)],
}
BWD = {
    64: [dict(dkdv=(64, 128, 8, 2), dq=(128, 64, 8, 2)), dict(dkdv=(64, 128, 8, 3), dq=(128, 64, 8, 3)),
         dict(dkdv=(32, 128, 4, 3), dq=(128, 32, 4, 3))],
    128: [dict(dkdv=(64, 128, 8, 2), dq=(128, 64, 8, 2)), dict(dkdv=(32, 128, 8, 2), dq=(128, 64, 8, 3)),
          dict(dkdv=(64, 64, 8, 3), dq=(128, 128, 8, 2)), dict(dkdv=(64, 128, 8, 2, True), dq=(64, 64, 4, 3))],
    256: [dict(dkdv=(64, 64, 8, 2), dq=(64, 64, 8, 2)),
          dict(dv=(64, 128, 8, 2), dk=(32, 128, 8, 2), dq=(64, 64, 8, 2)),
          dict(dv=(64, 64, 8, 2), dk=(64, 64, 8, 2, True), dq=(128, 32, 8, 2))],
}
# The portable kernels at head dim 256 (Ampere's path): the old tiles (4 warps: the two 64 x 256
# fp32 accumulators spill) against 8 warps.
PORTABLE_256 = [dict(dkdv=(32, 64, 4, 2), dq=(64, 32, 4, 2)), dict(dkdv=(32, 64, 8, 2), dq=(64, 32, 8, 2)),
                dict(dkdv=(64, 64, 8, 1), dq=(64, 64, 8, 1))]


def _sdpa(backend, q, k, v, causal):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def _rule(fwd, bwd, d, causal, dtype=torch.bfloat16) -> dict:
    """fa2lab's exactness rule on B=1, Hq=4, Hkv=2, N=1000 (GQA, ragged blocks) for one config."""
    g = torch.Generator().manual_seed(0)
    q64, k64, v64 = (torch.randn(1, h, 1000, d, generator=g, dtype=torch.float64).cuda() for h in (4, 2, 2))
    do64 = torch.randn(1, 4, 1000, d, generator=g, dtype=torch.float64).cuda()
    leaves = lambda dt: [t.to(dt).requires_grad_() for t in (q64, k64, v64)]  # noqa: E731
    kw = dict(causal=causal)
    t = leaves(torch.float64)
    truth = attention_ref(*t, **kw)
    truth_g = torch.autograd.grad(truth, t, do64)
    t = leaves(dtype)
    naive = attention_ref(*t, upcast=False, **kw)
    naive_g = torch.autograd.grad(naive, t, do64.to(dtype))
    q, k, v = (x.to(dtype) for x in (q64, k64, v64))
    out, lse = fwd(q, k, v)
    ours_g = bwd(do64.to(dtype), q, k, v, out, lse)
    err = lambda a, b: (a.double() - b.double()).abs().max().item()  # noqa: E731
    floor = torch.finfo(dtype).eps / 4
    res = dict(fwd_ratio=err(out, truth) / max(err(naive, truth), floor))
    ok = err(out, truth) <= 2 * err(naive, truth) + floor
    if ours_g is not None:
        for name, a, r, n in zip("qkv", ours_g, truth_g, naive_g):
            res[f"d{name}_ratio"] = err(a, r) / max(err(n, r), floor)
            ok = ok and err(a, r) <= 3 * err(n, r) + floor
    res["exact"] = bool(ok)
    return res


def _try(fn, log):
    try:
        return fn()
    except Exception as exc:  # a config that does not compile or fit is reported, not fatal
        log(f"    {type(exc).__name__}: {str(exc)[:160]}")
        return dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")


def sweep(parts, cases, log=print, sink=None) -> list[dict]:
    """sink: an open file that receives each row as a JSON line when it is measured."""
    rows = _Rows(sink)
    for n, d, causal in cases:
        h, b = 2048 // d, max(1, 32768 // n)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        do = torch.randn_like(q)
        flops = 4 * b * h * n * n * d / (2 if causal else 1)  # 2 matmuls of 2*N*N*D, half masked if causal
        right, scale = (0 if causal else -1), d ** -0.5
        shape = dict(N=n, D=d, B=b, H=h, causal=causal)
        for name, backend in (("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa flash", SDPBackend.FLASH_ATTENTION)):
            def peer():
                t = _bench(lambda: _sdpa(backend, q, k, v, causal)).median_s
                if not parts & {"bwd", "portable"}:
                    return dict(fwd_tflops=flops / t / 1e12)
                leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                out = _sdpa(backend, *leaves, causal)
                tb = _bench(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True)).median_s
                return dict(fwd_tflops=flops / t / 1e12, bwd_tflops=2.5 * flops / tb / 1e12)
            r = _try(peer, log)
            rows.append(dict(kind="peer", impl=name, **shape, **r))
            log(f"{name:<12} N={n} D={d} causal={causal}: {r}")
        fwd_of = lambda cfg: (lambda q_, k_, v_: hopper_fwd(q_, k_, v_, scale=q_.shape[-1] ** -0.5, left=-1,  # noqa: E731
                                                             right=right, config=cfg))
        if "fwd" in parts or "fwd2" in parts:
            for cfg in (FWD[d] if "fwd" in parts else FWD2["pipe"] if "pipe" in parts and not causal
                        else FWD2.get((d, causal), [])):
                def one():
                    check = _rule(fwd_of(cfg), lambda *a: None, d, causal)
                    t = _bench(lambda: fwd_of(cfg)(q, k, v)).median_s
                    return dict(check, tflops=flops / t / 1e12, ms=t * 1e3)
                r = _try(one, log)
                rows.append(dict(kind="fwd", impl="hopper", config=cfg, **shape, **r))
                log(f"fwd  N={n} D={d} causal={causal} {cfg}: {r}")
        bwd_sets = [("bwd", hopper_bwd, BWD[d])]
        if "portable" in parts and d == 256 and not causal:
            bwd_sets.append(("bwd-portable", flash_bwd_triton, PORTABLE_256))
        if "bwd" in parts or "portable" in parts:
            out, lse = hopper_fwd(q, k, v, scale=scale, left=-1, right=right)
            for kind, impl, cfgs in bwd_sets:
                if kind == "bwd" and "bwd" not in parts:
                    continue
                for cfg in cfgs:
                    def bwd_fn(do_, q_, k_, v_, o_, l_, impl=impl, cfg=cfg):
                        return impl(do_, None, q_, k_, v_, o_, l_, scale=q_.shape[-1] ** -0.5, left=-1, right=right,
                                    config=cfg)

                    def one():
                        check = _rule(fwd_of(None), bwd_fn, d, causal)
                        t = _bench(lambda: bwd_fn(do, q, k, v, out, lse)).median_s
                        return dict(check, tflops=2.5 * flops / t / 1e12, ms=t * 1e3)
                    r = _try(one, log)
                    rows.append(dict(kind=kind, impl=impl.__name__, config={k_: list(v_) for k_, v_ in cfg.items()},
                                     **shape, **r))
                    log(f"{kind} N={n} D={d} causal={causal} {cfg}: {r}")
        del q, k, v, do
        torch.cuda.empty_cache()
    return rows


class _Rows(list):
    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def append(self, row):
        super().append(row)
        if self.sink is not None:
            self.sink.write(json.dumps(row) + "\n")
            self.sink.flush()


def table(rows) -> str:
    """Best exact config per (kind, N, D, causal) and its ratio to cuDNN."""
    peers = {(r["N"], r["D"], r["causal"]): r for r in rows if r["kind"] == "peer" and r["impl"] == "sdpa cudnn"}
    best = {}
    for r in rows:
        if r["kind"] == "peer" or "tflops" not in r or not r.get("exact"):
            continue
        key = (r["kind"], r["N"], r["D"], r["causal"])
        if key not in best or r["tflops"] > best[key]["tflops"]:
            best[key] = r
    lines = ["| kernel | N | D | causal | TFLOP/s | cuDNN | ratio | config |", "|---|---|---|---|---|---|---|---|"]
    for (kind, n, d, causal), r in sorted(best.items(), key=lambda x: (x[0][0], x[0][2], x[0][3], x[0][1])):
        peer = peers.get((n, d, causal), {})
        ref = peer.get("bwd_tflops" if kind.startswith("bwd") else "fwd_tflops")
        ratio = f"{r['tflops'] / ref:.2f}" if ref else "-"
        lines.append(f"| {kind} | {n} | {d} | {causal} | {r['tflops']:.0f} | {ref or 0:.0f} | {ratio} | "
                     f"{json.dumps(r['config'])} |")
    return "\n".join(lines)


def roofline_rows(results: dict, profile_name: str = "h200") -> list[dict]:
    """The cost model next to a `fa2lab bench --hopper` run: for every fa2lab forward row, the
    roofline time of `fa2lab.cost.predict.fa2_forward` with the Hopper tiles, and measured / predicted."""
    from fa2lab.cost.predict import fa2_forward
    from fa2lab.hardware import get_profile
    from fa2lab.kernels.hopper_config import hopper_fwd_config

    prof = get_profile(profile_name)
    out = []
    for r in results["rows"]:
        if r.get("kind") != "fwd" or r.get("impl") != "fa2lab triton" or "ms" not in r:
            continue
        cfg = hopper_fwd_config(r["D"], causal=r["causal"], seq_len=r["N"])
        roof = fa2_forward(prof, r["B"], r["H"], r["N"], r["N"], r["D"], "bfloat16", causal=r["causal"],
                           hkv=r.get("Hkv", r["H"]), block_q=cfg["BLOCK_M"], block_k=cfg["BLOCK_N"])
        out.append(dict(N=r["N"], D=r["D"], causal=r["causal"], H=r["H"], Hkv=r.get("Hkv", r["H"]),
                        measured_ms=r["ms"], predicted_ms=roof.time * 1e3, bound=roof.bound,
                        measured_over_predicted=r["ms"] / (roof.time * 1e3)))
    return out


# Backward configuration keys whose kernels add dQ across key blocks in the same pass (kernels/hopper_bwd.py).
ONE_PASS_KEYS = ("dkdvq", "gluon_dkdvq", "gluon_wide")


def backward_roofline_rows(rows, profile_name: str = "h200") -> list[dict]:
    """The cost model next to `bench.hopper_bwd_gpu`'s JSONL rows of fa2lab (each names its backward
    configuration: one pass where it holds a key of ONE_PASS_KEYS, dQ added across key blocks; two
    passes otherwise; timing probes, marked probe_skip_dq_reduce, left out). -> rows with measured_ms and
    the roofs of the kernel's own pass count and tile (compute,
    memory, bound, predicted = the highest)."""
    from fa2lab.cost.predict import fa2_backward
    from fa2lab.hardware import get_profile

    prof = get_profile(profile_name)
    out = []
    for r in rows:
        if r.get("impl") != "fa2lab" or "bwd_ms" not in r or r.get("cfg") in (None, "None", "'dispatch'"):
            continue  # peers, failed rows, and rows whose configuration is not recorded
        try:  # the recorded configuration (a dict's repr, read as a literal: nothing in it is executed)
            cfg = ast.literal_eval(r["cfg"])
        except (ValueError, SyntaxError):
            cfg = {}
        cfg = cfg if isinstance(cfg, dict) else {}
        if cfg.get("probe_skip_dq_reduce"):
            continue
        ms, label = r["bwd_ms"], r.get("config", "")
        passes, blocks = 2, {}
        for key in ONE_PASS_KEYS:
            if key in cfg:  # the one pass's own tile: (BLOCK_M, BLOCK_N, ...)
                passes, blocks = 1, dict(block_q=cfg[key][0], block_k=cfg[key][1])
        roof = fa2_backward(prof, r["B"], r["H"], r["N"], r["N"], r["D"], "bfloat16", causal=r["causal"],
                            passes=passes, **blocks)
        out.append(dict(N=r["N"], D=r["D"], causal=r["causal"], H=r["H"], Hkv=r.get("Hkv", r["H"]), config=label,
                        passes=passes, measured_ms=ms, compute_ms=roof.t_compute * 1e3, memory_ms=roof.t_memory * 1e3,
                        bound=roof.bound, predicted_ms=roof.time * 1e3,
                        measured_over_predicted=ms / (roof.time * 1e3)))
    return out


def fastest_per_pass(rows: list[dict]) -> list[dict]:
    """Of `backward_roofline_rows`, the fastest measured configuration per (shape, pass count)."""
    best: dict = {}
    for r in rows:
        key = (r["N"], r["D"], r["causal"], r["H"], r["Hkv"], r["passes"])
        if key not in best or r["measured_ms"] < best[key]["measured_ms"]:
            best[key] = r
    return list(best.values())


def read_rows(path: Path) -> list[dict]:
    """A JSONL file's rows (one a line; header lines without rows skipped)."""
    return [row for row in map(json.loads, path.read_text().splitlines()) if "N" in row]


def read_results(root: Path, names) -> list[dict]:
    """The rows of every named JSONL file under root that exists. names: a list of relative paths or one
    string of them separated by commas (a notebook parameter); "" reads none."""
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    return [row for name in names if (Path(root) / name).exists() for row in read_rows(Path(root) / name)]


CASES = [(4096, 128, False), (4096, 128, True), (4096, 64, False), (4096, 256, False), (1024, 128, False)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fa2lab.bench.hopper_sweep", description=__doc__)
    p.add_argument("--parts", default="fwd,bwd,portable", help="fwd, fwd2 (the second forward sweep), bwd, portable")
    p.add_argument("--cases", default=None, help="N:D:causal,... (default: the FA2-paper shapes)")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--no-peaks", action="store_true", help="skip the matmul / copy peaks (device time)")
    p.add_argument("--jsonl", type=Path, default=None, help="also append each row to this file as it is measured")
    p.add_argument("--predict", type=Path, default=None,
                   help="no GPU: print the cost model's forward times next to a gpu-*.json of `bench --hopper`")
    p.add_argument("--predict-bwd", type=Path, default=None,
                   help="no GPU: the cost model's backward roofs next to the rows of a hopper_bwd_gpu JSONL")
    args = p.parse_args(argv)
    if args.predict:
        print("| case | measured ms | predicted ms (roofline) | bound | measured / predicted |\n|---|---|---|---|---|")
        for r in roofline_rows(json.loads(args.predict.read_text())):
            gqa = f" GQA {r['H']}:{r['Hkv']}" if r["H"] != r["Hkv"] else ""
            print(f"| N={r['N']} D={r['D']} {'causal' if r['causal'] else 'full'}{gqa} | {r['measured_ms']:.3f} | "
                  f"{r['predicted_ms']:.3f} | {r['bound']} | {r['measured_over_predicted']:.2f} |")
    if args.predict_bwd:
        print("| case | configuration | passes | measured ms | compute roof ms | memory roof ms | bound | "
              "measured / predicted |\n|---|---|---|---|---|---|---|---|")
        for r in backward_roofline_rows(read_rows(args.predict_bwd)):
            gqa = f" GQA {r['H']}:{r['Hkv']}" if r["H"] != r["Hkv"] else ""
            print(f"| N={r['N']} D={r['D']} {'causal' if r['causal'] else 'full'}{gqa} | {r['config']} | {r['passes']} | "
                  f"{r['measured_ms']:.3f} | {r['compute_ms']:.3f} | {r['memory_ms']:.3f} | {r['bound']} | "
                  f"{r['measured_over_predicted']:.2f} |")
    if args.predict or args.predict_bwd:
        return 0
    cases = CASES if not args.cases else [(int(n), int(d), c == "1") for n, d, c in
                                          (x.split(":") for x in args.cases.split(","))]
    env = environment()
    print(env)
    pk = peaks() if not args.no_peaks else {}
    if pk:
        print(f"peaks: bf16 matmul {pk['matmul_tflops']:.0f} TFLOP/s, copy {pk['copy_tbps']:.2f} TB/s", flush=True)
    sink = args.jsonl.open("a") if args.jsonl else None
    rows = sweep(set(args.parts.split(",")), cases, sink=sink)
    save_results(args.out, "hopper-sweep", dict(environment=env, peaks=pk, rows=rows))
    print(table(rows))
    print_process_warning()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
