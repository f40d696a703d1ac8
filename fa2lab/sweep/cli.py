"""`fa2lab sweep SPEC [SPEC ...] [--jobs N] [--out DIR] [--cluster local[:N]|ADDRESS | --scheduler-file FILE]`
and `fa2lab report [--out PATH] [--compare A B]`."""

from __future__ import annotations

import sys
import time

from fa2lab.sweep.spec import REPO, SpecError, load_spec


def add_parsers(sub) -> None:
    from pathlib import Path

    sw = sub.add_parser("sweep", help="run notebook sweeps (YAML specs) with papermill; resumes where it stopped")
    sw.add_argument("specs", type=Path, nargs="+", metavar="SPEC",
                    help="sweep spec(s), e.g. experiments/memory_scaling.yaml")
    sw.add_argument("--jobs", type=int, default=None,
                    help="points run at once (default 1; with --cluster, the cluster's worker threads); "
                         "capped by a spec's max_jobs")
    sw.add_argument("--cluster", default=None, metavar="local[:N]|tcp://HOST:PORT",
                    help="run the points as Dask tasks: a LocalCluster of N worker processes, or a running scheduler")
    sw.add_argument("--scheduler-file", type=Path, default=None, metavar="FILE",
                    help="run the points on the Dask scheduler that wrote FILE (dask scheduler --scheduler-file)")
    sw.add_argument("--out", type=Path, default=REPO / "results" / "sweeps", help="results root (one folder per sweep)")
    rp = sub.add_parser("report", help="one self-contained HTML page from all sweep results")
    rp.add_argument("--out", type=Path, default=None, help="default results/report.html")
    rp.add_argument("--results", type=Path, default=REPO / "results" / "sweeps", help="results root of the sweeps")
    rp.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"), default=None,
                    help="instead: how figures moved from run A to run B (two results folders or two GPU results "
                         "files); --out defaults to results/compare.html")


def cli_sweep(args) -> int:
    if args.jobs is not None and args.jobs < 1:
        print(f"fa2lab sweep: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    on_cluster = bool(getattr(args, "cluster", None) or getattr(args, "scheduler_file", None))
    if on_cluster:
        from fa2lab.sweep.dask_runner import ClusterError, parse_cluster

        try:
            parse_cluster(args.cluster, args.scheduler_file)
        except ClusterError as exc:
            print(f"fa2lab sweep: refused: {exc}", file=sys.stderr)
            return 2
    specs = []
    for path in args.specs:  # every spec is checked before any point runs
        try:
            specs.append(load_spec(path))
        except SpecError as exc:
            print(f"fa2lab sweep: refused: {exc}", file=sys.stderr)
            return 2
    from fa2lab.sweep.gpu import skip_reason
    from fa2lab.sweep.runner import run_sweep

    failed = 0
    t0 = time.perf_counter()

    def summary(spec, c):
        nonlocal failed, t0
        failed += c["error"]
        if c.get("busy"):
            print(f"{spec.name}: {c['busy']} point(s) left to another runner that holds them (see their .lock); "
                  "run the same command again once it is done")
        print(f"{spec.name}: {c['points']} points: {c['skipped']} already done, {c['ok']} ok, {c['error']} failed "
              f"({time.perf_counter() - t0:.0f} s) -> {c['folder']}/results.csv")
        if c["error"]:
            print(f"{spec.name}: failed points are recorded with their error in results.csv and run again by "
                  "the next `fa2lab sweep` of this spec")
        _print_conditions(spec.name, c["folder"])
        t0 = time.perf_counter()

    if on_cluster:  # a running scheduler's workers have their own devices: only local:N skips GPU specs
        from fa2lab.sweep.dask_runner import run_sweeps_on_cluster

        try:
            run_sweeps_on_cluster(specs, args.out, cluster=args.cluster, scheduler_file=args.scheduler_file,
                                  jobs=args.jobs, on_done=summary)
        except KeyboardInterrupt:
            return 130
        return 1 if failed else 0
    for spec in specs:
        reason = skip_reason(spec)
        if reason:
            print(f"{spec.name}: skipped: {reason}")
            continue
        try:
            c = run_sweep(spec, args.out, jobs=args.jobs or 1)
        except KeyboardInterrupt:
            return 130
        summary(spec, c)
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
    if args.compare:
        from fa2lab.sweep.compare import compare_page

        try:
            out, result = compare_page(*args.compare, args.out or REPO / "results" / "compare.html")
        except ValueError as exc:
            print(f"fa2lab report --compare: {exc}", file=sys.stderr)
            return 2
        flagged = [r for r in result["rows"] if r["beyond"]]
        print(f"fa2lab report --compare: {len(result['rows'])} figures in both runs, {len(flagged)} changed beyond "
              f"the measured run-to-run spread; wrote {out}")
        for r in flagged:
            print(f"  {r['verdict']:>7}  x{r['ratio']:.3f}  {r['source']} | {r['case']} | {r['impl']}")
        return 0
    from fa2lab.sweep.report import build_report

    out = build_report(args.results, args.out or REPO / "results" / "report.html")
    print(f"fa2lab report: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, self-contained); open it in a browser")
    return 0
