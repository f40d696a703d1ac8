"""GPU kernels (notebook 07): benchmark results of fa2lab's Triton kernels against SDPA (flash,
cuDNN, efficient, math) and FlexAttention, as TFLOP/s and TB/s next to the measured peaks.

Results files are what `python -m fa2lab.bench.gpu` writes: experiments/results/gpu-*.json,
{"environment": {...}, "peaks": {"matmul_tflops", "copy_tbps"}, "rows": [...]} with rows of kind
fwd / bwd (tflops) and decode (tbps). `latest_by_kind` also reads the planned public decode call's
rows from experiments/results/decode-*.json (`python -m fa2lab.bench.decode_gpu`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import plotly.graph_objects as go

from fa2lab.viz.style import styled

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"
IMPL_ORDER = ("fa2lab triton", "sdpa flash", "sdpa cudnn", "flex (compiled)", "sdpa efficient", "sdpa math")
IMPL_COLORS = {"fa2lab triton": "#4c78a8", "sdpa flash": "#f58518", "sdpa cudnn": "#54a24b",
               "flex (compiled)": "#b279a2", "sdpa efficient": "#72b7b2", "sdpa math": "#9d755d"}


KINDS = ("fwd", "bwd", "decode")


def has_kind(results: dict | None, kind: str) -> bool:
    """Whether a results file holds rows of this kind ("fwd", "bwd" or "decode")."""
    return bool(results) and any(r.get("kind") == kind for r in results.get("rows", []))


def latest_gpu_results(folder=None) -> tuple[Path | None, dict | None]:
    """The newest gpu-*.json under `folder` (default experiments/results/) and its contents; file
    names carry a sortable timestamp (gpu-YYYYMMDD-HHMMSS.json). The newest that holds forward,
    backward and decode rows wins, so a partial run (--quick, --only) does not hide the last full
    one; without a full one, the newest file. (None, None) if there is none."""
    folder = Path(folder) if folder is not None else RESULTS
    loaded = [(path, json.loads(path.read_text())) for path in sorted(folder.glob("gpu-*.json"), reverse=True)]
    full = [(path, res) for path, res in loaded if all(has_kind(res, kind) for kind in KINDS)]
    return (full or loaded or [(None, None)])[0]


# The planned public decode call's rows (`python -m fa2lab.bench.decode_gpu`, decode-*.json, kind
# "decode_public") as decode rows: the dense planned call is fa2lab's bar, paged layouts its variants.
DECODE_PUBLIC_IMPLS = {"plan dense": "fa2lab triton", "paged 16": "fa2lab paged 16", "paged 1": "fa2lab paged 1",
                       "no plan": "fa2lab no plan", "sdpa flash": "sdpa flash", "sdpa cudnn": "sdpa cudnn"}


def _stamp(path: Path) -> str:
    """'gpu-20261202-090632.json' -> '20261202-090632' (both bench families name files so)."""
    match = re.search(r"(\d{8}-\d{6})", path.name)
    return match.group(1) if match else ""


def decode_public_as_gpu(results: dict) -> dict:
    """A decode-*.json (bench.decode_gpu) with its public-call rows renamed to decode rows."""
    rows = [dict(r, kind="decode", impl=DECODE_PUBLIC_IMPLS[r["impl"]]) for r in results.get("rows", [])
            if r.get("kind") == "decode_public" and r.get("impl") in DECODE_PUBLIC_IMPLS]
    return dict(results, rows=rows)


# `python -m fa2lab.bench.hopper_bwd_gpu --plan final` rows (the dispatcher's backward next to SDPA's) as bwd rows.
HOPPER_BWD_IMPLS = {"fa2lab": "fa2lab triton", "sdpa flash": "sdpa flash", "sdpa cudnn": "sdpa cudnn"}


def hopper_bwd_as_gpu(text: str) -> dict:
    """A bwd-final-*.jsonl (bench.hopper_bwd_gpu --plan final: a header line with the environment, then one
    row a line) as bwd rows: the dispatcher's fa2lab row is fa2lab's bar, SDPA's keep their names; the
    backward's ms and TFLOP/s, and the 3x-rule verdict. No peaks: that bench does not measure them."""
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    header = next((line for line in lines if "environment" in line), {})
    rows = [dict(kind="bwd", impl=HOPPER_BWD_IMPLS[r["impl"]], N=r["N"], D=r["D"], B=r["B"], H=r["H"], Hkv=r["Hkv"],
                 causal=r["causal"], ms=r["bwd_ms"], tflops=r["bwd_tflops"], exact=r.get("exact"))
            for r in lines if "bwd_ms" in r and r.get("impl") in HOPPER_BWD_IMPLS
            and (r["impl"] != "fa2lab" or r.get("config") == "dispatch")]
    env = dict(header.get("environment", {}), source="python -m fa2lab.bench.hopper_bwd_gpu --plan final")
    return dict(environment=env, peaks={}, rows=rows)


def latest_by_kind(folder=None) -> dict[str, tuple[Path, dict]]:
    """Per kind (fwd, bwd, decode), the newest results file holding rows of that kind, by the
    timestamp in its name: gpu-*.json (bench.gpu) for all three, decode-*.json (bench.decode_gpu,
    the planned public call) for decode as well, bwd-final-*.jsonl (bench.hopper_bwd_gpu --plan
    final) for bwd. Kinds no file holds are absent. A benchmark run often measures one kind only;
    this keeps each figure on the newest measurement of its kind."""
    folder = Path(folder) if folder is not None else RESULTS
    files = [(path, json.loads(path.read_text())) for path in folder.glob("gpu-*.json")]
    files += [(path, decode_public_as_gpu(json.loads(path.read_text()))) for path in folder.glob("decode-*.json")]
    files += [(path, hopper_bwd_as_gpu(path.read_text())) for path in folder.glob("bwd-final-*.jsonl")]
    files.sort(key=lambda item: _stamp(item[0]), reverse=True)
    latest = {}
    for kind in KINDS:
        found = next(((path, res) for path, res in files if has_kind(res, kind)), None)
        if found:
            latest[kind] = found
    return latest


def latest_merged(folder=None) -> tuple[str | None, dict | None]:
    """One results dict holding each kind's rows from its newest file (`latest_by_kind`), for views
    that read several kinds at once (notebook 06's rooflines, the sweep report). Only files from the
    device of the newest forward file (or, without one, the newest of any kind) join, so a figure
    never mixes GPUs; environment and peaks come from that file. -> (label naming the files, results),
    or (None, None) if there is no results file."""
    latest = latest_by_kind(folder)
    if not latest:
        return None, None
    lead_path, lead = latest.get("fwd") or max(latest.values(), key=lambda item: _stamp(item[0]))
    device = lead.get("environment", {}).get("device")
    rows, names = [], []
    for kind in KINDS:
        if kind in latest and latest[kind][1].get("environment", {}).get("device") == device:
            path, res = latest[kind]
            rows += [r for r in res.get("rows", []) if r.get("kind") == kind]
            names.append(f"{kind}: {path.name}")
    return ", ".join(names), dict(lead, rows=rows)


def impl_name(impl: str) -> str:
    """'fa2lab triton (splits=66)' -> 'fa2lab triton': one series per implementation."""
    return impl.split(" (splits")[0]


def case_label(row: dict) -> str:
    if row["kind"] == "decode":
        return f"B={row['B']} Hq={row['Hq']} Hkv={row['Hkv']} L={row['L']}"
    gqa = f" GQA {row['H']}:{row['Hkv']}" if row.get("Hkv") not in (None, row.get("H")) else ""
    return f"N={row['N']} D={row['D']} {'causal' if row['causal'] else 'full'}{gqa}"


def throughput_figure(results: dict, kind: str = "fwd") -> go.Figure:
    """Grouped bars, one group per benchmarked shape and one bar per implementation: TFLOP/s for
    fwd / bwd, TB/s for decode; the peak measured in the same run (bf16 matmul or device copy)
    as a dotted line. Rows that failed (an `error` field) are left out. Error bars: the spread of
    the timing (min to max, fa2lab.measure); a contended or throttled timing is a cross-hatched bar."""
    if kind not in ("fwd", "bwd", "decode"):
        raise ValueError(f"expected kind 'fwd', 'bwd' or 'decode', got {kind!r}")
    rows = [r for r in results.get("rows", []) if r.get("kind") == kind and "error" not in r]
    metric, unit = ("tbps", "TB/s") if kind == "decode" else ("tflops", "TFLOP/s")
    cases = list(dict.fromkeys(case_label(r) for r in rows))
    impls = [i for i in IMPL_ORDER if any(impl_name(r["impl"]) == i for r in rows)]
    impls += [i for i in dict.fromkeys(impl_name(r["impl"]) for r in rows) if i not in impls]
    fig = go.Figure()
    for impl in impls:
        by_case = {case_label(r): r for r in rows if impl_name(r["impl"]) == impl}
        got = [by_case.get(c) for c in cases]
        spread = [_spread(r, metric) for r in got]
        error = dict(type="data", symmetric=False, array=[s[1] for s in spread], arrayminus=[s[0] for s in spread]) \
            if any(s != (0.0, 0.0) for s in spread) else None
        unsound = [bool(r and (r.get("contended") or r.get("throttled"))) for r in got]
        fig.add_bar(x=cases, y=[r[metric] if r else None for r in got], name=impl, error_y=error,
                    marker=dict(color=IMPL_COLORS.get(impl), pattern_shape=["x" if u else "" for u in unsound]),
                    hovertext=["contended or throttled: not sound" if u else "" for u in unsound])
    peaks = results.get("peaks", {})
    peak = peaks.get("copy_tbps" if kind == "decode" else "matmul_tflops")
    if peak:
        fig.add_hline(y=peak, line_dash="dot", line_color="#333333",
                      annotation_text=f"measured peak {peak:.3g} {unit}", annotation_position="top left")
    env = results.get("environment", {})
    what = {"fwd": "forward", "bwd": "backward", "decode": "decode, one token (bytes = K and V read once)"}[kind]
    return styled(fig, title=f"{what}: {env.get('device', 'GPU')}, {env.get('date', '')}", barmode="group",
                  yaxis_title=unit, width=980, height=440, legend=dict(orientation="h", y=-0.25))


def _spread(row: dict | None, metric: str) -> tuple[float, float]:
    """(minus, plus) of a throughput from its timing's max and min (rows written before the
    timings carried their spread: none)."""
    if not row or row.get("min_ms") is None or row.get("max_ms") is None:
        return 0.0, 0.0
    ms = row["ms"] if "ms" in row else row["us"] * 1e-3
    value = row[metric]
    return value - value * ms / row["max_ms"], value * ms / row["min_ms"] - value


def ratio_table(results: dict, kind: str = "fwd", baseline: str = "sdpa flash") -> list[dict]:
    """fa2lab triton's throughput over `baseline`'s for every shape of `kind` that both ran."""
    metric = "tbps" if kind == "decode" else "tflops"
    rows = [r for r in results.get("rows", []) if r.get("kind") == kind and "error" not in r]
    ours = {case_label(r): r for r in rows if impl_name(r["impl"]) == "fa2lab triton"}
    base = {case_label(r): r for r in rows if impl_name(r["impl"]) == baseline}
    return [dict(case=c, fa2lab=ours[c][metric], baseline=base[c][metric], ratio=ours[c][metric] / base[c][metric],
                 exact=ours[c].get("exact")) for c in ours if c in base]


def _slug(impl: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in impl_name(impl)).strip("_")


def sweep_metrics(results: dict) -> dict:
    """A live run's figures as sweep metrics: per kind and implementation the geometric mean of its
    throughput over the run's shapes (`fwd_fa2lab_triton_tflops`, `decode_sdpa_cudnn_tbps`, ...),
    and fa2lab's ratio to the same run's baseline (`fwd_over_sdpa_flash`, `decode_over_sdpa_cudnn`)."""
    import math

    out = {}
    rows = [r for r in results.get("rows", []) if "error" not in r]
    for kind in KINDS:
        metric = "tbps" if kind == "decode" else "tflops"
        for impl in dict.fromkeys(impl_name(r["impl"]) for r in rows if r["kind"] == kind):
            xs = [r[metric] for r in rows if r["kind"] == kind and impl_name(r["impl"]) == impl and r[metric] > 0]
            if xs:
                out[f"{kind}_{_slug(impl)}_{metric}"] = math.exp(sum(map(math.log, xs)) / len(xs))
        baseline = "sdpa cudnn" if kind == "decode" else "sdpa flash"
        ratios = [r["ratio"] for r in ratio_table(results, kind, baseline) if r["ratio"] > 0]
        if ratios:
            out[f"{kind}_over_{_slug(baseline)}"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    return out


def run_live(quick: bool = True, log=print) -> dict:
    """Deprecated: `fa2lab.bench.gpu.run(quick=...)` (figures only draw; the driver measures)."""
    import warnings

    from fa2lab.bench import gpu

    warnings.warn("fa2lab.viz.gpu.run_live moved to fa2lab.bench.gpu.run", DeprecationWarning, stacklevel=2)
    return gpu.run(quick=quick, log=log)
