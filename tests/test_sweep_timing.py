"""Timing conditions through a sweep: record_metrics writes them, results.csv keeps them, the
report draws the spread as error bars, marks contended points, leaves them out of fitted slopes
and warns at the top of the page."""

import csv
import json
import os

import pytest
from nbformat.v4 import new_code_cell, new_notebook

import nbformat
from fa2lab.measure import timing
from fa2lab.measure.timing import Timing
from fa2lab.sweep import load_spec, record_metrics, runner
from fa2lab.sweep.report import build_report, soundness
from fa2lab.sweep.spec import SpecError
from fa2lab.viz.sweeps import sweep_figure

PARAMS = '''x: int = 1  # a length
metrics_path: str = ""  # set by fa2lab sweep'''


def _timing(seconds, contended=False, share=0.02):
    return Timing(median_s=seconds, min_s=0.9 * seconds, max_s=1.2 * seconds, repeats=5, device="cpu", threads=2,
                  others_cpu=share, attempts=3 if contended else 1, contended=contended, threshold=0.1)


@pytest.fixture
def spec_file(tmp_path):
    cell = new_code_cell(PARAMS)
    cell.metadata["tags"] = ["parameters"]
    nbformat.write(new_notebook(cells=[cell], metadata={"kernelspec": {"name": "python3", "display_name": "P",
                                                                       "language": "python"}}),
                   tmp_path / "nb.ipynb")
    path = tmp_path / "s.yaml"
    path.write_text("notebook: nb.ipynb\ngrid: {x: [1, 2, 4, 8]}\ntiming: {threshold: 0.2, retries: 0}\n"
                    "report: [{x: x, y: t_ms, log_x: true, log_y: true, fit: true}]\n")
    return path


def _executor(contended_x, seen_env):
    def execute(notebook, output, parameters, *, cwd, timeout_s):
        seen_env.append(os.environ.get(timing.POLICY_ENV))
        x = parameters["x"]
        # t = x^2 ms on a quiet machine; the contended point is 50x slower, as under a busy neighbour
        t = _timing(x * x * 1e-3 * (50 if x == contended_x else 1), contended=x == contended_x,
                    share=0.45 if x == contended_x else 0.02)
        timing.take_recent()
        timing._record(t)  # as time_call would: the point's conditions come from the process log
        record_metrics({**t.as_metrics("t_ms", 1e3), "err": 1e-7 * x}, parameters["metrics_path"])
    return execute


def test_contended_point_is_recorded_marked_left_out_of_the_fit_and_bannered(tmp_path, spec_file):
    spec = load_spec(spec_file)
    assert spec.timing == {"threshold": 0.2, "retries": 0}
    env = []
    out = tmp_path / "out"
    runner.run_sweep(spec, out, progress=False, execute=_executor(8, env))
    assert env == [json.dumps(spec.timing)] * 4 and os.environ.get(timing.POLICY_ENV) is None
    with open(out / spec.name / "results.csv") as f:
        rows = {int(r["x"]): r for r in csv.DictReader(f)}
    assert rows[8]["t_ms_contended"] == "True" and rows[8]["timing_contended"] == "1"
    assert rows[2]["t_ms_contended"] == "False" and rows[2]["timing_contended"] == "0"
    assert float(rows[8]["timing_others_cpu"]) == 0.45 and rows[1]["timing_threads"] == "2"
    assert (float(rows[4]["t_ms_min"]), float(rows[4]["t_ms_max"])) == pytest.approx((0.9 * 16, 1.2 * 16))

    import pandas as pd

    table = pd.read_csv(out / spec.name / "results.csv")
    fig = sweep_figure(table, "x", "t_ms", log_x=True, log_y=True, fit=True)
    (trace,) = fig.data
    # The slope of the three sound points, not the contended one's (which would give ~3.3).
    assert trace.name == "t_ms (slope 2.00; 1 contended left out)"
    assert list(trace.marker.symbol) == ["circle", "circle", "circle", "x-open"]
    assert list(trace.error_y.array) == pytest.approx([0.2 * x * x for x in (1, 2, 4)] + [0.2 * 64 * 50])
    assert list(trace.error_y.arrayminus) == pytest.approx([0.1 * x * x for x in (1, 2, 4)] + [0.1 * 64 * 50])
    # An untimed metric of the same points (an error, a memory figure) is not judged by the timings.
    (err,) = sweep_figure(table, "x", "err", log_x=True, log_y=True, fit=True).data
    assert err.name == "err (slope 1.00)" and set(err.marker.symbol) == {"circle"} and err.error_y.array is None
    assert soundness(table) == dict(timed=4, contended=1, throttled=0, worst_share=0.45, threshold=0.1)

    page = build_report(out, tmp_path / "r.html", include_gpu=False).read_text()
    head = page[:page.index("<nav>")]
    assert "class=banner" in head and "WARNING: 1 of 4 timed points were measured" in head
    assert "up to 45% of the CPUs" in head and "In: s." in head
    assert "1 of 4 timed points were measured under contention" in page
    assert "slope 2.00; 1 contended left out" in page


def test_a_quiet_sweep_has_no_banner(tmp_path, spec_file):
    spec = load_spec(spec_file)
    runner.run_sweep(spec, tmp_path / "out", progress=False, execute=_executor(None, []))
    page = build_report(tmp_path / "out", tmp_path / "r.html", include_gpu=False).read_text()
    assert "class=banner" not in page and "4 timed points, none contended" in page
    assert "t_ms (slope 2.00)" in page


def test_a_bad_timing_policy_is_refused_before_anything_runs(tmp_path, spec_file):
    spec_file.write_text(spec_file.read_text().replace("retries: 0", "retries: -1"))
    with pytest.raises(SpecError, match="'timing': timing policy: retries must be an integer >= 0, got -1"):
        load_spec(spec_file)
    spec_file.write_text(spec_file.read_text().replace("retries: -1", "patience: 3"))
    with pytest.raises(SpecError, match=r"unknown timing policy field\(s\) \['patience'\]"):
        load_spec(spec_file)


def test_bare_numbers_are_judged_by_the_point_timings():
    import pandas as pd

    # A notebook that records plain floats: record_metrics still adds the point's timing_* columns.
    table = pd.DataFrame(dict(status="ok", x=[1, 2, 4, 8], y=[1.0, 4.0, 16.0, 3200.0],
                              timing_count=[2, 2, 2, 2], timing_contended=[0, 0, 0, 1], timing_throttled=0))
    (trace,) = sweep_figure(table, "x", "y", log_x=True, log_y=True, fit=True).data
    assert trace.name == "y (slope 2.00; 1 contended left out)" and trace.marker.symbol[-1] == "x-open"
    assert soundness(table)["contended"] == 1


def test_a_throttled_gpu_result_is_hatched_and_bannered(tmp_path):
    from fa2lab.viz.gpu import throughput_figure

    def row(impl, ms, throttled=False):
        return dict(kind="fwd", impl=impl, N=4096, D=128, B=8, H=16, causal=False, ms=ms, tflops=400.0 / ms,
                    min_ms=0.9 * ms, max_ms=1.25 * ms, others_cpu=0.01, contended=False, throttled=throttled,
                    sm_clock_mhz_end=1200 if throttled else 1980, sm_clock_max_mhz=1980)
    results = dict(environment=dict(device="NVIDIA H200", date="2026-12-02"), peaks={},
                   rows=[row("fa2lab triton", 1.0, throttled=True), row("sdpa flash", 1.25)])
    ours, flash = throughput_figure(results, "fwd").data
    assert list(ours.marker.pattern.shape) == ["x"] and list(flash.marker.pattern.shape) == [""]
    # 400 TFLOP/s at the median 1 ms: 320 at the slowest repeat (1.25 ms), 444 at the fastest (0.9 ms)
    assert ours.error_y.arrayminus[0] == pytest.approx(80.0) and ours.error_y.array[0] == pytest.approx(400 / 0.9 - 400)
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "gpu-20261202-010000.json").write_text(json.dumps(results))
    page = build_report(tmp_path / "none", tmp_path / "r.html", gpu_results=tmp_path / "gpu").read_text()
    head = page[:page.index("<nav>")]
    assert "class=banner" in head and "1 of 2 at throttled GPU clocks" in head and "GPU benchmark" in head
