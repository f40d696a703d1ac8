"""environment.yml is generated from pyproject.toml; these fail as soon as the two drift."""
import importlib.util
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
ENVIRONMENT = ROOT / "environment.yml"
FIX = "environment.yml is out of date with pyproject.toml: run `make env-sync` and commit the result"

# tools/ is not a package, so load the generator straight from its file.
_spec = importlib.util.spec_from_file_location("sync_environment", ROOT / "tools" / "sync_environment.py")
sync = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync)


def _env_yml():
    conda, pip = [], []
    for dep in yaml.safe_load(ENVIRONMENT.read_text())["dependencies"]:
        if isinstance(dep, dict):
            pip += dep["pip"]
        else:
            conda.append(dep)
    return conda, pip


def test_environment_yml_is_exactly_the_generated_text():
    assert ENVIRONMENT.read_text() == sync.expected_environment_text(PYPROJECT), FIX


def test_every_dependency_appears_on_both_sides():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    want_conda = {"python" + project["requires-python"].replace(" ", ""), "pip"}
    want_pip = {"-e ."}
    for req in project["dependencies"]:
        spec = sync.to_conda(req)
        if spec is None:
            want_pip.add(req.strip())
        else:
            want_conda.add(spec)

    conda, pip = _env_yml()
    for label, want, have in (("conda", want_conda, set(conda)), ("pip", want_pip, set(pip))):
        assert want == have, (
            f"{FIX}\n  {label} entries missing from environment.yml: {sorted(want - have)}"
            f"\n  {label} entries not in pyproject.toml: {sorted(have - want)}"
        )


def test_conda_mapping():
    assert sync.to_conda("torch>=2.5") == "pytorch>=2.5"  # conda-forge's name for it
    assert sync.to_conda("PyYAML >= 6.0") == "pyyaml>=6.0"
    assert sync.to_conda("triton>=3.1; sys_platform == 'linux'") is None  # markers stay with pip
    assert sync.to_conda("foo[bar]>=1") is None
