"""`fa2lab report`: one self-contained HTML page from the results of every sweep (and the newest
GPU benchmark results file, when there is one).

plotly.js is embedded once, inline, at the top of the page (about 4.5 MB), so the page opens
offline and from a file:// URL; every figure after that reuses it.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import pandas as pd
import yaml

from fa2lab.sweep.metrics import atomic_write_text
from fa2lab.sweep.runner import ENV_COLUMNS
from fa2lab.sweep.spec import REPO

STYLE = """
body { font-family: Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; font-size: 12px; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; } th { background: #f4f4f4; }
.error { color: #b00020; } .meta { color: #666; font-size: 0.9em; } .fig { margin: 1em 0; }
.banner { background: #fff3cd; border: 1px solid #e0a800; padding: 0.6em 1em; margin: 1em 0; }
nav a { margin-right: 1em; } .table { overflow-x: auto; }
"""


def _figures_for(spec: dict, table: pd.DataFrame) -> list:
    """The spec's `report` figures; without any, every numeric metric against the first grid
    parameter (or the point index)."""
    from fa2lab.viz.sweeps import sweep_figure

    figs = []
    entries = list(spec.get("report") or [])
    if not entries:
        grid = list((spec.get("grid") or {}).keys())
        x = next((g for g in grid if g in table.columns and pd.api.types.is_numeric_dtype(table[g])), None)
        fixed = set(spec.get("parameters") or {}) | set(grid) | {"repeat", "seconds", *ENV_COLUMNS}
        metrics = [c for c in table.columns if c not in fixed and pd.api.types.is_numeric_dtype(table[c])
                   and not _is_condition(c, table.columns)]
        color = next((g for g in grid if g != x), None)
        entries = [dict(x=x or "repeat", y=m, color=color) for m in metrics[:6]]
    for entry in entries:
        try:
            figs.append(sweep_figure(table, entry["x"], entry["y"], entry.get("color"), log_x=entry.get("log_x", False),
                                     log_y=entry.get("log_y", False), fit=entry.get("fit", False),
                                     title=entry.get("title")))
        except (ValueError, KeyError, TypeError) as exc:
            figs.append(f"figure {entry} not drawn: {exc}")
    return figs


def _is_condition(column: str, columns) -> bool:
    """A column that describes how a metric was measured (timing_*, <m>_min, <m>_max, ...), not a metric."""
    if column.startswith("timing_"):
        return True
    return any(column == f"{base}_{suffix}" and base in columns
               for suffix in ("min", "max", "repeats", "contended") for base in [column.rsplit("_", 1)[0]])


def soundness(table: pd.DataFrame) -> dict:
    """How many of a sweep's ok points were timed, measured under contention, at throttled clocks."""
    from fa2lab.viz.sweeps import _truthy

    ok = table[table["status"] == "ok"] if "status" in table.columns else table
    timed_cols = [c for c in ok.columns if c.endswith("_contended") and c[: -len("_contended")] in ok.columns]
    timed = pd.Series(False, index=ok.index)
    contended = pd.Series(False, index=ok.index)
    for c in timed_cols:
        timed |= ok[c].notna()
        contended |= _truthy(ok[c])
    if "timing_count" in ok.columns:
        timed |= _truthy(ok["timing_count"].fillna(0))
    if "timing_contended" in ok.columns:
        contended |= _truthy(ok["timing_contended"].fillna(0))
    throttled = _truthy(ok["timing_throttled"].fillna(0)) if "timing_throttled" in ok.columns else contended & False
    def largest(column):
        return pd.to_numeric(ok[column], errors="coerce").max() if column in ok.columns else None
    worst, threshold = largest("timing_others_cpu"), largest("timing_threshold")
    return dict(timed=int(timed.sum()), contended=int(contended.sum()), throttled=int(throttled.sum()),
                worst_share=None if worst is None or pd.isna(worst) else float(worst),
                threshold=None if threshold is None or pd.isna(threshold) else float(threshold))


def _soundness_html(counts: dict) -> str:
    if not (counts["contended"] or counts["throttled"]):
        return (f"<p class=meta>{counts['timed']} timed points, none contended.</p>" if counts["timed"] else "")
    return (f"<p class=error>{counts['contended']} of {counts['timed']} timed points were measured under contention"
            + (f", {counts['throttled']} at throttled GPU clocks" if counts["throttled"] else "")
            + ": drawn as open x marks and left out of fitted slopes.</p>")


def _table_html(table: pd.DataFrame, spec: dict) -> str:
    shown = [c for c in table.columns if c not in ENV_COLUMNS + ["sweep", "point", "error"]]
    fmt = table[shown].copy()
    for c in fmt.columns:
        if pd.api.types.is_float_dtype(fmt[c]):
            fmt[c] = fmt[c].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    return "<div class=table>" + fmt.to_html(index=False, border=0, na_rep="") + "</div>"


def _env_html(table: pd.DataFrame) -> str:
    parts = []
    for c in ENV_COLUMNS:
        if c in table.columns:
            values = sorted({str(v) for v in table[c].dropna()})
            parts.append(f"{c}: {html.escape(', '.join(values) or '-')}")
    return "<p class=meta>" + "; ".join(parts) + "</p>"


def sweep_sections(results_root: Path) -> list[tuple[str, list]]:
    """(name, [html strings and figures]) for every sweep folder holding a results.csv."""
    sections = []
    for folder in sorted(p for p in Path(results_root).glob("*") if (p / "results.csv").exists()):
        spec = {}
        if (folder / "spec.yaml").exists():
            spec = yaml.safe_load((folder / "spec.yaml").read_text()) or {}
        table = pd.read_csv(folder / "results.csv")
        parts = [f"<p>{html.escape(str(spec.get('description', '')))}</p>",
                 f"<p class=meta>notebook {html.escape(str(spec.get('notebook', '?')))}; {len(table)} points, "
                 f"{int((table['status'] == 'ok').sum()) if 'status' in table else 0} ok; results in "
                 f"{html.escape(str(folder))}</p>", _env_html(table)]
        counts = soundness(table)
        parts.append(_soundness_html(counts))
        failed = table[table["status"] != "ok"] if "status" in table else table.iloc[0:0]
        for _, row in failed.iterrows():
            parts.append(f"<p class=error>point {html.escape(str(row['point']))} failed: "
                         f"{html.escape(str(row['error']))}</p>")
        if len(table) > len(failed):
            parts += _figures_for(spec, table)
        parts.append(_table_html(table, spec))
        sections.append((folder.name, parts))
    return sections


def gpu_section(folder=None) -> tuple[str, list] | None:
    from fa2lab.viz import gpu

    label, results = gpu.latest_merged(folder)
    if results is None:
        return None
    env = results.get("environment", {})
    parts = [f"<p class=meta>{html.escape(label)}: " + ", ".join(f"{k} {html.escape(str(v))}"
                                                                   for k, v in env.items()) + "</p>"]
    for kind in ("fwd", "bwd", "decode"):
        if any(r.get("kind") == kind for r in results.get("rows", [])):
            parts.append(gpu.throughput_figure(results, kind))
    parts.insert(1, _soundness_html(gpu_soundness(results)))
    return ("GPU benchmark (newest results file of each kind)", parts)


def gpu_soundness(results: dict) -> dict:
    """soundness() of a GPU results file: its rows carry fa2lab.measure Timing fields."""
    timed = [r for r in results.get("rows", []) if "contended" in r or "throttled" in r]
    shares = [r["others_cpu"] for r in timed if r.get("contended") and r.get("others_cpu") is not None]
    return dict(timed=len(timed), contended=sum(bool(r.get("contended")) for r in timed),
                throttled=sum(bool(r.get("throttled")) for r in timed), worst_share=max(shares, default=None),
                threshold=None)


def _banner(counts: list[tuple[str, dict]]) -> str:
    """The page's warning when any of its figures was measured under contention or throttled clocks."""
    from fa2lab.measure.timing import warning_text

    unsound = [(name, c) for name, c in counts if c["contended"] or c["throttled"]]
    if not unsound:
        return ""
    total = {k: sum(c[k] for _, c in counts) for k in ("timed", "contended", "throttled")}
    shares = [c["worst_share"] for _, c in counts if c.get("worst_share") is not None]
    thresholds = [c["threshold"] for _, c in counts if c.get("threshold") is not None]
    text = warning_text(total["timed"], total["contended"], total["throttled"], worst_share=max(shares, default=None),
                        threshold=max(thresholds, default=0.10), what="timed points")
    where = ", ".join(html.escape(name) for name, _ in unsound)
    return f"<div class=banner><b>{html.escape(text)}</b><br>In: {where}.</div>"


def build_report(results_root=None, out=None, *, gpu_results=None, include_gpu: bool = True) -> Path:
    """Write the report page and return its path (default results/report.html)."""
    results_root = Path(results_root or REPO / "results" / "sweeps")
    out = Path(out or REPO / "results" / "report.html")
    sections = sweep_sections(results_root)
    counts = [(folder.name, soundness(pd.read_csv(folder / "results.csv")))
              for folder in sorted(p for p in results_root.glob("*") if (p / "results.csv").exists())]
    if include_gpu:
        gpu = gpu_section(gpu_results)
        if gpu:
            sections.append(gpu)
            from fa2lab.viz.gpu import latest_merged

            counts.append((gpu[0], gpu_soundness(latest_merged(gpu_results)[1])))
    body, plotly_included = [], False
    nav = " ".join(f"<a href='#s{i}'>{html.escape(name)}</a>" for i, (name, _) in enumerate(sections))
    for i, (name, parts) in enumerate(sections):
        body.append(f"<h2 id='s{i}'>{html.escape(name)}</h2>")
        for part in parts:
            if isinstance(part, str):
                body.append(part)
                continue
            body.append("<div class=fig>" + part.to_html(full_html=False, include_plotlyjs=not plotly_included,
                                                         config={"displaylogo": False}) + "</div>")
            plotly_included = True
    if not sections:
        body.append(f"<p>No sweep results under {html.escape(str(results_root))}: run "
                    "<code>fa2lab sweep experiments/SPEC.yaml</code> first.</p>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>fa2lab report</title>"
            f"<style>{STYLE}</style></head><body><h1>fa2lab report</h1>" + _banner(counts) +
            f"<p class=meta>generated {time.strftime('%Y-%m-%d %H:%M')} from {html.escape(str(results_root))}</p>"
            f"<nav>{nav}</nav>" + "\n".join(body) + "</body></html>")
    atomic_write_text(out, page)
    return out
