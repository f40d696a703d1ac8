"""GPU sweeps (experiments/gpu_kernels.yaml, gpu_decode.yaml: notebook 07 live) checked on a CPU:
the specs are valid, a CPU-only machine skips them saying why, the cases they pass are parsed with
errors that name the fix, a live run's rows become sweep metrics, and every run records the
versions a GPU figure depends on."""

import pytest
import torch

from fa2lab import cli, viz
from fa2lab.bench import gpu as gpu_bench
from fa2lab.sweep import load_spec
from fa2lab.sweep.gpu import needs_gpu, skip_reason
from fa2lab.sweep.runner import ENV_COLUMNS, environment
from fa2lab.sweep.spec import REPO

GPU_SPECS = ["gpu_kernels", "gpu_decode"]


@pytest.mark.parametrize("name", GPU_SPECS)
def test_gpu_specs_are_valid_and_need_a_gpu(name):
    spec = load_spec(REPO / "experiments" / f"{name}.yaml")
    assert spec.notebook.name == "07_gpu_kernels.ipynb" and needs_gpu(spec) and spec.max_jobs == 1
    assert spec.repeats >= 2  # the spread that report --compare needs
    for point in spec.points():  # every case the sweep passes parses
        for case in point.params["fwd_cases"]:
            gpu_bench.parse_fwd_case(case)
        for case in point.params["decode_cases"]:
            gpu_bench.parse_decode_case(case)
    assert set(spec.parameters.get("impls", [])) <= set(gpu_bench.FWD_IMPLS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the GPU sweeps run here")
def test_a_cpu_only_machine_skips_the_gpu_sweeps_saying_why(tmp_path, capsys):
    specs = [str(REPO / "experiments" / f"{n}.yaml") for n in GPU_SPECS]
    assert cli.main(["sweep", *specs, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    for name in GPU_SPECS:
        assert f"{name}: skipped: the spec asks for resources {{'GPU': 1}} (a CUDA device)" in out
    assert "torch.cuda.is_available() is False" in out and "--cluster" in out
    assert not (tmp_path / "out").exists()
    assert skip_reason(load_spec(REPO / "experiments" / "split_k.yaml")) is None  # CPU sweeps are not skipped
    # A local Dask cluster is this machine: skipped too, and no cluster is started for nothing.
    from fa2lab.sweep import dask_runner

    said = []
    assert dask_runner.run_sweeps_on_cluster([load_spec(s) for s in specs], tmp_path / "out", cluster="local:2",
                                             log=said.append) == []
    assert len(said) == 2 and all(": skipped: the spec asks for resources" in s for s in said)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [("4096,128", "expected 'N,D,full'"), ("4096,100,full", "D dividing 2048"),
                                           ("x,128,causal", "expected"), ("1,32,8,4096", "five positive"),
                                           ("1,32,5,4096,128", "multiple of Hkv=5")])
def test_bad_cases_are_refused_before_any_device_is_touched(text, message):
    parse = gpu_bench.parse_decode_case if text.count(",") >= 3 else gpu_bench.parse_fwd_case
    with pytest.raises(ValueError, match=message):
        parse(text)
    with pytest.raises(ValueError, match=message):
        kind = "decode_cases" if parse is gpu_bench.parse_decode_case else "fwd_cases"
        gpu_bench.run(**{kind: [text]})


def test_parsed_cases():
    assert gpu_bench.parse_fwd_case("16384, 128, causal") == (16384, 128, True)
    assert gpu_bench.parse_decode_case("8,32,8,8192,128") == (8, 32, 8, 8192, 128)


def test_live_rows_become_sweep_metrics():
    rows = [dict(kind="fwd", impl="fa2lab triton", N=1024, D=128, causal=False, tflops=400.0),
            dict(kind="fwd", impl="fa2lab triton", N=4096, D=128, causal=False, tflops=100.0),
            dict(kind="fwd", impl="sdpa flash", N=1024, D=128, causal=False, tflops=200.0),
            dict(kind="fwd", impl="sdpa flash", N=4096, D=128, causal=False, tflops=200.0),
            dict(kind="fwd", impl="flex (compiled)", N=1024, D=128, causal=False, error="failed"),
            dict(kind="decode", impl="fa2lab triton (splits=8)", B=1, Hq=32, Hkv=8, L=8192, D=128, tbps=1.0),
            dict(kind="decode", impl="sdpa cudnn", B=1, Hq=32, Hkv=8, L=8192, D=128, tbps=2.0)]
    m = viz.gpu.sweep_metrics(dict(rows=rows))
    assert m["fwd_fa2lab_triton_tflops"] == pytest.approx(200.0)  # geometric mean over the shapes
    assert m["fwd_over_sdpa_flash"] == pytest.approx(1.0)  # sqrt(2 * 0.5)
    assert m["decode_fa2lab_triton_tbps"] == 1.0 and m["decode_over_sdpa_cudnn"] == 0.5
    assert not any("flex" in k for k in m) and not any(k.startswith("bwd") for k in m)


def test_every_run_records_device_driver_torch_triton_and_commit():
    env = environment()
    for key in ("device", "driver", "torch", "triton", "fa2lab_commit"):
        assert key in env and key in ENV_COLUMNS
    assert env["torch"] == torch.__version__ and env["fa2lab_commit"]
    if not torch.cuda.is_available():
        assert env["driver"] in ("",) or env["driver"][0].isdigit()
