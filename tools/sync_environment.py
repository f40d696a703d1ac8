#!/usr/bin/env python3
"""Generate environment.yml (for conda users) from pyproject.toml, the single source of truth.

    python3 tools/sync_environment.py           # rewrite environment.yml (`make env-sync`)
    python3 tools/sync_environment.py --check   # exit 1 with a diff when it is stale

Stdlib only, so it runs before any environment exists.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
ENVIRONMENT = ROOT / "environment.yml"

# PyPI name -> conda-forge name, where they differ. Everything else is the PyPI name lower-cased.
# (conda-forge, not the `pytorch` channel: that one stopped publishing at 2.5.)
CONDA_NAMES = {"torch": "pytorch", "playwright": "playwright-python"}

_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<extras>\[[^\]]*\])?"
    r"\s*(?P<spec>[^;@]*?)\s*(?P<rest>[;@].*)?$"
)

HEADER = """\
# Generated from pyproject.toml by `make env-sync` (tools/sync_environment.py): do not edit by hand.
# For conda users:  conda env create -f environment.yml && conda activate fa2lab
# Requirements conda cannot express (environment markers, extras) go to pip verbatim;
# `-e .` then installs fa2lab itself plus anything conda did not provide.
"""


def to_conda(requirement: str) -> str | None:
    """The conda-forge match spec for a PEP 508 requirement, or None if only pip can express it."""
    m = _REQUIREMENT.match(requirement)
    if m is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    if m["extras"] or m["rest"]:  # markers / URLs / extras have no conda equivalent
        return None
    name = m["name"].lower()
    return CONDA_NAMES.get(name, name) + re.sub(r"\s+", "", m["spec"])


def environment(pyproject_path: Path) -> dict:
    """The environment as data: conda match specs and pip requirements, in pyproject order."""
    project = tomllib.loads(Path(pyproject_path).read_text())["project"]
    conda = [f"python{project['requires-python'].replace(' ', '')}", "pip"]
    pip = []
    for req in project.get("dependencies", []):
        spec = to_conda(req)
        if spec is None:
            pip.append(req.strip())
        else:
            conda.append(spec)
    return {"name": "fa2lab", "channels": ["conda-forge"], "conda": conda, "pip": pip + ["-e ."]}


def _yaml_item(text: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar; quote only what YAML might misread.
    return text if re.fullmatch(r"[A-Za-z0-9_.<>=!~*,+ -]+", text) else json.dumps(text)


def expected_environment_text(pyproject_path: Path = PYPROJECT) -> str:
    env = environment(pyproject_path)
    lines = [HEADER.rstrip("\n"), f"name: {env['name']}", "channels:"]
    lines += [f"  - {c}" for c in env["channels"]]
    lines.append("dependencies:")
    lines += [f"  - {_yaml_item(d)}" for d in env["conda"]]
    lines.append("  - pip:")
    lines += [f"      - {_yaml_item(d)}" for d in env["pip"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff if environment.yml is stale")
    args = parser.parse_args(argv)

    expected = expected_environment_text(PYPROJECT)
    if not args.check:
        ENVIRONMENT.write_text(expected)
        print(f"wrote {ENVIRONMENT.relative_to(ROOT)}")
        return 0
    actual = ENVIRONMENT.read_text() if ENVIRONMENT.exists() else ""
    if actual == expected:
        return 0
    sys.stdout.writelines(difflib.unified_diff(
        actual.splitlines(keepends=True), expected.splitlines(keepends=True),
        "environment.yml (on disk)", "environment.yml (from pyproject.toml)"))
    print("environment.yml is stale: run `make env-sync`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
