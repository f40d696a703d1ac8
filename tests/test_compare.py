"""`fa2lab report --compare A B` (fa2lab.sweep.compare) on two small synthetic result sets: sweeps
written by the runner itself (with repeats, so a spread is measured) and GPU results files."""

import json

import pytest

from fa2lab import cli
from fa2lab.sweep import load_spec, record_metrics, runner
from fa2lab.sweep.compare import compare, direction, load_side, relative_spread

PARAMS = '''n: int = 1  # a size
impl: str = "a"  # an implementation
metrics_path: str = ""  # set by fa2lab sweep'''


@pytest.fixture
def spec(tmp_path):
    from test_sweep import write_notebook

    write_notebook(tmp_path / "nb.ipynb", params=PARAMS, body="pass")
    path = tmp_path / "bench.yaml"
    path.write_text("notebook: nb.ipynb\ngrid: {n: [1, 2, 3]}\nrepeats: 3\n")
    return load_spec(path)


def _run(spec, out, figures):
    """Write a sweep whose point (n, repeat) records figures[n][repeat] as tiled_ms, and a peak."""
    def execute(notebook, output, parameters, *, cwd, timeout_s):
        n, rep = parameters["n"], int(output.parent.name.split("_r")[1].split("_")[0])
        record_metrics({"tiled_ms": figures[n][rep], "tiled_peak_mib": 10.0 * n, "label": "x"},
                       parameters["metrics_path"])

    runner.run_sweep(spec, out, progress=False, execute=execute)
    return out


def test_sweeps_changes_beyond_the_measured_spread_are_flagged(tmp_path, spec):
    a = _run(spec, tmp_path / "a", {1: [10, 10.5, 9.5], 2: [20, 21, 19], 3: [30, 30, 30]})
    # n=1: 2x slower (far beyond 10% + 10%); n=2: 5% faster, within the spread; n=3: 10% faster,
    # beyond a spread of 0 + 3%.
    b = _run(spec, tmp_path / "b", {1: [20, 20.5, 19.5], 2: [19, 20, 18], 3: [27, 27.4, 26.6]})
    result = compare(load_side(a / "bench"), load_side(b))
    by = {(r["case"], r["impl"]): r for r in result["rows"]}
    assert set(by) == {(f"n={n}", m) for n in (1, 2, 3) for m in ("tiled_ms", "tiled_peak_mib")}  # 'label' is text
    slow, same, fast = by[("n=1", "tiled_ms")], by[("n=2", "tiled_ms")], by[("n=3", "tiled_ms")]
    assert (slow["a"], slow["b"], slow["ratio"]) == (10, 20, 2.0) and slow["verdict"] == "slower" and slow["beyond"]
    assert slow["spread_a"] == pytest.approx(0.1) and (slow["n_a"], slow["n_b"]) == (3, 3)
    assert same["verdict"] == "within spread" and same["beyond"] is False
    assert fast["ratio"] == pytest.approx(0.9) and fast["verdict"] == "faster" and fast["spread_a"] == 0
    # The same peak in both runs, every repeat: a spread of 0 and a ratio of 1 is no change.
    assert by[("n=1", "tiled_peak_mib")]["verdict"] == "within spread"

    out = tmp_path / "cmp.html"
    assert cli.main(["report", "--compare", str(a), str(b), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("plotly.js v") == 1 and "2 changed beyond the measured run-to-run spread" in page
    assert "<tr class='down'>" in page and "<tr class='up'>" in page and "torch" in page


def test_without_repeats_nothing_is_flagged_and_the_page_says_why(tmp_path):
    from test_sweep import write_notebook

    write_notebook(tmp_path / "nb.ipynb", params=PARAMS, body="pass")
    (tmp_path / "one.yaml").write_text("notebook: nb.ipynb\ngrid: {impl: [a, b]}\n")
    spec = load_spec(tmp_path / "one.yaml")

    def run(out, factor):
        def execute(notebook, output, parameters, *, cwd, timeout_s):
            record_metrics({"gflops": factor * (1 if parameters["impl"] == "a" else 2)}, parameters["metrics_path"])
        runner.run_sweep(spec, out, progress=False, execute=execute)
        return out

    a, b = run(tmp_path / "a", 1.0), run(tmp_path / "b", 3.0)
    result = compare(load_side(a), load_side(b))
    assert [r["ratio"] for r in result["rows"]] == [3.0, 3.0]
    assert all(r["beyond"] is None and r["verdict"] == "no spread measured" for r in result["rows"])
    out = tmp_path / "c.html"
    assert cli.main(["report", "--compare", str(a), str(b), "--out", str(out)]) == 0
    assert "neither run measured a spread" in out.read_text()


def _gpu_file(path, tflops, spread=None, extra=()):
    rows = [dict(kind="fwd", impl="fa2lab triton", N=4096, D=128, causal=False, tflops=tflops),
            dict(kind="fwd", impl="sdpa flash", N=4096, D=128, causal=False, tflops=300.0),
            dict(kind="fwd", impl="flex (compiled)", N=4096, D=128, causal=False, error="compile failed"),
            dict(kind="decode", impl="fa2lab triton (splits=4)", B=1, Hq=32, Hkv=8, L=8192, D=128, tbps=1.5),
            *extra]
    if spread is not None:
        for r in rows:
            r["tflops_spread" if r["kind"] == "fwd" else "tbps_spread"] = spread
    path.write_text(json.dumps(dict(environment=dict(device="NVIDIA H200", fa2lab_commit=path.stem), rows=rows)))
    return path


def test_gpu_results_files(tmp_path, capsys):
    a = _gpu_file(tmp_path / "gpu-a.json", 400.0, spread=0.02)
    b = _gpu_file(tmp_path / "gpu-b.json", 480.0, spread=0.02,
                  extra=[dict(kind="bwd", impl="fa2lab triton", N=4096, D=128, causal=False, tflops=1.0)])
    result = compare(load_side(a), load_side(b))
    by = {(r["source"], r["impl"]): r for r in result["rows"]}
    assert by[("fwd", "fa2lab triton tflops")]["ratio"] == pytest.approx(1.2)
    assert by[("fwd", "fa2lab triton tflops")]["verdict"] == "faster"
    assert by[("fwd", "sdpa flash tflops")]["verdict"] == "within spread"
    assert by[("decode", "fa2lab triton tbps")]["case"] == "B=1 Hq=32 Hkv=8 L=8192"  # split counts dropped
    assert ("fwd", "N=4096 D=128 full", "flex (compiled) tflops") not in by  # a failed row is no figure
    assert result["only_b"] == [("bwd", "N=4096 D=128 full", "fa2lab triton tflops")]
    assert cli.main(["report", "--compare", str(a), str(b), "--out", str(tmp_path / "g.html")]) == 0
    out = capsys.readouterr().out
    assert "1 changed beyond" in out and "faster  x1.200  fwd | N=4096 D=128 full | fa2lab triton tflops" in out
    assert "gpu-b" in (tmp_path / "g.html").read_text()  # where each ran


def test_bad_inputs_are_refused(tmp_path, capsys):
    a = _gpu_file(tmp_path / "gpu-a.json", 1.0)
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", "--compare", str(a), str(tmp_path / "empty")]) == 2
    assert "neither a sweep folder" in capsys.readouterr().err
    assert cli.main(["report", "--compare", str(a), str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.csv").write_text("sweep,point,status\n")
    with pytest.raises(ValueError, match="cannot compare"):
        compare(load_side(a), load_side(tmp_path / "r"))


@pytest.mark.parametrize("name, sense", [("tiled_ms", -1), ("fa2lab triton tflops", 1), ("naive_peak_mib", -1),
                                         ("tiled_mem_exponent", 0), ("seconds", -1), ("tokens_per_s", 1)])
def test_direction(name, sense):
    assert direction(name) == sense


def test_relative_spread():
    assert relative_spread([1.0]) is None and relative_spread([9.0, 10.0, 11.0]) == pytest.approx(0.2)
