"""The notebooks: committed clean, typed parameters, and a papermill run of each with small
non-default parameters (nbval runs them with their defaults: `pytest notebooks --nbval-lax`)."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fa2lab.sweep.clean import CHECK_TAG, is_check_cell
from fa2lab.sweep.spec import METRICS_PARAM, notebook_parameters, type_problem

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ["00_quickstart", "01_online_softmax", "02_tiling", "03_memory_scaling", "04_split_k_decoding",
            "05_kv_caches", "06_hardware_profiles", "07_gpu_kernels", "08_ring_attention", "09_attention_variants",
            "10_backward",
            "11_numerics", "12_models"]
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
CLEAN = "python -m fa2lab.sweep.clean notebooks/*.ipynb"

# Small, non-default parameters: every notebook's code paths at a fraction of its default cost.
SMOKE = {
    "00_quickstart": dict(seq_len_q=70, seq_len_k=90, block_q=32, block_k=16, window_left=20, heads_q=4,
                          heads_kv=1, head_dim=16, seed=1),
    "01_online_softmax": dict(n_keys=20, block=3, logit_scale=8.0, value_dim=4, max_offset=100, seed=1),
    "02_tiling": dict(seq_len=100, block_q=32, block_k=32, window=40, group=2, varlen_seqlens=[30, 0, 45]),
    "03_memory_scaling": dict(ns=[128, 256], impls=["tiled", "naive"], mode="fwd+bwd", heads=2, head_dim=32,
                              block=64, budget_s=0.01),
    "04_split_k_decoding": dict(cache_len=700, num_splits=3, heads_q=4, heads_kv=1, head_dim=32, lengths=[512],
                                splits=[1, 2], budget_s=0.01, phi_max=40, seed=1),
    "05_kv_caches": dict(num_pages=10, page_size=3, steps=12, max_active=2, window=3, window_tokens=6,
                         cache_len=256, ranks=[4, 8], head_dim=32, seed=1),
    "06_hardware_profiles": dict(profiles=["t4", "h100", "cpu-generic"], head_dims=[64], dtype="bfloat16",
                                 roofline_profile="a100", cpu_ns=[128], cpu_tiles=[64]),
    "07_gpu_kernels": dict(live=False),  # results_file: a synthetic one, written by the fixture
    "08_ring_attention": dict(world_size=3, seq_len=18, layout="zigzag", heads_q=2, heads_kv=1,
                              head_dim=8, seed=1),
    "09_attention_variants": dict(seq_len_q=20, seq_len_k=33, heads=1, head_dim=8, row=19, softcap=1.0,
                                  alibi_slope=0.5, sink=-0.5, dropout_p=0.5, block=8, doc_len=7, seed=1),
    "10_backward": dict(seq_len=70, block_q=16, block_k=16, causal=False, ns=[64, 128], heads=1, head_dim=16),
    "11_numerics": dict(ns=[32, 97], logit_scales=[2.0], dtypes=["float32", "bfloat16"], backends=["tiled", "sdpa"],
                        heads=1, head_dim=16, source_dtype="float16"),
    "12_models": dict(layers=1, hidden=32, heads=2, kv_heads=1, head_dim=8, prompt_len=17, ns=[64],
                      impls=["fa2lab", "eager"], vision=False),
}


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_numbered_notebooks_exist():
    assert [p.stem for p in PATHS] == EXPECTED
    assert set(SMOKE) == set(EXPECTED)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = _load(path)
    assert "widgets" not in nb.get("metadata", {}), f"{path.name} stores widget state; run `{CLEAN}`"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell["outputs"] == [] and cell["execution_count"] is None, \
            f"{path.name} cell {i} has outputs; run `{CLEAN}` before committing"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_parameters_cell_first_typed_and_commented(path):
    nb = _load(path)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", []), f"{path.name}: first code cell must be tagged"
    assert nb["cells"][0]["cell_type"] == "markdown", f"{path.name}: open with a title and what it shows"
    params = notebook_parameters(path)
    assert METRICS_PARAM in params
    for p in params.values():
        assert p.help, f"{path.name}: parameter {p.name} needs a comment saying what it is"
    for name, value in SMOKE[path.stem].items():
        assert name in params, f"smoke parameter {name} is not a parameter of {path.name}"
        assert type_problem(params[name].type, value) is None
        assert value != params[name].default, f"smoke parameter {name} of {path.name} equals its default"
    checks = [c for c in code if is_check_cell(c)]
    assert checks and all("assert " in "".join(c["source"]) for c in checks), \
        f"{path.name}: needs a `{CHECK_TAG}` cell whose asserts nbval runs"
    assert sum(c["cell_type"] == "markdown" for c in nb["cells"]) >= 3


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_papermill_reads_the_same_parameters(path):
    """papermill's own parser (papermill --help-notebook, its warnings) must agree with fa2lab's:
    it gives up on comments that contain '='."""
    import papermill

    assert list(papermill.inspect_notebook(str(path))) == list(notebook_parameters(path))


def _fake_gpu_results(path: Path) -> Path:
    rows = [dict(kind="fwd", impl="fa2lab triton", N=1024, D=64, B=32, H=32, causal=False, ms=1.0, tflops=300.0,
                 err=1e-3, err_sdpa=1e-3, exact=True),
            dict(kind="fwd", impl="sdpa flash", N=1024, D=64, B=32, H=32, causal=False, ms=1.2, tflops=250.0),
            dict(kind="fwd", impl="flex (compiled)", N=1024, D=64, causal=False, error="compile failed"),
            dict(kind="bwd", impl="fa2lab triton", N=1024, D=64, B=32, H=32, causal=False, ms=3.0, tflops=200.0),
            dict(kind="bwd", impl="sdpa flash", N=1024, D=64, B=32, H=32, causal=False, ms=3.3, tflops=180.0),
            dict(kind="decode", impl="fa2lab triton (splits=4)", B=1, Hq=32, Hkv=8, L=8192, D=128, us=20.0,
                 tbps=1.5, err=1e-4, err_sdpa=1e-4),
            dict(kind="decode", impl="sdpa cudnn", B=1, Hq=32, Hkv=8, L=8192, D=128, us=18.0, tbps=1.7)]
    path.write_text(json.dumps(dict(environment=dict(device="NVIDIA H100 80GB HBM3", date="2026-01-01"),
                                    peaks=dict(matmul_tflops=700.0, copy_tbps=3.0), rows=rows)))
    return path


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Every notebook through papermill with its SMOKE parameters, a few at a time, as
    `fa2lab sweep` runs them (cwd = the notebook's folder, metrics to a file)."""
    from fa2lab.sweep.execute import execute_in_subprocess

    out = tmp_path_factory.mktemp("smoke")
    gpu_file = _fake_gpu_results(out / "gpu-20260101-000000.json")

    def run(path):
        params = dict(SMOKE[path.stem], metrics_path=str(out / f"{path.stem}.metrics.json"))
        if path.stem == "07_gpu_kernels":
            params["results_file"] = str(gpu_file)
        try:
            # One torch thread per kernel: the runs share the machine's cores.
            execute_in_subprocess(path, out / path.name, params, cwd=path.parent, timeout_s=300,
                                  env={"OMP_NUM_THREADS": "1"})
            return None
        except Exception as exc:  # noqa: BLE001 - reported by the test of that notebook
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=2) as pool:
        errors = dict(zip(PATHS, pool.map(run, PATHS)))
    return out, errors


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_papermill_smoke_run(smoke_runs, path):
    out, errors = smoke_runs
    assert errors[path] is None, errors[path]
    metrics = json.loads((out / f"{path.stem}.metrics.json").read_text())
    assert metrics, f"{path.name} recorded no metrics"
    executed = _load(out / path.name)
    assert "widgets" not in executed["metadata"], "widget state kept in the executed notebook"
    plotly_outputs = 0
    for cell in executed["cells"]:
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            plotly_outputs += "application/vnd.plotly.v1+json" in data
            assert "plotly.js" not in json.dumps(data.get("text/html", "")), "plotly.js embedded in an output"
    assert plotly_outputs >= 1, f"{path.name} showed no plotly figure"
    size = (out / path.name).stat().st_size
    assert size < 1_500_000, f"executed {path.name} is {size} bytes: static output must stay small"
