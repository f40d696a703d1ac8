"""Sweeps: spec checking, the runner (failures, resume, interruption, parallel points), atomic
writes, metrics, the results table, the HTML report and the two CLI subcommands."""

import csv
import json
import os

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from fa2lab import cli
from fa2lab.sweep import SpecError, atomic_write_text, load_spec, notebook_parameters, record_metrics
from fa2lab.sweep import runner
from fa2lab.sweep.report import build_report
from fa2lab.sweep.spec import type_problem

PARAMS = '''x: int = 1  # a number
scale: float = 0.5  # a factor
name: str = "a"  # a label
flag: bool = False  # a switch
ns: list[int] = [1, 2]  # lengths
metrics_path: str = ""  # set by fa2lab sweep'''
# Writes its metrics by hand (record_metrics has its own tests): importing fa2lab means torch,
# seconds per kernel.
BODY = '''import json
assert x != 3, "x = 3 is the failing point"
with open(metrics_path, "w") as f:
    json.dump({"y": x * scale, "n": len(ns), "tag": name}, f)'''


def write_notebook(path, params=PARAMS, body=BODY, tag=True):
    cell = new_code_cell(params)
    if tag:
        cell.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[new_markdown_cell("# test"), cell, new_code_cell(body)],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, path)
    return path


def write_spec(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def nb(tmp_path):
    return write_notebook(tmp_path / "nb.ipynb")


# notebook parameters and types

def test_notebook_parameters_reads_types_defaults_and_comments(nb):
    params = notebook_parameters(nb)
    assert list(params) == ["x", "scale", "name", "flag", "ns", "metrics_path"]
    assert (params["ns"].type, params["ns"].default, params["ns"].help) == ("list[int]", [1, 2], "lengths")


@pytest.mark.parametrize("params, message", [
    ("x = 1  # untyped", "expected `name: type = value"),
    ("x: int = len([1])  # computed", "must be a literal"),
    ("x: dict = {}  # a dict", "unsupported parameter type"),
    ("x: int = 1.5  # wrong default", "expected int"),
])
def test_bad_parameters_cells_are_refused(tmp_path, params, message):
    with pytest.raises(SpecError, match=message):
        notebook_parameters(write_notebook(tmp_path / "bad.ipynb", params=params))


def test_notebook_without_parameters_cell(tmp_path):
    with pytest.raises(SpecError, match="no cell tagged 'parameters'"):
        notebook_parameters(write_notebook(tmp_path / "untagged.ipynb", tag=False))


@pytest.mark.parametrize("annotation, value, ok", [
    ("int", 3, True), ("int", True, False), ("int", 3.0, False), ("float", 3, True), ("float", "3", False),
    ("bool", False, True), ("bool", 0, False), ("str", "a", True), ("list[int]", [1, 2], True),
    ("list[int]", [1, "2"], False), ("list[int]", 1, False), ("list[float]", [1, 2.5], True),
])
def test_type_problem(annotation, value, ok):
    assert (type_problem(annotation, value) is None) == ok


# specs

def test_good_spec_expands_the_grid(tmp_path, nb):
    spec = load_spec(write_spec(tmp_path, "notebook: nb.ipynb\nparameters: {scale: 2}\n"
                                          "grid: {x: [1, 2, 4], name: [a, b]}\nrepeats: 2\n"))
    points = spec.points()
    assert len(points) == 12 and spec.parameters == {"scale": 2.0}
    assert isinstance(spec.parameters["scale"], float)  # a float parameter given as an int
    assert len({p.id for p in points}) == 12
    assert points[0].params == {"scale": 2.0, "x": 1, "name": "a"}
    assert load_spec(spec.path).points()[5].id == points[5].id  # stable across loads


@pytest.mark.parametrize("text, message", [
    ("notebook: missing.ipynb\n", "unknown notebook 'missing.ipynb'"),
    ("notebook: nb.ipynb\ngrid: {y: [1]}\n", "unknown parameter 'y'.*'x', 'scale'"),
    ("notebook: nb.ipynb\ngrid: {x: [1, 'two']}\n", "parameter 'x': expected int, got 'two'"),
    ("notebook: nb.ipynb\nparameters: {flag: 1}\n", "parameter 'flag': expected bool"),
    ("notebook: nb.ipynb\nparameters: {ns: 4}\n", "parameter 'ns': expected list"),
    ("notebook: nb.ipynb\ngrid: {x: 1}\n", "must be a non-empty list"),
    ("notebook: nb.ipynb\nparameters: {x: 1}\ngrid: {x: [2]}\n", "both 'parameters' and 'grid'"),
    ("notebook: nb.ipynb\nparameters: {metrics_path: a}\n", "set by fa2lab sweep"),
    ("notebook: nb.ipynb\nrepeats: 0\n", "'repeats' must be a positive integer"),
    ("notebook: nb.ipynb\ncolour: red\n", "unknown keys \\['colour'\\]"),
    ("notebook: nb.ipynb\nreport: [{x: x}]\n", "at least 'x' and 'y'"),
    ("ns: [256]\nimpls: [tiled]\n", "missing 'notebook' \\(it looks like a config of `fa2lab run`"),
    ("- a\n- b\n", "expected a mapping"),
    ("notebook: [unclosed\n", "not valid YAML"),
    ("notebook: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
])
def test_bad_specs_are_refused_naming_the_problem(tmp_path, nb, text, message):
    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(tmp_path, text))


def test_notebook_without_metrics_path_is_refused(tmp_path):
    write_notebook(tmp_path / "nb.ipynb", params="x: int = 1  # a number")
    with pytest.raises(SpecError, match="no `metrics_path"):
        load_spec(write_spec(tmp_path, "notebook: nb.ipynb\n"))


def test_the_repository_specs_are_valid():
    from fa2lab.sweep.spec import REPO

    specs = [p for p in (REPO / "experiments").glob("*.yaml") if "notebook" in p.read_text()]
    assert {p.stem for p in specs} >= {"memory_scaling", "tile_schedule", "split_k"}
    for path in specs:
        assert load_spec(path).points()


# metrics and atomic writes

def test_record_metrics_converts_and_writes(tmp_path):
    import numpy as np

    out = tmp_path / "m.json"
    got = record_metrics({"a": torch.tensor(1.5), "b": np.int64(3), "c": [np.float32(0.5), 2], "d": None,
                          "e": True, "f-g.h": "x"}, str(out))
    assert got == {"a": 1.5, "b": 3, "c": [0.5, 2], "d": None, "e": True, "f-g.h": "x"}
    assert json.loads(out.read_text()) == got
    assert record_metrics({"a": 1}, "") == {"a": 1}  # no path (interactive use): nothing written
    with pytest.raises(TypeError, match="array of shape"):
        record_metrics({"a": torch.ones(3)})
    with pytest.raises(TypeError, match="has type dict"):
        record_metrics({"a": {"b": 1}})
    with pytest.raises(ValueError, match="metric names"):
        record_metrics({"a b": 1})


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# the runner, with a fake executor (no kernels)

class FakeExecutor:
    """Runs a 'notebook' as a Python function of its parameters; counts the points it ran."""

    def __init__(self, fail_x=3, interrupt_x=None):
        self.ran, self.fail_x, self.interrupt_x = [], fail_x, interrupt_x

    def __call__(self, notebook, output, parameters, *, cwd, timeout_s):
        self.ran.append(parameters["x"])
        output.write_text("{}")
        if parameters["x"] == self.interrupt_x:
            raise KeyboardInterrupt
        if parameters["x"] == self.fail_x:
            raise RuntimeError(f"x = {self.fail_x} is the failing point")
        record_metrics({"y": parameters["x"] * parameters.get("scale", 0.5)}, parameters["metrics_path"])


@pytest.fixture
def spec(tmp_path, nb):
    return load_spec(write_spec(tmp_path, "notebook: nb.ipynb\ngrid: {x: [1, 2, 3, 4]}\n"
                                          "report: [{x: x, y: y, log_y: true}]\n"))


def _table(folder):
    with open(folder / "results.csv") as f:
        return list(csv.DictReader(f))


def test_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, spec):
    ex = FakeExecutor()
    counts = runner.run_sweep(spec, tmp_path / "out", progress=False, execute=ex)
    assert (counts["ok"], counts["error"], counts["skipped"]) == (3, 1, 0)
    rows = _table(tmp_path / "out" / spec.name)
    assert [r["x"] for r in rows] == ["1", "2", "3", "4"]
    bad = rows[2]
    assert bad["status"] == "error" and "RuntimeError: x = 3 is the failing point" in bad["error"] and bad["y"] == ""
    assert rows[3]["y"] == "2.0" and rows[0]["status"] == "ok"
    for column in ("fa2lab_commit", "torch", "device", "profile", "seconds", "point", "repeat"):
        assert rows[0][column] != "", column
    assert rows[0]["torch"] == torch.__version__


def test_resume_skips_finished_points_and_retries_failed_ones(tmp_path, spec):
    runner.run_sweep(spec, tmp_path / "out", progress=False, execute=FakeExecutor())
    again = FakeExecutor(fail_x=None)
    counts = runner.run_sweep(spec, tmp_path / "out", progress=False, execute=again)
    assert again.ran == [3] and (counts["skipped"], counts["ok"]) == (3, 1)
    assert all(r["status"] == "ok" for r in _table(tmp_path / "out" / spec.name))


def test_interrupted_sweep_resumes_without_losing_finished_points(tmp_path, spec):
    with pytest.raises(KeyboardInterrupt):
        runner.run_sweep(spec, tmp_path / "out", progress=False, execute=FakeExecutor(fail_x=None, interrupt_x=3))
    folder = tmp_path / "out" / spec.name
    assert [r["x"] for r in _table(folder)] == ["1", "2"]  # the interrupted point left no result
    again = FakeExecutor(fail_x=None)
    runner.run_sweep(spec, tmp_path / "out", progress=False, execute=again)
    assert again.ran == [3, 4]
    assert [r["status"] for r in _table(folder)] == ["ok"] * 4


def test_parallel_points_and_max_jobs(tmp_path, nb):
    spec = load_spec(write_spec(tmp_path, "notebook: nb.ipynb\ngrid: {x: [1, 2, 4, 5]}\nmax_jobs: 2\n"))
    said = []
    counts = runner.run_sweep(spec, tmp_path / "out", jobs=8, progress=False, execute=FakeExecutor(), log=said.append)
    assert counts["ok"] == 4 and "capped at the spec's max_jobs=2" in said[0]


# real papermill runs, the report and the CLI

def test_real_sweep_report_and_cli(tmp_path, nb, capsys):
    spec_path = write_spec(tmp_path, "notebook: nb.ipynb\ndescription: a tiny sweep\ngrid: {x: [2, 3]}\n"
                                     "parameters: {ns: [5, 6, 7]}\nreport: [{x: x, y: y}, {x: x, y: nope}]\n")
    out = tmp_path / "sweeps"
    assert cli.main(["sweep", str(spec_path), "--jobs", "2", "--out", str(out)]) == 1  # one point fails
    rows = _table(out / "s")
    assert [(r["x"], r["status"], r["y"], r["n"]) for r in rows] == [("2", "ok", "1.0", "3"), ("3", "error", "", "")]
    assert "AssertionError: x = 3 is the failing point" in rows[1]["error"]
    for point in (out / "s" / "points").iterdir():  # executed notebooks kept, failed ones included
        assert (point / "notebook.ipynb").exists() and (point / "result.json").exists()
    assert "1 failed" in capsys.readouterr().out

    gpu = tmp_path / "gpu"
    gpu.mkdir()
    (gpu / "gpu-20260101-000000.json").write_text(json.dumps(dict(environment={"device": "X"}, peaks={}, rows=[
        dict(kind="fwd", impl="fa2lab triton", N=1, D=1, causal=False, tflops=1.0)])))
    page = build_report(out, tmp_path / "report.html", gpu_results=gpu).read_text()
    assert page.count("plotly.js v") == 1 and 'src="http' not in page  # inline once: works offline
    assert "a tiny sweep" in page and "x = 3 is the failing point" in page and "not drawn" in page
    assert "GPU benchmark" in page and page.count("class=fig") == 2

    assert cli.main(["report", "--results", str(out), "--out", str(tmp_path / "r2.html")]) == 0
    assert (tmp_path / "r2.html").exists()


def test_cli_refuses_a_bad_spec_before_running_anything(tmp_path, nb, capsys):
    good = write_spec(tmp_path, "notebook: nb.ipynb\ngrid: {x: [1]}\n", "good.yaml")
    bad = write_spec(tmp_path, "notebook: nb.ipynb\ngrid: {y: [1]}\n", "bad.yaml")
    assert cli.main(["sweep", str(good), str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown parameter 'y'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_report_without_results(tmp_path):
    page = build_report(tmp_path / "none", tmp_path / "r.html", include_gpu=False).read_text()
    assert "No sweep results" in page and "plotly.js v" not in page


def test_a_metric_named_like_a_column_gets_its_own_column(tmp_path, nb):
    spec = load_spec(write_spec(tmp_path, "notebook: nb.ipynb\ngrid: {x: [1]}\n"))

    def execute(notebook, output, parameters, *, cwd, timeout_s):
        record_metrics({"seconds": 99.0, "x": -1, "y": 2}, parameters["metrics_path"])

    runner.run_sweep(spec, tmp_path / "out", progress=False, execute=execute)
    row = _table(tmp_path / "out" / spec.name)[0]
    assert (row["metric_seconds"], row["metric_x"], row["x"], row["y"]) == ("99.0", "-1", "1", "2")
    assert row["seconds"] != "99.0"
