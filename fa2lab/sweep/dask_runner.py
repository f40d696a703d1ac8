"""Sweeps on a Dask cluster: each point one Dask task, results written by the driver as locally.

    fa2lab sweep SPEC --cluster local[:N]          a dask.distributed.LocalCluster of N processes
    fa2lab sweep SPEC --cluster tcp://HOST:PORT    a running scheduler (dask-jobqueue, Kubernetes, ...)
    fa2lab sweep SPEC --scheduler-file FILE        the same, found through `dask scheduler --scheduler-file`

The driver is the local runner (fa2lab.sweep.runner.run_sweep) with another executor: its threads
each hold one point in flight, submit it as a task and wait for it. The task runs papermill on the
worker (in a child process, as the local runner with several jobs does) and returns the executed
notebook, the metrics and the worker's environment; the driver then writes them exactly where and
how the local runner does (atomic per point, result.json last), so resuming, failed points and the
results table are the local runner's own code. Workers need fa2lab importable (the same install);
they need not share the driver's file system: the notebook travels with the task and runs in its
folder when the worker has that folder, else in a temporary one.

What happens when something dies:
- a notebook that fails: the task returns its error; the point is recorded failed (not rerun: it
  would fail again), as locally;
- a worker that dies mid-point (killed, out of memory): Dask reports KilledWorker and the driver
  submits the point again, up to the spec's `retries`, then records it failed with why. A
  LocalCluster started here lets the scheduler itself retry nothing (allowed-failures 0), so the
  spec's count is the count; a running scheduler applies its own allowed-failures first;
- the driver killed: points in flight left no result.json and run again on the next `fa2lab sweep`
  of the same spec; finished ones are kept;
- Ctrl-C: points in flight are cancelled and record nothing; the table is written.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from fa2lab.sweep.execute import PointError
from fa2lab.sweep.spec import METRICS_PARAM, SweepSpec

_LOCAL = re.compile(r"local(?::(\d+))?")
POLL_S = 0.2  # how often a waiting thread looks at the stop event (Ctrl-C)


class ClusterError(ValueError):
    """A --cluster / --scheduler-file value that cannot be used; the message says why."""


def parse_cluster(cluster: str | None = None, scheduler_file=None) -> dict:
    """Check the cluster arguments before anything starts: {'local': N}, {'address': ...} or
    {'scheduler_file': path}."""
    if cluster and scheduler_file:
        raise ClusterError("give --cluster or --scheduler-file, not both")
    if scheduler_file:
        path = Path(scheduler_file)
        if not path.is_file():
            raise ClusterError(f"--scheduler-file {path}: no such file; `dask scheduler --scheduler-file {path}` "
                               "writes it")
        return {"scheduler_file": str(path)}
    if not cluster:
        raise ClusterError("no cluster given: --cluster local[:N], --cluster tcp://HOST:PORT or --scheduler-file FILE")
    m = _LOCAL.fullmatch(cluster)
    if m:
        n = int(m.group(1)) if m.group(1) else min(os.cpu_count() or 1, 4)
        if n < 1:
            raise ClusterError(f"--cluster {cluster}: a local cluster needs at least 1 worker process, e.g. local:2")
        return {"local": n}
    if re.fullmatch(r"(tcp|tls|ws|wss|inproc|ucx)://[^\s/]+", cluster):
        return {"address": cluster}
    raise ClusterError(f"--cluster {cluster!r}: expected local, local:N (N worker processes) or a scheduler "
                       "address such as tcp://10.0.0.5:8786")


@contextmanager
def connect(target: dict, resources: dict | None = None, log=print):
    """A dask.distributed Client for `target` (parse_cluster's result); a LocalCluster started
    here is closed on exit. `resources`: what each local worker offers (one point's worth)."""
    import dask
    from distributed import Client, LocalCluster

    if "local" in target:
        # The scheduler of a LocalCluster runs in this process: with no retries of its own, a point
        # whose worker died comes back to the driver, which reruns it up to the spec's `retries`.
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            cluster = LocalCluster(n_workers=target["local"], threads_per_worker=1, processes=True,
                                   resources=resources or None, dashboard_address=None)
            client = Client(cluster)
        log(f"fa2lab sweep: local Dask cluster of {target['local']} worker processes ({cluster.scheduler_address})")
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    client = Client(target["address"]) if "address" in target else Client(scheduler_file=target["scheduler_file"])
    log(f"fa2lab sweep: Dask scheduler {client.scheduler.address}, {len(client.nthreads())} workers")
    try:
        yield client
    finally:
        client.close()


def run_point_on_worker(notebook_text: str, notebook_name: str, notebook_dir: str, parameters: dict,
                        timeout_s: int, timing: dict | None = None) -> dict:
    """The Dask task: papermill on this worker; returns the executed notebook (text or None), the
    metrics and timing-conditions files' texts (or None), the notebook's error (or None) and where
    it ran. `timing`: the spec's timing policy, handed to the kernel as the local runner does."""
    import json

    from distributed import get_worker

    from fa2lab.measure.timing import POLICY_ENV
    from fa2lab.sweep.execute import execute_in_subprocess
    from fa2lab.sweep.metrics import CONDITIONS_FILE
    from fa2lab.sweep.runner import environment

    env = environment()  # per task, not cached: the kernel imports fa2lab as it is on disk now
    try:
        env["worker"] = get_worker().address
    except ValueError:  # called outside a worker (tests)
        pass
    with tempfile.TemporaryDirectory(prefix="fa2lab-point-") as tmp:
        src, out, metrics = Path(tmp) / notebook_name, Path(tmp) / "executed.ipynb", Path(tmp) / "metrics.json"
        conditions = metrics.with_name(CONDITIONS_FILE)
        src.write_text(notebook_text, encoding="utf-8")
        cwd = notebook_dir if Path(notebook_dir).is_dir() else tmp
        error = None
        try:
            execute_in_subprocess(src, out, {**parameters, METRICS_PARAM: str(metrics)}, cwd=cwd, timeout_s=timeout_s,
                                  env={POLICY_ENV: json.dumps(timing)} if timing else None)
        except PointError as exc:
            error = str(exc)
        except KeyboardInterrupt:
            error = "interrupted on the worker (SIGINT)"
        return dict(notebook=out.read_text(encoding="utf-8") if out.exists() else None,
                    metrics=metrics.read_text(encoding="utf-8") if metrics.exists() else None,
                    conditions=conditions.read_text(encoding="utf-8") if conditions.exists() else None,
                    error=error, env=env)


class DaskExecutor:
    """The runner's `execute` for one spec: submit the point, wait (listening to `stop`), rerun it
    when its worker died, then write the notebook and metrics where run_point reads them."""

    def __init__(self, client, spec: SweepSpec, stop: threading.Event, log=print):
        self.client, self.spec, self.stop, self.log = client, spec, stop, log
        self.text = spec.notebook.read_text(encoding="utf-8")

    def _wait(self, future):
        from distributed import TimeoutError as DaskTimeout

        while True:
            if self.stop.is_set():
                future.cancel()
                raise KeyboardInterrupt
            try:
                return future.result(timeout=POLL_S)
            except (DaskTimeout, TimeoutError):
                continue
            except KeyboardInterrupt:  # one job: Ctrl-C lands in this (the main) thread
                future.cancel()
                raise

    def __call__(self, notebook, output, parameters, *, cwd, timeout_s):
        from distributed.scheduler import KilledWorker

        from fa2lab.sweep.metrics import atomic_write_text

        output, metrics_path = Path(output), parameters[METRICS_PARAM]
        params = {k: v for k, v in parameters.items() if k != METRICS_PARAM}
        point_id = output.parent.name
        lost = []
        for attempt in range(self.spec.retries + 1):
            future = self.client.submit(run_point_on_worker, self.text, Path(notebook).name, str(cwd), params,
                                        timeout_s, self.spec.timing or None, resources=self.spec.resources or None, pure=False,
                                        key=f"fa2lab-{self.spec.name}-{point_id}-a{attempt}")
            try:
                res = self._wait(future)
                break
            except KilledWorker as exc:
                lost.append(str(exc).split("\n")[0][:200])
                self.log(f"{self.spec.name}: point {point_id}: its worker died (attempt {attempt + 1} of "
                         f"{self.spec.retries + 1}){'; running it again' if attempt < self.spec.retries else ''}")
        else:
            raise PointError(f"its worker died {len(lost)} times (killed, crashed or out of memory; spec retries: "
                             f"{self.spec.retries}): {lost[-1]}")
        if res["notebook"] is not None:
            atomic_write_text(output, res["notebook"])
        if res["metrics"] is not None:
            atomic_write_text(metrics_path, res["metrics"])
        if res.get("conditions") is not None:
            from fa2lab.sweep.metrics import CONDITIONS_FILE

            atomic_write_text(Path(metrics_path).with_name(CONDITIONS_FILE), res["conditions"])
        if res["error"]:
            raise PointError(res["error"])
        return {"env": res["env"]}


def _no_worker_has(client, resources: dict) -> bool:
    workers = client.scheduler_info().get("workers", {}).values()
    return not any(all(w.get("resources", {}).get(k, 0) >= v for k, v in resources.items()) for w in workers)


def run_sweeps_on_cluster(specs: list[SweepSpec], out_root=None, *, cluster: str | None = None,
                          scheduler_file=None, jobs: int | None = None, progress: bool = True, log=print,
                          on_done=None) -> list[dict]:
    """Run `specs` (already checked by load_spec) on one Dask cluster, one after another; returns
    run_sweep's counts per spec run (on a local cluster a GPU spec is skipped without CUDA). `jobs`: points in flight (default: the cluster's worker threads),
    capped by each spec's max_jobs. `on_done(spec, counts)` is called after each spec."""
    from fa2lab.sweep.gpu import skip_reason
    from fa2lab.sweep.runner import run_sweep

    target = parse_cluster(cluster, scheduler_file)  # refused before anything starts
    if "local" in target:  # the workers are this machine: a GPU spec without CUDA is skipped, as locally
        keep = []
        for spec in specs:
            reason = skip_reason(spec)
            if reason:
                log(f"{spec.name}: skipped: {reason}")
            else:
                keep.append(spec)
        specs = keep
        if not specs:
            return []
    resources = {}
    for spec in specs:
        for k, v in spec.resources.items():
            resources[k] = max(resources.get(k, 0), v)
    out = []
    with connect(target, resources, log=log) as client:
        for spec in specs:
            if spec.resources and _no_worker_has(client, spec.resources):
                log(f"{spec.name}: no worker offers resources {spec.resources} yet; its points wait until one "
                    f"joins (e.g. `dask worker ADDRESS --resources {','.join(f'{k}={v}' for k, v in spec.resources.items())}`)")
            in_flight = jobs or max(1, sum(client.nthreads().values()))
            stop = threading.Event()
            counts = run_sweep(spec, out_root, jobs=in_flight, progress=progress, log=log, stop=stop,
                               execute=DaskExecutor(client, spec, stop, log=log))
            out.append(counts)
            if on_done:
                on_done(spec, counts)
    return out
