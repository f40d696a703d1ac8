"""Sweeps that fail midway lose nothing and run nothing twice: children die with a killed runner,
one runner per point (lock file with the owner's pid), duplicate grid values and broken notebooks
refused up front."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_sweep import FakeExecutor, write_notebook, write_spec

from fa2lab.sweep import SpecError, load_spec, notebook_parameters, runner
from fa2lab.sweep.lock import LOCK_NAME, PointBusy, PointLock, owners, pid_alive

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def nb(tmp_path):
    return write_notebook(tmp_path / "nb.ipynb")


# --- specs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", ["{x: [2, 2]}", "{scale: [1, 1.0]}", "{ns: [[1], [2], [1]]}", "{name: [a, b, a]}"])
def test_duplicate_grid_values_are_refused(tmp_path, nb, grid):
    with pytest.raises(SpecError, match="more than once.*repeats"):
        load_spec(write_spec(tmp_path, f"notebook: nb.ipynb\ngrid: {grid}\n"))


@pytest.mark.parametrize("content", [
    "[1, 2, 3]", '"text"', "{}", '{"cells": 3}', '{"cells": [1, 2]}', "not json at all",
    '{"cells": [{"metadata": [], "source": "x: int = 1"}]}',
    '{"cells": [{"metadata": {"tags": "parameters"}, "source": "x: int = 1"}]}',
    '{"cells": [{"metadata": {"tags": ["parameters"]}, "source": 7}]}',
])
def test_a_notebook_that_is_not_a_notebook_is_a_spec_error(tmp_path, content):
    path = tmp_path / "bad.ipynb"
    path.write_text(content)
    with pytest.raises(SpecError, match=str(path)):
        notebook_parameters(path)
    spec = write_spec(tmp_path, "notebook: bad.ipynb\n")
    with pytest.raises(SpecError, match="bad.ipynb"):
        load_spec(spec)


@pytest.mark.parametrize("params", ["x: int = (", "x: int = 1\n  y: int = 2", "x: int = '''", "def f(:\n",
                                    "x: int = 1\nx: int = 2", "x: int = {1: [}", "x: int = 1 +* 2"])
def test_a_parameters_cell_that_does_not_parse_is_a_spec_error(tmp_path, params):
    path = write_notebook(tmp_path / "p.ipynb", params=params)
    with pytest.raises(SpecError, match="p.ipynb"):
        notebook_parameters(path)


# --- the point lock ---------------------------------------------------------------------------

def sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_point_is_claimed_by_one_runner_at_a_time(tmp_path):
    with PointLock(tmp_path / "p") as lock:
        assert owners(lock.path) == [(os.getpid(), owners(lock.path)[0][1])]
        # another process's attempt fails while this one holds the point
        # lock.py loaded on its own: importing the fa2lab package would import torch (seconds)
        code = (f"import importlib.util as u; s = u.spec_from_file_location('lock', "
                f"{str(REPO / 'fa2lab' / 'sweep' / 'lock.py')!r}); m = u.module_from_spec(s); s.loader.exec_module(m)\n"
                f"try:\n    m.PointLock({str(tmp_path / 'p')!r}).__enter__()\nexcept m.PointBusy as e:\n"
                f"    print('busy', e)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
        assert out.startswith("busy") and str(os.getpid()) in out
    assert owners(tmp_path / "p" / LOCK_NAME) == []  # released: empty
    with PointLock(tmp_path / "p"):  # and free again
        pass


def test_a_lock_held_by_a_live_pid_is_kept_and_a_dead_one_is_taken_over(tmp_path):
    live = sleeper()
    try:
        folder = tmp_path / "p"
        folder.mkdir()
        (folder / LOCK_NAME).write_text(f"{live.pid}\n")  # e.g. the child of a killed runner, still running
        with pytest.raises(PointBusy, match=str(live.pid)):
            PointLock(folder).__enter__()
        assert (folder / LOCK_NAME).read_text() == f"{live.pid}\n"
    finally:
        live.kill()
        live.wait()
    assert not pid_alive(live.pid)
    with PointLock(folder) as lock:  # its owner is gone: taken over
        assert [p for p, _ in owners(lock.path)] == [os.getpid()]


def test_a_reused_pid_is_not_an_owner(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(f"{os.getppid()} 1\n")  # a live pid, but it started at another time
    with PointLock(folder):
        pass


def test_the_runner_skips_a_point_another_runner_holds(tmp_path, nb):
    spec = load_spec(write_spec(tmp_path, "notebook: nb.ipynb\ngrid: {x: [1, 2, 4]}\n"))
    point = spec.points()[1]
    pdir = tmp_path / "out" / spec.name / "points" / point.id
    live = sleeper()
    try:
        pdir.mkdir(parents=True)
        (pdir / LOCK_NAME).write_text(f"{live.pid}\n")
        ex = FakeExecutor(fail_x=None)
        counts = runner.run_sweep(spec, tmp_path / "out", progress=False, execute=ex)
        assert sorted(ex.ran) == [1, 4] and counts["busy"] == 1 and counts["ok"] == 2
        assert not (pdir / "result.json").exists()
    finally:
        live.kill()
        live.wait()
    ex = FakeExecutor(fail_x=None)
    counts = runner.run_sweep(spec, tmp_path / "out", progress=False, execute=ex)
    assert ex.ran == [2] and counts["ok"] == 1 and counts["skipped"] == 2


def test_two_runners_at_once_run_each_point_once(tmp_path, nb):
    spec = load_spec(write_spec(tmp_path, "notebook: nb.ipynb\ngrid: {x: [1, 2, 4, 5, 6, 7]}\n"))
    ran, gate = [], threading.Barrier(2)

    class Slow(FakeExecutor):
        def __call__(self, notebook, output, parameters, **kw):
            ran.append(parameters["x"])
            time.sleep(0.05)
            return super().__call__(notebook, output, parameters, **kw)

    def go():
        gate.wait()
        runner.run_sweep(spec, tmp_path / "out", progress=False, execute=Slow(fail_x=None), log=lambda *_: None)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ran) == [1, 2, 4, 5, 6, 7]  # every point exactly once


# --- children die with the runner --------------------------------------------------------------

SLEEPY = '''import os, time, pathlib
pathlib.Path(metrics_path).with_name("pids.json").write_text(
    __import__("json").dumps({"kernel": os.getpid(), "papermill": os.getppid()}))
time.sleep(300)'''


def _gone(pid, timeout_s):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie (dead, not yet reaped by its parent) counts as gone
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="process checks read /proc")
def test_children_die_with_a_killed_runner(tmp_path):
    write_notebook(tmp_path / "nb.ipynb", body=SLEEPY)
    spec_path = write_spec(tmp_path, "notebook: nb.ipynb\ngrid: {x: [1, 2]}\ntimeout_s: 600\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    parent = subprocess.Popen([sys.executable, "-m", "fa2lab", "sweep", str(spec_path), "--jobs", "2",
                               "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its own group: the kill below reaches it alone
    try:
        end = time.monotonic() + 240
        while len(list(out.glob("s/points/*/pids.json"))) < 2:
            assert time.monotonic() < end and parent.poll() is None, "the points never started"
            time.sleep(0.5)
        pids = []
        for p in out.glob("s/points/*/pids.json"):
            pids.append(json.loads(p.read_text()))
            listed = [pid for pid, _ in owners(p.parent / LOCK_NAME)]
            assert listed == [parent.pid, pids[-1]["papermill"]], listed  # the runner and its child
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        for d in pids:
            assert _gone(d["papermill"], 60), f"papermill child {d['papermill']} outlived its runner"
            assert _gone(d["kernel"], 60), f"kernel {d['kernel']} outlived its runner"
    finally:
        if parent.poll() is None:
            parent.kill()
    # nothing was recorded for the killed points, and they are free to run again
    assert not list(out.glob("s/points/*/result.json"))
    for lock in out.glob(f"s/points/*/{LOCK_NAME}"):
        assert not any(pid_alive(p, s) for p, s in owners(lock))
