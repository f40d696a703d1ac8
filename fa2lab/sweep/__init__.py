"""Batch experiments: parameterised notebooks run over a grid by papermill, and a report.

    record_metrics(metrics, metrics_path)   what a notebook calls to hand numbers to its sweep
    load_spec(path) -> SweepSpec            read and check a YAML spec (SpecError names problems)
    run_sweep(spec, out_root, jobs=...)     run unfinished points; results/sweeps/<name>/
    build_report(results_root, out)         one self-contained HTML page of every sweep

Command line: `fa2lab sweep SPEC [SPEC ...] [--jobs N] [--cluster local[:N]|tcp://HOST:PORT |
--scheduler-file FILE]` (points as Dask tasks: fa2lab.sweep.dask_runner), `fa2lab report [--out PATH]`,
`fa2lab report --compare A B` (fa2lab.sweep.compare).
The runner and the report import papermill and pandas only when called, so notebooks that
import record_metrics stay quick to start.
"""

from fa2lab.sweep.metrics import atomic_write_json, atomic_write_text, record_metrics
from fa2lab.sweep.spec import Parameter, SpecError, SweepSpec, load_spec, notebook_parameters

__all__ = ["record_metrics", "atomic_write_text", "atomic_write_json", "load_spec", "SweepSpec", "SpecError",
           "Parameter", "notebook_parameters", "run_sweep", "results_table", "build_report"]


def __getattr__(name):
    if name in ("run_sweep", "results_table"):
        from fa2lab.sweep import runner

        return getattr(runner, name)
    if name == "build_report":
        from fa2lab.sweep.report import build_report

        return build_report
    raise AttributeError(f"module 'fa2lab.sweep' has no attribute {name!r}")
