"""`fa2lab report --compare A B`: how every figure moved between two runs (two commits, two machines).

A and B are each a sweeps results root (results/sweeps/, one folder per sweep), one sweep's folder
(holding results.csv), or a GPU results file (experiments/results/gpu-*.json). Figures are matched
by (source, case, implementation):

- sweeps: the source is the sweep's name, the case the point's grid values, the implementation
  the metric's name (`tiled_ms`, `sdpa_peak_mib`, ...); only finished points, numeric metrics;
- GPU files: the source is the row kind (fwd, bwd, decode), the case its shape, the implementation
  the row's (split counts dropped: 'fa2lab triton (splits=66)' is 'fa2lab triton'); the figure is
  the throughput (tflops, tbps).

The ratio is B / A. A change counts as beyond the run-to-run spread when |B/A - 1| exceeds the sum of
the two sides' relative spreads. A side's spread is measured, never assumed: its repeats of the
same case ((max - min) / median over the spec's `repeats`), or a companion figure `<name>_spread`
(a relative spread the run recorded next to `<name>`, e.g. from timing samples). Where neither side
measured one, the page says so and flags nothing: a single run cannot tell a change from noise.
"""

from __future__ import annotations

import html
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fa2lab.sweep.metrics import atomic_write_text

# Metric names whose larger value is better / worse; anything else is only "changed".
HIGHER = re.compile(r"(tflops|gflops|tbps|gbps|throughput|per_s|tokens_s|speedup)", re.I)
LOWER = re.compile(r"(^|[_.-])(ms|us|s|seconds|time|latency|err|error|mib|mb|bytes)($|[_.-])", re.I)
SPREAD_SUFFIX = "_spread"


@dataclass
class Side:
    """One run's figures: (source, case, impl) -> values (one per repeat), measured spreads."""
    label: str
    kind: str  # "sweeps" or "gpu"
    values: dict = field(default_factory=dict)
    spreads: dict = field(default_factory=dict)  # (source, case, impl) -> recorded relative spread
    env: dict = field(default_factory=dict)  # source -> {field: value(s)}


def _number(v):
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _sweep_folders(path: Path) -> list[Path]:
    if (path / "results.csv").is_file():
        return [path]
    folders = sorted(p for p in path.iterdir() if (p / "results.csv").is_file()) if path.is_dir() else []
    if not folders:
        raise ValueError(f"{path}: neither a sweep folder (results.csv) nor a results root holding sweep folders, "
                         "nor a GPU results file (gpu-*.json); give what `fa2lab sweep` or `fa2lab bench` wrote")
    return folders


def _load_sweeps(path: Path, label: str) -> Side:
    import pandas as pd

    from fa2lab.sweep.runner import ENV_COLUMNS

    side = Side(label, "sweeps")
    for folder in _sweep_folders(path):
        spec = yaml.safe_load((folder / "spec.yaml").read_text()) if (folder / "spec.yaml").exists() else {}
        spec = spec or {}
        table = pd.read_csv(folder / "results.csv")
        name = str(table["sweep"].iloc[0]) if "sweep" in table and len(table) else folder.name
        grid = [g for g in (spec.get("grid") or {}) if g in table.columns]
        skip = {"sweep", "point", "repeat", "status", "error", "seconds", *ENV_COLUMNS, *grid,
                *(spec.get("parameters") or {})}
        side.env[name] = {c: sorted({str(v) for v in table[c].dropna()}) for c in ENV_COLUMNS if c in table}
        ok = table[table["status"] == "ok"] if "status" in table else table
        for _, row in ok.iterrows():
            case = ", ".join(f"{g}={row[g]}" for g in grid) or "all"
            for column in table.columns:
                if column in skip or column.endswith(SPREAD_SUFFIX):
                    continue
                value = _number(row[column])
                if value is None:
                    continue
                key = (name, case, column)
                side.values.setdefault(key, []).append(value)
                spread = _number(row.get(column + SPREAD_SUFFIX))
                if spread is not None:
                    side.spreads[key] = max(side.spreads.get(key, 0.0), spread)
    return side


def _load_gpu(path: Path, label: str) -> Side:
    from fa2lab.viz.gpu import case_label, impl_name

    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable GPU results file: {exc}") from None
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
        raise ValueError(f"{path}: a GPU results file has 'rows' (what `fa2lab bench` writes); this one has none")
    side = Side(label, "gpu", env={"gpu": {k: [str(v)] for k, v in (results.get("environment") or {}).items()}})
    for row in results["rows"]:
        figure = "tbps" if row.get("kind") == "decode" else "tflops"
        value = _number(row.get(figure))
        if "error" in row or value is None:
            continue
        key = (row["kind"], case_label(row), f"{impl_name(row['impl'])} {figure}")
        side.values.setdefault(key, []).append(value)
        for name in (f"{figure}{SPREAD_SUFFIX}", "spread"):
            spread = _number(row.get(name))
            if spread is not None:
                side.spreads[key] = spread
                break
    return side


def load_side(path, label: str | None = None) -> Side:
    path = Path(path)
    label = label or str(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".json":
            return _load_gpu(path, label)
        if path.name == "results.csv":
            return _load_sweeps(path.parent, label)
        raise ValueError(f"{path}: expected a results folder, a results.csv or a GPU results file (gpu-*.json)")
    return _load_sweeps(path, label)


def direction(name: str) -> int:
    """+1 if a larger value of this figure is better, -1 if smaller is, 0 if neither is known."""
    if HIGHER.search(name):
        return 1
    if LOWER.search(name):
        return -1
    return 0


def relative_spread(values: list[float]) -> float | None:
    """(max - min) / |median| of a case's repeats; None for a single value."""
    if len(values) < 2:
        return None
    med = statistics.median(values)
    return (max(values) - min(values)) / abs(med) if med else None


def compare(a: Side, b: Side) -> dict:
    """{'rows': [...], 'only_a': [...], 'only_b': [...]}: one row per figure in both runs with
    a, b (medians of the repeats), ratio b/a, both spreads, `beyond` (True/False, None when no
    spread was measured) and a verdict: faster/slower (better/worse), changed or within spread."""
    if a.kind != b.kind:
        raise ValueError(f"cannot compare {a.label} ({a.kind}) with {b.label} ({b.kind}): give two sweep results "
                         "or two GPU results files")
    rows = []
    for key in sorted(set(a.values) & set(b.values)):
        va, vb = statistics.median(a.values[key]), statistics.median(b.values[key])
        sa = a.spreads.get(key, relative_spread(a.values[key]))
        sb = b.spreads.get(key, relative_spread(b.values[key]))
        ratio = vb / va if va else (1.0 if vb == va else math.inf)
        measured = sa is not None or sb is not None
        beyond = abs(ratio - 1) > (sa or 0) + (sb or 0) if measured else None
        sense = direction(key[2])
        if beyond is None:
            verdict = "no spread measured"
        elif not beyond:
            verdict = "within spread"
        elif sense == 0:
            verdict = "changed"
        else:
            better = (ratio > 1) == (sense > 0)
            timing = bool(re.search(r"flops|tbps|gbps|per_s|ms|us|seconds|time|latency", key[2]))
            verdict = ("faster" if better else "slower") if timing else ("better" if better else "worse")
        rows.append(dict(source=key[0], case=key[1], impl=key[2], a=va, b=vb, ratio=ratio, spread_a=sa,
                         spread_b=sb, n_a=len(a.values[key]), n_b=len(b.values[key]), beyond=beyond, verdict=verdict))
    return dict(rows=rows, only_a=sorted(set(a.values) - set(b.values)), only_b=sorted(set(b.values) - set(a.values)))


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


STYLE = """
body { font-family: Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; font-size: 12px; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; } th { background: #f4f4f4; }
td.l { text-align: left; } tr.up td { background: #e6f4ea; } tr.down td { background: #fce8e6; }
tr.changed td { background: #fff4ce; } .meta { color: #666; font-size: 0.9em; }
"""


def _env_lines(side: Side) -> str:
    parts = []
    for source, env in side.env.items():
        text = "; ".join(f"{k} {', '.join(v) or '-'}" for k, v in env.items())
        parts.append(f"<li>{html.escape(source)}: {html.escape(text)}</li>")
    return "<ul class=meta>" + "".join(parts) + "</ul>"


def compare_page(a_path, b_path, out) -> tuple[Path, dict]:
    """Write the comparison page to `out`; returns its path and compare()'s result."""
    from fa2lab.viz.compare import ratio_figure

    a, b = load_side(a_path, "A"), load_side(b_path, "B")
    result = compare(a, b)
    rows = result["rows"]
    flagged = [r for r in rows if r["beyond"]]
    measured = any(r["beyond"] is not None for r in rows)
    body = [f"<p class=meta>A = {html.escape(str(a_path))}<br>B = {html.escape(str(b_path))}<br>"
            f"ratio = B / A; generated {time.strftime('%Y-%m-%d %H:%M')}</p>",
            "<h2>Where each ran</h2><p>A</p>" + _env_lines(a) + "<p>B</p>" + _env_lines(b),
            f"<p><b>{len(rows)} figures in both runs; {len(flagged)} changed beyond the measured run-to-run spread"
            "</b>" + ("" if measured else " (neither run measured a spread: run the sweeps with `repeats: 2` or "
                      "more, or record `<figure>_spread`; no change is flagged)") + "</p>"]
    plotly_included = False
    for source in sorted({r["source"] for r in rows}):
        part = [r for r in rows if r["source"] == source]
        body.append(f"<h2>{html.escape(source)}</h2>")
        fig = ratio_figure(part, title=f"{source}: B / A")
        body.append(fig.to_html(full_html=False, include_plotlyjs=not plotly_included, config={"displaylogo": False}))
        plotly_included = True
        head = "".join(f"<th>{h}</th>" for h in ("case", "implementation / figure", "A", "B", "B / A", "spread A",
                                                 "spread B", "repeats A, B", "verdict"))
        lines = []
        for r in part:
            cls = {"faster": "up", "better": "up", "slower": "down", "worse": "down", "changed": "changed"}.get(
                r["verdict"], "")
            cells = [f"<td class=l>{html.escape(r['case'])}</td>", f"<td class=l>{html.escape(r['impl'])}</td>",
                     *(f"<td>{_fmt(r[k])}</td>" for k in ("a", "b", "ratio", "spread_a", "spread_b")),
                     f"<td>{r['n_a']}, {r['n_b']}</td>", f"<td class=l>{html.escape(r['verdict'])}</td>"]
            lines.append(f"<tr class='{cls}'>" + "".join(cells) + "</tr>")
        body.append(f"<table><tr>{head}</tr>{''.join(lines)}</table>")
    for label, keys in (("only in A", result["only_a"]), ("only in B", result["only_b"])):
        if keys:
            items = "".join(f"<li>{html.escape(' / '.join(k))}</li>" for k in keys[:200])
            body.append(f"<h2>{label} ({len(keys)})</h2><ul class=meta>{items}</ul>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>fa2lab compare</title>"
            f"<style>{STYLE}</style></head><body><h1>fa2lab: B against A</h1>" + "\n".join(body) + "</body></html>")
    return atomic_write_text(out, page), result
