"""`fa2lab sweep SPEC [SPEC ...] [--jobs N] [--out DIR]` and `fa2lab report [--out PATH]`."""

from __future__ import annotations

import sys
import time

from fa2lab.sweep.spec import REPO, SpecError, load_spec


def add_parsers(sub) -> None:
    from pathlib import Path

    sw = sub.add_parser("sweep", help="run notebook sweeps (YAML specs) with papermill; resumes where it stopped")
    sw.add_argument("specs", type=Path, nargs="+", metavar="SPEC",
                    help="sweep spec(s), e.g. experiments/memory_scaling.yaml")
    sw.add_argument("--jobs", type=int, default=1, help="points run at once (capped by a spec's max_jobs)")
    sw.add_argument("--out", type=Path, default=REPO / "results" / "sweeps", help="results root (one folder per sweep)")
    rp = sub.add_parser("report", help="one self-contained HTML page from all sweep results")
    rp.add_argument("--out", type=Path, default=REPO / "results" / "report.html")
    rp.add_argument("--results", type=Path, default=REPO / "results" / "sweeps", help="results root of the sweeps")


def cli_sweep(args) -> int:
    if args.jobs < 1:
        print(f"fa2lab sweep: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    specs = []
    for path in args.specs:  # every spec is checked before any point runs
        try:
            specs.append(load_spec(path))
        except SpecError as exc:
            print(f"fa2lab sweep: refused: {exc}", file=sys.stderr)
            return 2
    from fa2lab.sweep.runner import run_sweep

    failed = 0
    for spec in specs:
        t0 = time.perf_counter()
        try:
            c = run_sweep(spec, args.out, jobs=args.jobs)
        except KeyboardInterrupt:
            return 130
        failed += c["error"]
        print(f"{spec.name}: {c['points']} points: {c['skipped']} already done, {c['ok']} ok, {c['error']} failed "
              f"({time.perf_counter() - t0:.0f} s) -> {c['folder']}/results.csv")
        if c["error"]:
            print(f"{spec.name}: failed points are recorded with their error in results.csv and run again by "
                  "the next `fa2lab sweep` of this spec")
        _print_conditions(spec.name, c["folder"])
    return 1 if failed else 0


def _print_conditions(name: str, folder) -> None:
    """The report's contention warning for one sweep's results.csv, when it applies."""
    from pathlib import Path

    import pandas as pd

    from fa2lab.measure.timing import warning_text
    from fa2lab.sweep.report import soundness

    path = Path(folder) / "results.csv"
    if not path.exists():
        return
    c = soundness(pd.read_csv(path))
    text = warning_text(c["timed"], c["contended"], c["throttled"], worst_share=c["worst_share"],
                        threshold=c["threshold"] or 0.10, what="timed points")
    if text:
        print(f"{name}: {text}")


def cli_report(args) -> int:
    from fa2lab.sweep.report import build_report

    out = build_report(args.results, args.out)
    print(f"fa2lab report: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, self-contained); open it in a browser")
    return 0
