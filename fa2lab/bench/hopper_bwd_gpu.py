"""The Hopper backward on the H200 through the public call: configurations swept, SDPA flash and cuDNN beside.

    python -m fa2lab.bench.hopper_bwd_gpu [--plan sweep|gluon|fused|fused64|wide|persistent|final|variants] [--out DIR] [--workers 8]

Every figure goes through `fa2lab.attention(q, k, v, causal=..., backend="triton")`, as
fa2lab.bench.gpu does: the backward is timed as `torch.autograd.grad(out, leaves, dO,
retain_graph=True)` (the backward alone, its preprocess, dQ buffer and cast included), the forward
without autograd; SDPA flash and cuDNN the same way, in the same process. A configuration under
test replaces its head dim's row of fa2lab.kernels.hopper_config.BWD for the call (the dispatcher
reads the table per call); "portable" sends the backward to the portable kernels (BWD_PORTABLE).

    flops = 4 * B * H * N * N * D (/2 causal); backward 2.5x  # 5 matmuls of 2*N*N*D vs 2 forward
    B * N = 32k tokens, H * D = 2048 (GQA rows: Hq = 32)

Gradient check in the same job, on the timed inputs: the truth is fp32 SDPA (efficient, or math
where it cannot run); each of dQ, dK, dV of fa2lab (bf16) must be within 3x of SDPA flash's bf16
error (fa2lab's rule, fa2lab.measure.exactness.GRAD_FACTOR) plus bf16's quarter epsilon.

Compiles dominate a short GPU job, so `--workers` processes compile every (case, configuration)
first into Triton's shared cache; timing starts when they are done. Rows are appended to
`hopper-bwd.jsonl` as they are measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fa2lab
from fa2lab.kernels import hopper_config
from fa2lab.measure.exactness import GRAD_FACTOR, exact_floor, max_err

TWO = hopper_config.BWD_TWO_PASS
# (N, D, causal, Hq, Hkv) -> configurations; Hq = Hkv = 2048 / D unless given.
SWEEP = {
    (4096, 128, False): {"two-pass": TWO[128], "one 64x128 w8 s2": dict(dkdvq=(64, 128, 8, 2)),
                         "one 64x128 w8 s2 tma": dict(dkdvq=(64, 128, 8, 2), dq_tma=True),
                         "one 64x128 w8 s3": dict(dkdvq=(64, 128, 8, 3)),
                         "one 64x64 w4 s2": dict(dkdvq=(64, 64, 4, 2)),
                         "one 64x64 w8 s3": dict(dkdvq=(64, 64, 8, 3))},
    (4096, 128, True): {"two-pass": TWO[128], "portable": None, "one 64x128 w8 s2": dict(dkdvq=(64, 128, 8, 2)),
                        "one 64x128 w8 s2 tma": dict(dkdvq=(64, 128, 8, 2), dq_tma=True),
                        "one 64x64 w4 s2": dict(dkdvq=(64, 64, 4, 2))},
    (4096, 64, False): {"two-pass": TWO[64], "one 64x128 w8 s2": dict(dkdvq=(64, 128, 8, 2)),
                        "one 64x128 w4 s3": dict(dkdvq=(64, 128, 4, 3)),
                        "one 64x64 w4 s3": dict(dkdvq=(64, 64, 4, 3))},
    (4096, 256, False): {"two-pass": TWO[256], "dv + dkq 64x64 w8": dict(dv=(64, 128, 8, 2), dkq=(64, 64, 8, 2)),
                         "dv + dkq 64x64 w8 swap": dict(dv=(64, 128, 8, 2), dkq=(64, 64, 8, 2, True)),
                         "one 64x64 w8": dict(dkdvq=(64, 64, 8, 2))},
    (1024, 128, False): {"two-pass": TWO[128], "one 64x128 w8 s2": dict(dkdvq=(64, 128, 8, 2)),
                         "one 64x64 w4 s2": dict(dkdvq=(64, 64, 4, 2))},
}
# The Gluon dK/dV kernel (kernels/gluon_bwd.py, "gluon_dkdv": BLOCK_M, BLOCK_N, STAGES) with the two-pass
# dQ kernel, against the two passes as committed.
_G = lambda d, tiles: dict(TWO[d], gluon_dkdv=tiles)  # noqa: E731
GLUON = {
    (4096, 128, False): {"two-pass": TWO[128], "gluon 64x128 s2": _G(128, (64, 128, 2)),
                         "gluon 32x128 s3": _G(128, (32, 128, 3)), "gluon 64x128 s3": _G(128, (64, 128, 3))},
    (4096, 128, True): {"two-pass": TWO[128], "portable": None, "gluon 64x128 s2": _G(128, (64, 128, 2)),
                        "gluon 32x128 s3": _G(128, (32, 128, 3))},
    (16384, 128, False): {"two-pass": TWO[128], "gluon 64x128 s2": _G(128, (64, 128, 2)),
                          "gluon 32x128 s3": _G(128, (32, 128, 3))},
    (4096, 64, False): {"two-pass": TWO[64], "gluon 64x128 s2": _G(64, (64, 128, 2)),
                        "gluon 64x128 s3": _G(64, (64, 128, 3))},
    (4096, 128, True, 32, 8): {"two-pass": TWO[128], "gluon 64x128 s2": _G(128, (64, 128, 2))},
}
# The one-pass Gluon backward ("gluon_dkdvq": the dK/dV kernel adding dQ in fp32 as it goes, by TMA
# reduce-adds or atomics) against the two passes it replaced (the Gluon dK/dV kernel + the dQ kernel).
_TWO_128 = {key: tiles for key, tiles in hopper_config.BWD[128].items() if key != "gluon_dkdvq"}
_F = lambda tiles: dict(_TWO_128, gluon_dkdvq=tiles)  # noqa: E731
FUSED = {case: {"gluon dkdv + dq": dict(_TWO_128), "one-pass tma 64x128 s2": _F((64, 128, 2)),
                "one-pass tma 64x128 s3": _F((64, 128, 3)), "one-pass atomic 64x128 s2": _F((64, 128, 2, "atomic"))}
         for case in [(1024, 128, False), (4096, 128, False), (4096, 128, True), (16384, 128, False),
                      (16384, 128, True), (4096, 128, True, 32, 8), (8192, 128, False, 32, 4)]}
# The one pass at D = 64 (dQ's halves of 32 columns) against the Triton two passes and the Gluon dK/dV kernel
# with the two-pass dQ.
FUSED_64 = {case: {"two-pass": dict(TWO[64]), "gluon dkdv + dq": dict(TWO[64], gluon_dkdv=(64, 128, 2)),
                   "one-pass 64x128 s2": dict(TWO[64], gluon_dkdvq=(64, 128, 2)),
                   "one-pass 64x128 s3": dict(TWO[64], gluon_dkdvq=(64, 128, 3))}
            for case in [(1024, 64, False), (4096, 64, False), (4096, 64, True), (16384, 64, True),
                         (4096, 64, True, 32, 8)]}
# The one-pass Gluon backward for 128 < D <= 256 ("gluon_wide": kernels/gluon_bwd_wide.py, BLOCK_M,
# BLOCK_N, Q_STAGES, DO_STAGES, DQ_CHUNK[, split]) against the two passes (the Triton dv + dk + dq split);
# 2026-12-04 18:10 UTC's losers (cols q1 do2, cols q2 do2 32-column dQ pieces) left out.
_W = lambda tiles: dict(TWO[256], gluon_wide=tiles)  # noqa: E731
WIDE = {case: {"two-pass": dict(TWO[256]), "wide cols q2 do1": _W((64, 64, 2, 1, 64)),
               "wide keys q2 do1": _W((64, 64, 2, 1, 64, "keys")), "wide keys q1 do2": _W((64, 64, 1, 2, 64, "keys")),
               # a timing probe (dQ wrong, so never 'exact'): the same kernel without its dQ reduce-adds
               "probe: keys q2 do1, no dQ adds": dict(_W((64, 64, 2, 1, 64, "keys")), probe_skip_dq_reduce=True)}
        for case in [(4096, 256, False), (4096, 256, True), (16384, 256, True), (1024, 256, False),
                     (8192, 256, False, 16, 2)]}
# The persistent one pass (one program per SM walking the (key block, head) tiles) against the per-tile one
# pass as committed, at D=128.
PERSISTENT = {case: {"one-pass s2": dict(hopper_config.BWD[128]),
                     "persistent s2": dict(hopper_config.BWD[128], gluon_dkdvq=(64, 128, 2, "persistent")),
                     "persistent s3": dict(hopper_config.BWD[128], gluon_dkdvq=(64, 128, 3, "persistent"))}
              for case in [(1024, 128, False), (1024, 128, True), (4096, 128, False), (4096, 128, True),
                           (16384, 128, True), (4096, 128, True, 32, 8), (8192, 128, False, 32, 4)]}
# Issue 15's backward rows with the dispatcher's own choice (BWD as committed).
FINAL = [(1024, 128, False), (4096, 128, False), (16384, 128, False), (4096, 64, False), (4096, 256, False),
         (1024, 128, True), (4096, 128, True), (16384, 128, True), (4096, 64, True), (4096, 256, True),
         (4096, 128, True, 32, 8), (8192, 128, False, 32, 4)]


def _bench(fn) -> float:
    from fa2lab.bench.gpu import _bench as bench

    return bench(fn).median_s


def _shape(case):
    n, d, causal = case[:3]
    h = hkv = 2048 // d
    if len(case) == 5:
        h, hkv = case[3:]
    return n, d, causal, h, hkv, max(1, 32768 // n)


def _inputs(case, seed=0):
    n, d, causal, h, hkv, b = _shape(case)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    return q, k, v, torch.randn(q.shape, device="cuda", dtype=torch.bfloat16, generator=g)


@contextlib.contextmanager
def bwd_config(d: int, causal: bool, cfg):
    """The public call with `cfg` as head dim d's backward row (None: the portable backward)."""
    from fa2lab.kernels import gluon_bwd_wide

    bound = hopper_config._bound(d)
    old, old_p = dict(hopper_config.BWD), set(hopper_config.BWD_PORTABLE)
    old_c, old_s = dict(hopper_config.BWD_CAUSAL), dict(hopper_config.BWD_SHORT)
    probe = isinstance(cfg, dict) and "probe_skip_dq_reduce" in cfg
    if probe:  # a timing probe of the wide kernel (gluon_bwd_wide.PROBE_SKIP_DQ_REDUCE), not a configuration
        cfg = {key: t for key, t in cfg.items() if key != "probe_skip_dq_reduce"}
        gluon_bwd_wide.PROBE_SKIP_DQ_REDUCE = True
    if cfg is None:
        hopper_config.BWD_PORTABLE.add((bound, causal))
    elif cfg != "dispatch":
        hopper_config.BWD[bound] = cfg
        hopper_config.BWD_CAUSAL.pop(bound, None)  # the row under test, causal or not, short or long
        hopper_config.BWD_SHORT.pop(bound, None)
        hopper_config.BWD_PORTABLE.discard((bound, causal))
    try:
        yield
    finally:
        hopper_config.BWD.clear()
        hopper_config.BWD.update(old)
        hopper_config.BWD_CAUSAL.clear()
        hopper_config.BWD_CAUSAL.update(old_c)
        hopper_config.BWD_SHORT.clear()
        hopper_config.BWD_SHORT.update(old_s)
        gluon_bwd_wide.PROBE_SKIP_DQ_REDUCE = False
        hopper_config.BWD_PORTABLE.clear()
        hopper_config.BWD_PORTABLE.update(old_p)


def _fa2lab(q, k, v, causal, **kw):
    return fa2lab.attention(q, k, v, causal=causal, backend="triton", **kw)


def _with(kw):
    def run(q, k, v, causal):
        extra = dict(kw)
        if "sinks" in extra and q.requires_grad:
            extra["sinks"] = extra["sinks"].detach().requires_grad_()
        return _fa2lab(q, k, v, causal, **extra)
    return run


def _sdpa(backend):
    def run(q, k, v, causal, **kw):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return run


def _grads(fn, q, k, v, do, causal, dtype=None):
    leaves = [(t if dtype is None else t.to(dtype)).detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, causal)
    return torch.autograd.grad(out, leaves, do if dtype is None else do.to(dtype))


def _truth(q, k, v, do, causal):
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            return _grads(_sdpa(backend), q, k, v, do, causal, torch.float32)
        except RuntimeError:
            continue
    raise RuntimeError("no fp32 SDPA backend ran")


def _check(grads, truth, ref):
    """Per gradient: fa2lab's error, SDPA flash's, and the 3x verdict."""
    floor = exact_floor(torch.bfloat16)
    errs = [max_err(g, t) for g, t in zip(grads, truth)]
    refs = [max_err(r, t) for r, t in zip(ref, truth)]
    return dict(err=errs, err_flash=refs, exact=all(e <= GRAD_FACTOR * r + floor for e, r in zip(errs, refs)))


def _kernel_info(before):
    """Registers, spills and shared memory of the Triton kernels compiled since `before` (best effort)."""
    out = []
    try:
        from fa2lab.kernels import hopper_bwd

        for name in ("_hopper_dkdv_kernel", "_hopper_dq_kernel", "_dq_cast_kernel"):
            fn = getattr(hopper_bwd, name)
            for dev_cache in fn.device_caches.values():
                for key, kern in dev_cache[0].items():
                    if (name, key) in before:
                        continue
                    kern._init_handles()
                    out.append(dict(kernel=name, regs=kern.n_regs, spills=kern.n_spills,
                                    shared=kern.metadata.shared, warps=kern.metadata.num_warps))
    except Exception as exc:  # introspection differs between Triton versions
        out.append(dict(error=f"{type(exc).__name__}: {exc}"[:200]))
    return out


def _kernel_keys():
    keys = set()
    with contextlib.suppress(Exception):
        from fa2lab.kernels import hopper_bwd

        for name in ("_hopper_dkdv_kernel", "_hopper_dq_kernel", "_dq_cast_kernel"):
            for dev_cache in getattr(hopper_bwd, name).device_caches.values():
                keys |= {(name, key) for key in dev_cache[0]}
    return keys


VARIANTS = ["plain", "softcap", "alibi", "sinks", "bias", "dropout"]


def _variant_kw(label, case):
    """Issue 17's options at the timed shape (softcap 30, ALiBi U(0,1), sinks N(0,1) with their
    gradient, a (B, H, N, N) bf16 bias, dropout 0.1), as fa2lab.bench.variants_gpu."""
    n, d, causal, h, hkv, b = _shape(case)
    g = torch.Generator(device="cuda").manual_seed(0)
    return {"plain": {}, "softcap": dict(softcap=30.0), "alibi": dict(alibi_slopes=torch.rand(h, device="cuda", generator=g)),
            "sinks": dict(sinks=torch.randn(h, device="cuda", generator=g)),
            "bias": dict(attn_bias=torch.randn(b, h, n, n, device="cuda", generator=g, dtype=torch.bfloat16)),
            "dropout": dict(dropout_p=0.1, generator=g)}[label]


def plan_items(plan: str):
    if plan in ("sweep", "gluon", "fused", "fused64", "wide", "persistent"):
        table = {"sweep": SWEEP, "gluon": GLUON, "fused": FUSED, "fused64": FUSED_64, "wide": WIDE,
                 "persistent": PERSISTENT}[plan]
        return [(case, label, cfg) for case, cfgs in table.items() for label, cfg in cfgs.items()]
    if plan == "final":
        return [(case, "dispatch", "dispatch") for case in FINAL]
    if plan == "variants":
        return [((4096, 128, False), name, "dispatch") for name in VARIANTS]
    if plan == "final+variants":
        return plan_items("final") + plan_items("variants")
    raise ValueError(f"unknown plan {plan!r}: expected 'sweep', 'gluon', 'fused', 'fused64', 'wide', 'persistent', 'final', 'variants' or "
                     f"'final+variants'")


def warm(items, index: int, count: int):
    """Compile this worker's share of the items (one forward + backward each)."""
    for i, (case, label, cfg) in enumerate(items):
        if i % count != index:
            continue
        q, k, v, do = _inputs(case)
        try:
            with bwd_config(case[1], case[2], cfg):
                _grads(_fa2lab, q, k, v, do, case[2])
            torch.cuda.synchronize()
        except Exception as exc:
            print(f"warm {case} {label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


def measure(items, sink, log=print):
    """Per case: the truth and SDPA flash's gradients once, then each configuration and the peers."""
    rows, by_case = [], {}
    for case, label, cfg in items:
        by_case.setdefault(case, []).append((label, cfg))
    for case, cfgs in by_case.items():
        n, d, causal, h, hkv, b = _shape(case)
        flops = 4 * b * h * n * n * d / (2 if causal else 1)
        shape = dict(N=n, D=d, causal=causal, H=h, Hkv=hkv, B=b)
        q, k, v, do = _inputs(case)
        truth = _truth(q, k, v, do, causal)
        ref = _grads(_sdpa(SDPBackend.FLASH_ATTENTION), q, k, v, do, causal)
        # A variant's row (no SDPA twin; checked by the GPU tests) or a configuration's row; one case
        # may hold both (plan "final+variants").
        runs = [("fa2lab " + label, label, _with(_variant_kw(label, case)), cfg) if label in VARIANTS
                else ("fa2lab", label, _fa2lab, cfg) for label, cfg in cfgs]
        runs += [(name, name, _sdpa(be), None) for name, be in (("sdpa flash", SDPBackend.FLASH_ATTENTION),
                                                                ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION))]
        fwd_ms = {}
        for impl_name, label, impl, cfg in runs:
            row = dict(impl=impl_name, config=label, cfg=repr(cfg), **shape)
            try:
                ctx = bwd_config(d, causal, cfg) if impl_name.startswith("fa2lab") else contextlib.nullcontext()
                with ctx:
                    before = _kernel_keys()
                    if impl_name not in fwd_ms:  # the forward does not depend on the backward's tiles
                        fwd_ms[impl_name] = _bench(lambda: impl(q, k, v, causal)) * 1e3
                    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                    out = impl(*leaves, causal)
                    grads = torch.autograd.grad(out, leaves, do, retain_graph=True)
                    t_b = _bench(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True))
                    t_f = fwd_ms[impl_name] * 1e-3
                    row.update(fwd_ms=t_f * 1e3, bwd_ms=t_b * 1e3, fwd_tflops=flops / t_f / 1e12,
                               bwd_tflops=2.5 * flops / t_b / 1e12)
                    if impl_name == "fa2lab" or label in ("sdpa flash", "sdpa cudnn") or label == "plain":
                        row.update(_check(grads, truth, ref))
                    if impl is _fa2lab:
                        row["kernels"] = _kernel_info(before)
                    del out, grads, leaves
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            log(f"{label:<26} N={n:>5} D={d:>3} {'causal' if causal else 'full  '} H={h}/{hkv} "
                + (f"bwd {row['bwd_tflops']:6.1f} fwd {row['fwd_tflops']:6.1f} exact={row.get('exact', 'not checked here')}"
                   if "bwd_tflops" in row else row.get("error", "")), flush=True)
        del q, k, v, do, truth, ref
        torch.cuda.empty_cache()
    return rows


def summary(rows) -> list[str]:
    """Per case: the best exact fa2lab row against cuDNN's backward."""
    lines = []
    cases = {}
    for r in rows:
        cases.setdefault((r["N"], r["D"], r["causal"], r["H"], r["Hkv"]), []).append(r)
    plain = next((r for r in rows if r["impl"] == "fa2lab plain" and "bwd_ms" in r), None)
    if plain:  # time of each variant over the plain kernel's, same run (issue 17's targets)
        for part in ("fwd", "bwd"):
            lines.append(" ".join(f"{r['config']} {r[part + '_ms'] / plain[part + '_ms']:.2f}" for r in rows
                                  if r["impl"].startswith("fa2lab ") and "bwd_ms" in r) + f" ({part} x plain)")
    for (n, d, causal, h, hkv), rs in cases.items():
        if all(r["impl"].startswith("fa2lab ") for r in rs):
            continue
        cud = next((r for r in rs if r["impl"] == "sdpa cudnn" and "bwd_tflops" in r), None)
        ours = [r for r in rs if r["impl"] == "fa2lab" and r.get("exact")]
        if not ours or cud is None:
            lines.append(f"N={n} D={d} {'c' if causal else 'f'} {h}/{hkv}: no exact fa2lab row or no cuDNN")
            continue
        best = max(ours, key=lambda r: r["bwd_tflops"])
        lines.append(f"N={n} D={d} {'c' if causal else 'f'} {h}/{hkv}: {best['config']} {best['bwd_tflops']:.0f} "
                     f"cudnn {cud['bwd_tflops']:.0f} x{best['bwd_tflops'] / cud['bwd_tflops']:.2f}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fa2lab.bench.hopper_bwd_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--plan", default="sweep")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--warm-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--warm-budget", type=float, default=60.0, help="seconds the compile workers may take")
    args = p.parse_args(argv)
    items = plan_items(args.plan)
    if args.warm_index is not None:
        warm(items, args.warm_index, args.workers)
        return 0
    t0 = time.time()
    if args.workers > 0:
        procs = [subprocess.Popen([sys.executable, "-m", "fa2lab.bench.hopper_bwd_gpu", "--plan", args.plan,
                                   "--workers", str(args.workers), "--warm-index", str(i)]) for i in range(args.workers)]
        deadline = time.time() + args.warm_budget
        for pr in procs:
            try:
                pr.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pr.kill()
                pr.wait()
        print(f"compiled in {time.time() - t0:.1f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    from fa2lab.bench.gpu import environment

    env = environment()
    with (args.out / "hopper-bwd.jsonl").open("a") as sink:
        sink.write(json.dumps(dict(environment=env, plan=args.plan, date=time.strftime("%Y-%m-%d %H:%M:%S"))) + "\n")
        rows = measure(items, sink)
    print(f"measured in {time.time() - t0:.1f} s")
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
