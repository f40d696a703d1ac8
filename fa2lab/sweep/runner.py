"""Run a sweep: one papermill execution per point, results written atomically, resumable.

Layout of a sweep's folder (default results/sweeps/<name>/):

    spec.yaml                     the spec as last run (the report reads its figures from it)
    points/<point id>/notebook.ipynb   the executed notebook (kept for failed points too)
    points/<point id>/metrics.json     what the notebook passed to record_metrics
    points/<point id>/conditions.json  the conditions of its timings (record_metrics writes it)
    points/<point id>/result.json      params, metrics, status, error, time, environment;
                                       written last: a point is finished iff this exists
    results.csv                   the tidy table: one row per point of the spec

Every point's timings (fa2lab.measure.time_call) follow the spec's `timing:` policy, which reaches
the notebooks' kernels through the FA2LAB_TIMING environment variable while the sweep runs, and
record their spread and conditions through record_metrics (timing_* columns).

A point whose result.json says "ok" is never run again; a failed one is run again by the next
`fa2lab sweep` of the same spec (the notebook may have been fixed); an interrupted one (Ctrl-C,
kill) left no result.json and is run again. Points run in the notebook's folder, as under nbval.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import platform
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from fa2lab.sweep.execute import error_text, execute_in_subprocess, execute_notebook
from fa2lab.sweep.lock import PointBusy, PointLock
from fa2lab.sweep.metrics import CONDITIONS_FILE, atomic_write_json, atomic_write_text
from fa2lab.sweep.spec import METRICS_PARAM, REPO, Point, SweepSpec

ENV_COLUMNS = ["fa2lab_commit", "torch", "device", "profile", "threads", "python", "triton", "driver"]


def environment() -> dict:
    """Where the points run: fa2lab's git commit ('+dirty' with uncommitted changes), torch,
    the device, the hardware profile fa2lab.hardware.detect() picks, torch threads, Python,
    triton and the NVIDIA driver ('' where absent)."""
    import torch

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if commit != "unknown" and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    try:
        from fa2lab.hardware import detect

        profile = detect().name
    except Exception:  # noqa: BLE001 - the hardware package is optional here
        profile = ""
    from fa2lab.measure.versions import versions

    return dict(fa2lab_commit=commit, torch=torch.__version__, device=device, profile=profile,
                threads=torch.get_num_threads(), python=platform.python_version(), **versions())


def file_digest(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]


def _interrupted(exc: BaseException) -> bool:
    return isinstance(exc, KeyboardInterrupt) or getattr(exc, "ename", None) == "KeyboardInterrupt"


def run_point(spec: SweepSpec, point: Point, folder: Path, env: dict, stop: threading.Event,
              execute=execute_notebook) -> dict | None:
    """Run one point; returns its result, or None when it was interrupted (nothing recorded), or
    {'status': 'busy', ...} when another live runner holds the point's lock (nothing touched)."""
    if stop.is_set():  # the sweep is stopping: start nothing new
        return None
    pdir = folder / "points" / point.id
    try:
        lock = PointLock(pdir).__enter__()
    except PointBusy as exc:
        return dict(sweep=spec.name, point=point.id, status="busy", error=str(exc))
    try:
        return _run_locked(spec, point, pdir, env, stop, execute)
    finally:
        lock.__exit__(None, None, None)


def _run_locked(spec, point, pdir, env, stop, execute) -> dict | None:
    done = load_result_file(pdir)
    if done is not None and done["status"] == "ok":  # another runner finished it while we waited for it
        return done
    metrics_file = pdir / "metrics.json"
    metrics_file.unlink(missing_ok=True)  # left by an interrupted attempt: never mistake it for this run's
    conditions_file = pdir / CONDITIONS_FILE
    conditions_file.unlink(missing_ok=True)
    partial = pdir / ".notebook.running.ipynb"
    t0 = time.perf_counter()
    status, error = "ok", None
    try:
        # An executor may say where the point ran (a Dask worker: its device, torch, address).
        info = execute(spec.notebook, partial, {**point.params, METRICS_PARAM: str(metrics_file)},
                       cwd=spec.notebook.parent, timeout_s=spec.timeout_s)
        if isinstance(info, dict) and info.get("env"):
            env = {**env, **info["env"]}
    except BaseException as exc:  # noqa: BLE001 - a failing point is recorded and the sweep goes on
        if _interrupted(exc) or stop.is_set():
            stop.set()
            return None
        status, error = "error", error_text(exc)
    if partial.exists():
        partial.replace(pdir / "notebook.ipynb")
    metrics = {}
    if metrics_file.exists():
        try:
            metrics = json.loads(metrics_file.read_text())
        except ValueError as exc:
            status, error = "error", f"unreadable metrics.json: {exc}"
    if conditions_file.exists():  # the point's timing conditions (record_metrics): timing_* columns
        try:
            metrics.update({k: v for k, v in json.loads(conditions_file.read_text()).items() if k not in metrics})
        except ValueError:
            pass  # cannot happen with atomic writes; the metrics themselves are intact
    result = dict(sweep=spec.name, point=point.id, index=point.index, repeat=point.repeat, status=status, error=error,
                  seconds=round(time.perf_counter() - t0, 3), params=point.params, metrics=metrics, env=env,
                  notebook=str(spec.notebook.relative_to(REPO)) if spec.notebook.is_relative_to(REPO)
                  else str(spec.notebook), notebook_sha=file_digest(spec.notebook),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_json(pdir / "result.json", result)
    return result


def load_result(folder: Path, point: Point) -> dict | None:
    return load_result_file(folder / "points" / point.id)


def load_result_file(pdir: Path) -> dict | None:
    path = pdir / "result.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:  # cannot happen with atomic writes, unless edited by hand: run it again
        return None


def _cell(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else ("" if value is None else value)


def results_table(spec: SweepSpec, folder: Path) -> list[dict]:
    """One row per finished point of `spec`: sweep, point, repeat, status, error, seconds, then
    every parameter, every metric, the environment. Written to <folder>/results.csv atomically."""
    rows, metric_names = [], {}
    for point in spec.points():
        res = load_result(folder, point)
        if res is None:
            continue
        metric_names.update(dict.fromkeys(res["metrics"]))
        rows.append(res)
    fixed = ["sweep", "point", "repeat", "status", "error", "seconds"]
    param_names = [p for p in spec.notebook_params if p != METRICS_PARAM and any(p in r["params"] for r in rows)]
    taken = set(fixed) | set(param_names) | set(ENV_COLUMNS)
    column_of = {m: f"metric_{m}" if m in taken else m for m in metric_names}  # a metric never hides a column
    columns = [*fixed, *param_names, *column_of.values(), *ENV_COLUMNS]
    table = []
    for r in rows:
        row = {c: r[c] for c in fixed}
        row.update({p: r["params"].get(p) for p in param_names})
        row.update({column_of[m]: r["metrics"].get(m) for m in metric_names})
        row.update({e: r["env"].get(e) for e in ENV_COLUMNS})
        table.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in table:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    atomic_write_text(folder / "results.csv", buf.getvalue())
    return table


def _with_timing_policy(run):
    """Run `run(spec, ...)` with FA2LAB_TIMING set to the spec's timing policy (children inherit it),
    then restore the variable."""
    from fa2lab.measure.timing import POLICY_ENV

    @functools.wraps(run)
    def wrapper(spec, *args, **kwargs):
        before = os.environ.get(POLICY_ENV)
        if spec.timing:
            os.environ[POLICY_ENV] = json.dumps(spec.timing)
        try:
            return run(spec, *args, **kwargs)
        finally:
            if before is None:
                os.environ.pop(POLICY_ENV, None)
            else:
                os.environ[POLICY_ENV] = before
    return wrapper


@_with_timing_policy
def run_sweep(spec: SweepSpec, out_root=None, *, jobs: int = 1, progress: bool = True,
              execute=None, log=print, stop: threading.Event | None = None) -> dict:
    """Run every unfinished point of `spec` (up to `jobs` at a time, capped by the spec's
    max_jobs); returns counts {'points', 'skipped', 'ok', 'error', 'interrupted', 'busy'} and the
    folder. A point another live runner holds (its lock, fa2lab.sweep.lock) is left to it: 'busy'.
    `execute`: how a point's notebook runs; default papermill (fa2lab.sweep.execute); the Dask
    runner (fa2lab.sweep.dask_runner) passes its own, sharing `stop` to hear of Ctrl-C.
    Ctrl-C stops starting points, lets the running ones end, records nothing for those it
    interrupted, writes the table and re-raises KeyboardInterrupt."""
    from tqdm.auto import tqdm

    folder = Path(out_root or REPO / "results" / "sweeps") / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "spec.yaml", spec.path.read_text(encoding="utf-8"))
    points = spec.points()
    todo, skipped, stale = [], 0, 0
    sha = file_digest(spec.notebook)
    for p in points:
        res = load_result(folder, p)
        if res is not None and res["status"] == "ok":
            skipped += 1
            stale += res.get("notebook_sha") != sha
        else:
            todo.append(p)
    if stale:
        log(f"{spec.name}: {stale} finished point(s) ran an earlier version of {spec.notebook.name}; "
            f"delete {folder} to run them again")
    if spec.max_jobs is not None and jobs > spec.max_jobs:
        log(f"{spec.name}: --jobs {jobs} capped at the spec's max_jobs={spec.max_jobs}")
        jobs = spec.max_jobs
    # One job: papermill in this process, in the main thread (Ctrl-C lands in it, papermill shuts
    # the kernel down). More: a child process per point, which threads of this one wait on.
    execute = execute or (execute_notebook if jobs == 1 else execute_in_subprocess)
    counts = dict(points=len(points), skipped=skipped, ok=0, error=0, interrupted=0, busy=0, folder=str(folder))
    env = environment() if todo else {}
    stop = threading.Event() if stop is None else stop
    bar = tqdm(total=len(points), initial=skipped, desc=spec.name, unit="point", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=jobs) if jobs > 1 else None
    try:
        if pool is None:
            results = (run_point(spec, p, folder, env, stop, execute) for p in todo)
        else:
            futures = [pool.submit(run_point, spec, p, folder, env, stop, execute) for p in todo]
            results = (f.result() for f in as_completed(futures))
        for res in results:
            if res is None:  # the point was interrupted: stop the sweep as Ctrl-C would
                counts["interrupted"] += 1
                raise KeyboardInterrupt
            counts[res["status"]] += 1
            if res["status"] == "busy":  # another runner has it: its result lands in the same folder
                bar.write(f"{spec.name}: point {res['point']} skipped: {res['error']}")
            elif res["status"] != "ok":
                bar.write(f"{spec.name}: point {res['point']} failed: {res['error']}")
            bar.update(1)
            bar.set_postfix(failed=counts["error"])
    except KeyboardInterrupt:
        stop.set()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        results_table(spec, folder)
        log(f"{spec.name}: interrupted; finished points are kept in {folder}; run the same command to resume")
        raise
    if pool is not None:
        pool.shutdown(wait=True)
    bar.close()
    results_table(spec, folder)
    return counts
