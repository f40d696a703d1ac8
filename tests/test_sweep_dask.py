"""Sweeps on a Dask cluster (fa2lab.sweep.dask_runner): a LocalCluster of 2 worker processes runs
a tiny notebook; its results equal the local runner's, a worker killed mid-point (by its pid) loses
nothing, a bad spec or cluster address is refused before any cluster starts."""

import csv
import json
import os
import signal
import threading
import time

import pytest

from fa2lab import cli
from fa2lab.sweep import dask_runner, load_spec, runner
from fa2lab.sweep.dask_runner import ClusterError, parse_cluster
from fa2lab.sweep.spec import SpecError


PARAMS = '''x: int = 1  # a number
scale: float = 0.5  # a factor
pid_dir: str = ""  # where a point writes its worker's pid before it sleeps (the kill test)
sleep_s: float = 0.0  # how long a point sleeps after writing its pid
kill_x: int = 0  # the point that kills its own worker, every time it runs
metrics_path: str = ""  # set by fa2lab sweep'''
# No fa2lab import (torch: seconds per kernel); the kernel's parent is the papermill process the
# worker started, whose parent is the worker.
BODY = '''import json, os, time
assert x != 3, "x = 3 is the failing point"
worker_pid = int(open(f"/proc/{os.getppid()}/stat").read().split()[3])
if x == kill_x:
    os.kill(worker_pid, 9)
    time.sleep(60)
if pid_dir:
    with open(os.path.join(pid_dir, f"x{x}.{time.time_ns()}.pid"), "w") as f:
        f.write(str(worker_pid))
    time.sleep(sleep_s)
    while os.path.exists(os.path.join(pid_dir, f"hold-x{x}")):
        time.sleep(0.05)
with open(metrics_path, "w") as f:
    json.dump({"y": x * scale, "worker_side": 1}, f)'''


@pytest.fixture
def nb(tmp_path):
    from test_sweep import write_notebook

    return write_notebook(tmp_path / "nb.ipynb", params=PARAMS, body=BODY)


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster of 2 worker processes for the module (starting one costs seconds), started
    as `--cluster local:2` starts it; each worker offers one `slot`. Tests reach it by address."""
    with dask_runner.connect({"local": 2}, {"slot": 1}, log=lambda s: None) as client:
        yield client


def _spec(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _rows(folder):
    with open(folder / "results.csv") as f:
        return list(csv.DictReader(f))


SAME = ["sweep", "point", "repeat", "status", "x", "y", "worker_side", "fa2lab_commit", "torch", "python"]


def test_cluster_results_equal_the_local_runners(tmp_path, nb, capsys, cluster, monkeypatch):
    spec_path = _spec(tmp_path, "notebook: nb.ipynb\ngrid: {x: [2, 3]}\nparameters: {scale: 2}\n"
                                "resources: {slot: 1}\n")
    runner.run_sweep(load_spec(spec_path), tmp_path / "local", jobs=2, progress=False)
    import distributed

    asked, submit = [], distributed.Client.submit
    monkeypatch.setattr(distributed.Client, "submit",
                        lambda self, *a, **k: asked.append(k.get("resources")) or submit(self, *a, **k))
    address = cluster.scheduler.address
    assert cli.main(["sweep", str(spec_path), "--cluster", address, "--out", str(tmp_path / "dask")]) == 1
    assert asked == [{"slot": 1}] * 2  # the spec's resources, per task
    local, dask = _rows(tmp_path / "local" / "s"), _rows(tmp_path / "dask" / "s")
    assert [{c: r[c] for c in SAME} for r in dask] == [{c: r[c] for c in SAME} for r in local]
    assert [r["status"] for r in dask] == ["ok", "error"] and "x = 3 is the failing point" in dask[1]["error"]
    assert dask[0]["y"] == "4.0"
    result = json.loads(next((tmp_path / "dask" / "s" / "points").glob("x=2_*/result.json")).read_text())
    assert result["env"]["worker"].startswith("tcp://")  # where it ran, next to the worker's torch
    for point in (tmp_path / "dask" / "s" / "points").iterdir():  # the executed notebooks came back
        assert (point / "notebook.ipynb").exists()
    out = capsys.readouterr().out
    assert f"Dask scheduler {address}, 2 workers" in out and "1 ok, 1 failed" in out

    # Resuming on the cluster skips what the local runner finished (the same write/resume code).
    assert cli.main(["sweep", str(spec_path), "--cluster", address, "--out", str(tmp_path / "local")]) == 1
    assert "1 already done, 0 ok, 1 failed" in capsys.readouterr().out


def test_a_worker_killed_mid_point_loses_nothing(tmp_path, nb, cluster):
    pids = tmp_path / "pids"
    pids.mkdir()
    spec = load_spec(_spec(tmp_path, f"notebook: nb.ipynb\ngrid: {{x: [1, 2]}}\n"
                                     f"parameters: {{pid_dir: '{pids}', sleep_s: 1.5}}\nretries: 1\n"))
    said, done = [], {}

    def sweep():
        done["counts"] = dask_runner.run_sweeps_on_cluster([spec], tmp_path / "out", cluster=cluster.scheduler.address,
                                                           progress=False, log=said.append)[0]

    t = threading.Thread(target=sweep)
    t.start()
    deadline = time.monotonic() + 120
    while not list(pids.glob("x2.*.pid")) and time.monotonic() < deadline:
        time.sleep(0.05)
    first = sorted(pids.glob("x2.*.pid"))
    assert first, "point x=2 never started"
    os.kill(int(first[0].read_text()), signal.SIGKILL)  # its worker, mid-point (the notebook sleeps)
    t.join(180)
    assert not t.is_alive()
    counts = done["counts"]
    assert (counts["ok"], counts["error"]) == (2, 0), said
    assert len(list(pids.glob("x2.*.pid"))) == 2  # run again, on a fresh worker
    assert any("point x=2" in s and "worker died (attempt 1 of 2); running it again" in s for s in said), said
    rows = _rows(tmp_path / "out" / spec.name)
    assert [(r["x"], r["status"], r["y"]) for r in rows] == [("1", "ok", "0.5"), ("2", "ok", "1.0")]


def test_a_point_whose_worker_keeps_dying_is_recorded_failed(tmp_path, nb, cluster):
    """retries: 0 - the first death is final; the point is recorded with why, the others finish."""
    spec = load_spec(_spec(tmp_path, "notebook: nb.ipynb\ngrid: {x: [1, 2]}\nparameters: {kill_x: 2}\nretries: 0\n"))
    counts = dask_runner.run_sweeps_on_cluster([spec], tmp_path / "out", cluster=cluster.scheduler.address,
                                               progress=False, log=lambda s: None)[0]
    assert (counts["ok"], counts["error"]) == (1, 1)
    bad = _rows(tmp_path / "out" / spec.name)[1]
    assert bad["status"] == "error" and "worker died 1 times" in bad["error"] and "retries: 0" in bad["error"]


def test_bad_spec_or_cluster_refused_before_any_cluster_starts(tmp_path, nb, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(dask_runner, "connect", lambda *a, **k: started.append(a))
    bad = _spec(tmp_path, "notebook: nb.ipynb\ngrid: {y: [1]}\n", "bad.yaml")
    good = _spec(tmp_path, "notebook: nb.ipynb\ngrid: {x: [1]}\n", "good.yaml")
    assert cli.main(["sweep", str(good), str(bad), "--cluster", "local:2", "--out", str(tmp_path / "o")]) == 2
    assert "unknown parameter 'y'" in capsys.readouterr().err
    for argv, message in ((["--cluster", "local:0"], "at least 1 worker"), (["--cluster", "my-cluster"], "expected local"),
                          (["--scheduler-file", str(tmp_path / "none.json")], "no such file"),
                          (["--cluster", "local", "--scheduler-file", str(good)], "not both")):
        assert cli.main(["sweep", str(good), *argv, "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    assert started == [] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("value, target", [("local:3", {"local": 3}), ("tcp://10.0.0.5:8786", {"address": "tcp://10.0.0.5:8786"})])
def test_parse_cluster(value, target):
    assert parse_cluster(value) == target
    with pytest.raises(ClusterError):
        parse_cluster("tcp://")


@pytest.mark.parametrize("text, message", [
    ("resources: {GPU: 0}\n", "'resources' must map"), ("resources: [GPU]\n", "'resources' must map"),
    ("retries: -1\n", "'retries' must be a non-negative"), ("retries: yes\n", "'retries' must be a non-negative"),
])
def test_bad_resources_and_retries_are_refused(tmp_path, nb, text, message):
    with pytest.raises(SpecError, match=message):
        load_spec(_spec(tmp_path, "notebook: nb.ipynb\n" + text))


def test_resources_no_worker_offers_are_named(tmp_path, nb, cluster):
    spec = load_spec(_spec(tmp_path, "notebook: nb.ipynb\nresources: {GPU: 1}\n"))
    assert spec.resources == {"GPU": 1} and spec.retries == 2
    assert dask_runner._no_worker_has(cluster, {"GPU": 1}) and dask_runner._no_worker_has(cluster, {"slot": 2})
    assert not dask_runner._no_worker_has(cluster, {"slot": 1})


class _FakeFuture:
    """Never finishes, like a point still running on a worker."""

    def __init__(self):
        self.cancelled = False

    def result(self, timeout=None):
        from distributed import TimeoutError as DaskTimeout

        time.sleep(min(timeout or 0, 0.01))
        raise DaskTimeout("still running")

    def cancel(self):
        self.cancelled = True


class _FakeClient:
    def __init__(self):
        self.futures, self.kwargs = [], []

    def submit(self, fn, *args, **kwargs):
        self.kwargs.append(kwargs)
        self.futures.append(_FakeFuture())
        return self.futures[-1]


def test_ctrl_c_cancels_the_points_in_flight_and_records_nothing(tmp_path, nb):
    """run_sweep's stop event (set on Ctrl-C) reaches the waiting threads: their tasks are cancelled
    and the points leave no result, so the next run does them."""
    spec = load_spec(_spec(tmp_path, "notebook: nb.ipynb\ngrid: {x: [1, 2]}\nresources: {GPU: 1}\n"))
    client, stop = _FakeClient(), threading.Event()
    threading.Timer(0.5, stop.set).start()
    with pytest.raises(KeyboardInterrupt):
        runner.run_sweep(spec, tmp_path / "out", jobs=2, progress=False, log=lambda s: None, stop=stop,
                         execute=dask_runner.DaskExecutor(client, spec, stop, log=lambda s: None))
    assert len(client.futures) == 2 and all(f.cancelled for f in client.futures)
    assert all(k["resources"] == {"GPU": 1} and k["key"].startswith("fa2lab-s-x=") for k in client.kwargs)
    assert not list((tmp_path / "out" / spec.name).glob("points/*/result.json"))


def test_a_killed_driver_resumes_without_redoing_finished_points(tmp_path, nb, cluster):
    """`fa2lab sweep --cluster local:1` killed (its whole process group: driver, cluster, papermill)
    while its second point runs; the same command again runs only that point."""
    import subprocess
    import sys

    pids = tmp_path / "pids"
    pids.mkdir()
    (pids / "hold-x2").touch()  # point x=2 waits while this file exists
    spec_path = _spec(tmp_path, f"notebook: nb.ipynb\ngrid: {{x: [1, 2]}}\nparameters: {{pid_dir: '{pids}'}}\n"
                                "max_jobs: 1\n")
    folder = tmp_path / "out" / "s"
    repo = str(dask_runner.Path(dask_runner.__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-m", "fa2lab", "sweep", str(spec_path), "--cluster", "local:1", "--out",
                             str(tmp_path / "out")], env=dict(os.environ, PYTHONPATH=repo), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not list(pids.glob("x2.*.pid")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert list(pids.glob("x2.*.pid")), proc.communicate(timeout=30)[0].decode()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert [p.parent.name[:4] for p in folder.glob("points/*/result.json")] == ["x=1_"]  # x=2 left nothing
    (pids / "hold-x2").unlink()
    counts = dask_runner.run_sweeps_on_cluster([load_spec(spec_path)], tmp_path / "out",
                                               cluster=cluster.scheduler.address, progress=False, log=lambda s: None)[0]
    assert (counts["skipped"], counts["ok"], counts["error"]) == (1, 1, 0), counts
    assert [r["status"] for r in _rows(folder)] == ["ok", "ok"] and len(list(pids.glob("x1.*.pid"))) == 1


def test_a_cluster_point_gets_the_spec_timing_policy_and_keeps_its_conditions(tmp_path, cluster):
    """As the local runner: the kernel on the worker sees the spec's policy (FA2LAB_TIMING), and the
    conditions file record_metrics writes next to metrics.json comes back into results.csv."""
    from test_sweep import write_notebook

    body = '''import json, os
from pathlib import Path
policy = json.loads(os.environ.get("FA2LAB_TIMING", "null"))
with open(metrics_path, "w") as f:
    json.dump({"y": x}, f)
Path(metrics_path).with_name("conditions.json").write_text(json.dumps(
    {"timing_contended": 0, "timing_threshold_seen": policy["threshold"]}))'''
    write_notebook(tmp_path / "t.ipynb", params='x: int = 1  # a number\nmetrics_path: str = ""  # set by fa2lab sweep',
                   body=body)
    spec_path = _spec(tmp_path, "notebook: t.ipynb\ngrid: {x: [5]}\ntiming: {threshold: 0.3, retries: 0}\n")
    assert cli.main(["sweep", str(spec_path), "--cluster", cluster.scheduler.address,
                     "--out", str(tmp_path / "out")]) == 0
    (row,) = _rows(tmp_path / "out" / "s")
    assert row["status"] == "ok" and row["y"] == "5"
    assert row["timing_threshold_seen"] == "0.3" and row["timing_contended"] == "0"
