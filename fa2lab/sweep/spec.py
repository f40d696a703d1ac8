"""Sweep specs: which notebook, which parameter values, how many repeats, which report figures.

A spec is YAML (read with yaml.safe_load), for example experiments/memory_scaling.yaml:

    notebook: notebooks/03_memory_scaling.ipynb   # relative to the spec's folder or the repo root
    description: peak memory and time against N    # shown in the report
    parameters: {mode: fwd}                         # fixed for every point
    grid:                                           # every combination is one point
      ns: [[256], [512], [1024]]
    repeats: 1                                      # runs of each point (timing noise)
    max_jobs: 1                                     # cap on --jobs (1: timings must not overlap)
    timeout_s: 600                                  # per notebook cell
    resources: {GPU: 1}                             # Dask worker resources one point holds (--cluster);
                                                    # naming GPU: skipped locally without CUDA
    retries: 2                                      # --cluster: reruns of a point whose worker died
    timing: {threshold: 0.1, retries: 2}            # fa2lab.measure.TimingPolicy of the points' timings
    report:                                         # figures of the results table
      - {x: n_max, y: [tiled_peak_mib, naive_peak_mib], log_x: true, log_y: true, fit: true}

Every name in `parameters` and `grid` must be a parameter of the notebook's cell tagged
`parameters`, written `name: type = value  # what it is`, and every value must have that type;
`load_spec` refuses a bad spec before anything runs, naming the problem.
"""

from __future__ import annotations

import ast
import io
import itertools
import json
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]  # the checkout (experiments/, notebooks/, results/); fa2lab.cli too
METRICS_PARAM = "metrics_path"  # set by the runner for every point; notebooks pass it to record_metrics
SPEC_KEYS = {"notebook", "description", "parameters", "grid", "repeats", "max_jobs", "timeout_s", "report", "name",
             "resources", "retries", "timing"}
REPORT_KEYS = {"x", "y", "color", "log_x", "log_y", "fit", "title"}
SCALAR_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


class SpecError(ValueError):
    """A sweep spec or a notebook's parameters cell that cannot be run; the message says why."""


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str  # the annotation as written: int, float, bool, str, list[int], ...
    default: object
    help: str  # the line's comment


def notebook_parameters(path) -> dict[str, Parameter]:
    """The typed parameters of a notebook's cell tagged `parameters`, in order."""
    path = Path(path)
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read notebook {path}: {exc}") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list) \
            or not all(isinstance(c, dict) for c in nb["cells"]):
        raise SpecError(f"{path} is not a Jupyter notebook: expected a JSON object with a list of cells, got "
                        f"{type(nb).__name__}{' without cells' if isinstance(nb, dict) else ''}")

    def tags(cell):
        meta = cell.get("metadata")
        found = meta.get("tags", []) if isinstance(meta, dict) else []
        return found if isinstance(found, list) else []

    cells = [c for c in nb["cells"] if "parameters" in tags(c)]
    if not cells:
        raise SpecError(f"{path} has no cell tagged 'parameters'; papermill needs one to inject values")
    source = cells[0].get("source", "")
    source = "".join(source) if isinstance(source, list) and all(isinstance(x, str) for x in source) else source
    if not isinstance(source, str):
        raise SpecError(f"{path}: the parameters cell's source is not text (got {type(source).__name__})")
    try:
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        body = ast.parse(source).body
    except (SyntaxError, tokenize.TokenError, ValueError) as exc:
        raise SpecError(f"{path}: the parameters cell is not valid Python ({type(exc).__name__}: {exc}); "
                        f"write one `name: type = value  # comment` per line") from None
    params = {}
    for node in body:
        where = f"{path.name}, parameters cell line {node.lineno}"
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None):
            raise SpecError(f"{where}: expected `name: type = value  # comment`, got "
                            f"{ast.get_source_segment(source, node)!r}")
        annotation = ast.get_source_segment(source, node.annotation)
        try:
            default = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise SpecError(f"{where}: the default of {node.target.id} must be a literal, got "
                            f"{ast.get_source_segment(source, node.value)!r}") from None
        param = Parameter(node.target.id, annotation, default, comments.get(node.lineno, ""))
        problem = type_problem(param.type, default)
        if problem:
            raise SpecError(f"{where}: default of {param.name}: {problem}")
        if param.name in params:
            raise SpecError(f"{where}: {param.name} is defined twice in the parameters cell; keep one")
        params[param.name] = param
    return params


def _element_type(annotation: str) -> str | None:
    m = re.fullmatch(r"(?:list|tuple)\[\s*(\w+)\s*(?:,\s*\.\.\.\s*)?\]", annotation)
    return m.group(1) if m else None


def type_problem(annotation: str, value) -> str | None:
    """None if `value` fits the annotation (int, float, bool, str, list[T]); else why not."""
    if annotation in SCALAR_TYPES:
        want = SCALAR_TYPES[annotation]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"expected {annotation}, got {value!r} ({type(value).__name__})"
    inner = _element_type(annotation)
    if inner in SCALAR_TYPES:
        if not isinstance(value, (list, tuple)):
            return f"expected {annotation} (a list), got {value!r} ({type(value).__name__})"
        for v in value:
            problem = type_problem(inner, v)
            if problem:
                return f"expected {annotation}: element {problem}"
        return None
    return (f"unsupported parameter type {annotation!r}; use int, float, bool, str or list[...] of them "
            "(papermill passes plain literals)")


def _coerce(annotation: str, value):
    """float parameters given as ints become floats; tuples become lists (YAML has only lists)."""
    if annotation == "float":
        return float(value)
    inner = _element_type(annotation)
    if inner:
        return [float(v) if inner == "float" else v for v in value]
    return value


@dataclass(frozen=True)
class Point:
    index: int
    params: dict  # every parameter the runner injects (fixed + grid), metrics_path excluded
    grid: dict  # the grid's values of this point
    repeat: int

    @property
    def id(self) -> str:
        """Stable across runs of the same spec: a readable slug of the grid values and a hash of
        everything injected, so resuming finds the point whatever the order of the grid."""
        digest = _hash({"params": self.params, "repeat": self.repeat})
        slug = "_".join(f"{k}={_slug(v)}" for k, v in self.grid.items())[:60] or "point"
        return f"{slug}_r{self.repeat}_{digest}"


def _slug(v) -> str:
    text = ",".join(map(str, v)) if isinstance(v, list) else str(v)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def _hash(data) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    path: Path
    notebook: Path
    description: str = ""
    parameters: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    repeats: int = 1
    max_jobs: int | None = None
    timeout_s: int = 600
    report: tuple = ()
    notebook_params: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)  # Dask worker resources per point, e.g. {"GPU": 1}
    retries: int = 2  # on a cluster: how often a point whose worker died is run again
    timing: dict = field(default_factory=dict)  # TimingPolicy fields for the points' timings

    def points(self) -> list[Point]:
        names = list(self.grid)
        out = []
        for combo in itertools.product(*(self.grid[n] for n in names)):
            grid = dict(zip(names, combo))
            for r in range(self.repeats):
                out.append(Point(len(out), {**self.parameters, **grid}, grid, r))
        return out


def _resolve_notebook(value, spec_path: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{spec_path}: 'notebook' must be a path to a .ipynb file, got {value!r}")
    tried = [spec_path.parent / value, REPO / value]
    for p in tried:
        if p.is_file():
            return p.resolve()
    available = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
    raise SpecError(f"{spec_path}: unknown notebook {value!r} (looked for {', '.join(map(str, tried))}); "
                    f"notebooks/ has {available}")


def _check_values(spec_path, where, name, values, params) -> list:
    if name == METRICS_PARAM:
        raise SpecError(f"{spec_path}: {where}: {METRICS_PARAM} is set by fa2lab sweep for every point; remove it")
    if name not in params:
        raise SpecError(f"{spec_path}: {where}: unknown parameter {name!r}; the notebook's parameters are "
                        f"{[p for p in params if p != METRICS_PARAM]}")
    out = []
    for v in values:
        problem = type_problem(params[name].type, v)
        if problem:
            raise SpecError(f"{spec_path}: {where}: parameter {name!r}: {problem}")
        out.append(_coerce(params[name].type, v))
    return out


def load_spec(path) -> SweepSpec:
    """Read and check a sweep spec; raises SpecError naming the first problem found."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"cannot read sweep spec {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping with at least 'notebook', got {type(raw).__name__}")
    if "notebook" not in raw:
        hint = (" (it looks like a config of `fa2lab run` / `bench-cpu` / `bench-tiles`, not a notebook sweep)"
                if {"ns", "impls", "tiles", "modes"} & set(raw) else "")
        raise SpecError(f"{path}: missing 'notebook'{hint}; a sweep spec names the notebook it runs")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    notebook = _resolve_notebook(raw["notebook"], path)
    params = notebook_parameters(notebook)
    if METRICS_PARAM not in params:
        raise SpecError(f"{notebook.name}: its parameters cell has no `{METRICS_PARAM}: str = \"\"`; without it "
                        "the notebook cannot hand its metrics to the sweep (fa2lab.sweep.record_metrics)")
    fixed = raw.get("parameters") or {}
    grid = raw.get("grid") or {}
    for key, value in (("parameters", fixed), ("grid", grid)):
        if not isinstance(value, dict):
            raise SpecError(f"{path}: '{key}' must be a mapping of parameter names, got {type(value).__name__}")
    fixed = {n: _check_values(path, "parameters", n, [v], params)[0] for n, v in fixed.items()}
    checked_grid = {}
    for n, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{path}: grid: {n!r} must be a non-empty list of values, got {values!r}")
        checked_grid[n] = _check_values(path, "grid", n, values, params)
        seen = {}
        for v in checked_grid[n]:
            key = json.dumps(v, sort_keys=True)
            if key in seen:  # one point id, one folder: it would run twice and give two rows
                raise SpecError(f"{path}: grid: {n!r} lists {v!r} more than once ({values!r}); remove the "
                                f"duplicate (to run each point several times, use 'repeats: N')")
            seen[key] = v
    both = set(fixed) & set(checked_grid)
    if both:
        raise SpecError(f"{path}: {sorted(both)} appear in both 'parameters' and 'grid'; keep one")
    repeats, max_jobs, timeout = raw.get("repeats", 1), raw.get("max_jobs"), raw.get("timeout_s", 600)
    for key, value, allow_none in (("repeats", repeats, False), ("max_jobs", max_jobs, True),
                                   ("timeout_s", timeout, False)):
        if not (allow_none and value is None) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SpecError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    report = raw.get("report") or []
    if not isinstance(report, list):
        raise SpecError(f"{path}: 'report' must be a list of figures ({{x: ..., y: ...}}), got {type(report).__name__}")
    for i, fig in enumerate(report):
        if not isinstance(fig, dict) or "x" not in fig or "y" not in fig:
            raise SpecError(f"{path}: report[{i}] must be a mapping with at least 'x' and 'y', got {fig!r}")
        if set(fig) - REPORT_KEYS:
            raise SpecError(f"{path}: report[{i}]: unknown keys {sorted(set(fig) - REPORT_KEYS)}; "
                            f"known: {sorted(REPORT_KEYS)}")
    timing = raw.get("timing") or {}
    try:
        from fa2lab.measure.timing import TimingPolicy

        if not isinstance(timing, dict):
            raise ValueError(f"expected a mapping of TimingPolicy fields, got {timing!r}")
        TimingPolicy.from_dict(timing)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{path}: 'timing': {exc}") from None
    resources, retries = _check_cluster_keys(path, raw)
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SpecError(f"{path}: 'name' must be letters, digits, '_', '.' or '-' (a folder name), got {name!r}")
    return SweepSpec(name=name, path=path.resolve(), notebook=notebook, description=str(raw.get("description", "")),
                     parameters=fixed, grid=checked_grid, repeats=repeats, max_jobs=max_jobs, timeout_s=timeout,
                     report=tuple(report), notebook_params=params, resources=resources, retries=retries,
                     timing=dict(timing))


def _check_cluster_keys(path, raw) -> tuple[dict, int]:
    """`resources` (name -> positive number, as `dask worker --resources GPU=1`) and `retries`."""
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict) or not all(
            isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", k) and isinstance(v, (int, float))
            and not isinstance(v, bool) and v > 0 for k, v in resources.items()):
        raise SpecError(f"{path}: 'resources' must map resource names to positive numbers (Dask worker "
                        f"resources, e.g. {{GPU: 1}}), got {resources!r}")
    retries = raw.get("retries", 2)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise SpecError(f"{path}: 'retries' must be a non-negative integer (reruns of a point whose worker "
                        f"died), got {retries!r}")
    return dict(resources), retries
