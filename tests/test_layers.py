"""The package's import graph: no cycles, and layers that point one way (CONVENTIONS.md, 15).

Every `import` / `from ... import` of fa2lab inside fa2lab is read with ast, deferred ones (inside
functions) included: a deferred import hides a cycle from Python, not from a reader."""

import ast
import collections
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fa2lab"

# Lowest first; a module may import its own layer or lower ones, never a higher one.
# The algorithms: validation and masks, readable and fast algorithms, the dispatch point, the entry
# points (the `fa2lab` facade re-exports these), integrations.
ALGORITHMS = [{"_checks", "_deprecated", "_empty", "determinism", "masks", "variants"}, {"reference", "tiled", "kernels"}, {"backends"}, {"api", "decode", "fa2lab"},
              {"kvcache", "models", "hf", "distributed", "compat"}]
# Measurement and experiments: they may use every algorithm; no algorithm imports them.
EXPERIMENTS = [{"measure"}, {"hardware"}, {"cost"}, {"bench"}, {"viz"}, {"sweep", "cli", "__main__"}]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(name):  # a module, or the package whose __init__ defines the name
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges = collections.defaultdict(set)
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    keep = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(keep + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            edges[mod] |= {resolve(t) for t in targets if t.split(".")[0] == "fa2lab"} - {mod}
    return edges


def _component(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "fa2lab"


def _rank(component: str) -> tuple[str, int]:
    for name, layers in (("algorithms", ALGORITHMS), ("experiments", EXPERIMENTS)):
        for i, layer in enumerate(layers):
            if component in layer:
                return name, i
    raise AssertionError(f"fa2lab.{component} has no layer: add it to ALGORITHMS or EXPERIMENTS in {__file__}")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    assert _cycles(_graph()) == []


def test_no_import_cycles_between_subpackages():
    comp_edges = collections.defaultdict(set)
    for a, bs in _graph().items():
        comp_edges[_component(a)] |= {_component(b) for b in bs} - {_component(a)}
    assert _cycles(comp_edges) == []


def test_layers_point_one_way():
    bad = []
    for a, bs in sorted(_graph().items()):
        for b in sorted(bs):
            (chain_a, rank_a), (chain_b, rank_b) = _rank(_component(a)), _rank(_component(b))
            if chain_a == chain_b and rank_b > rank_a:
                bad.append(f"{a} -> {b} (a lower layer imports a higher one)")
            elif chain_a == "algorithms" and chain_b == "experiments":
                bad.append(f"{a} -> {b} (an algorithm imports measurement or experiment code)")
    assert bad == []


@pytest.mark.parametrize("source,expected", [
    ("from fa2lab.api import attention", {"fa2lab.api"}),
    ("from fa2lab import masks, attention", {"fa2lab.masks", "fa2lab"}),
    ("def f():\n    from fa2lab.cost.tiles import tile_config", {"fa2lab.cost.tiles"}),
])
def test_the_graph_sees_every_kind_of_import(tmp_path, monkeypatch, source, expected):
    # The checks above can fail: a planted module's imports, deferred ones included, are found.
    pkg = tmp_path / "fa2lab"
    for mod in ("api", "masks", "cost/tiles", "cost/__init__", "__init__", "probe"):
        (pkg / mod).parent.mkdir(parents=True, exist_ok=True)
        (pkg / f"{mod}.py").write_text(source if mod == "probe" else "")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    assert _graph()["fa2lab.probe"] == expected


def test_a_planted_cycle_and_an_upward_import_fail(tmp_path, monkeypatch):
    pkg = tmp_path / "fa2lab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "masks.py").write_text("def f():\n    from fa2lab import backends\n")
    (pkg / "backends.py").write_text("from fa2lab.masks import f\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    assert _cycles(_graph()) == [["fa2lab.backends", "fa2lab.masks"]]
    with pytest.raises(AssertionError, match="a lower layer imports a higher one"):
        test_layers_point_one_way()
