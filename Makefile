# fa2lab set-up and entry points. Needs only python3 (>=3.11), pip and make.
#   make test                set up .venv if needed, run tests/ and notebooks/ (what CI runs)
#   make run                 the main job: smoke run, notebook sweeps (papermill; GPU ones with CUDA), results/report.html
#   make bench               python -m fa2lab bench-cpu
#   make env-sync            regenerate environment.yml from pyproject.toml

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
STAMP  := $(VENV)/.fa2lab-installed

# torch is installed first and on its own: left to pip, a bare `torch` requirement pulls the
# multi-GB CUDA build. The default is the CPU wheel. With a GPU, for example:
#   make clean-venv setup FA2LAB_TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
# (an existing importable torch is kept, hence clean-venv when switching builds).
FA2LAB_TORCH ?= torch==2.13.0

PYTEST_ARGS ?=
# The notebook sweeps of the main job (fa2lab sweep); each resumes where it stopped.
SWEEPS ?= experiments/tile_schedule.yaml experiments/memory_scaling.yaml experiments/split_k.yaml
# The GPU sweeps (notebook 07 live): run where torch sees a CUDA device, skipped (saying why) elsewhere.
GPU_SWEEPS ?= experiments/gpu_kernels.yaml experiments/gpu_decode.yaml
# notebooks/ is absent from a fresh clone until it holds a tracked notebook.
NOTEBOOKS := $(wildcard notebooks)

.PHONY: setup run test bench env-sync clean-venv

setup: $(STAMP)

# Re-run when pyproject.toml changes; otherwise the stamp makes this a no-op.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(FA2LAB_TORCH)
	$(PIP) install -e ".[hf]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests $(NOTEBOOKS) --nbval-lax --nbval-current-env $(PYTEST_ARGS)

# The report is written even when a sweep point failed (its error is in the report); the exit
# status is still the sweep's.
run: $(STAMP)
	$(PY) -m fa2lab run
	$(PY) -m fa2lab sweep $(SWEEPS) --jobs 2; status=$$?; \
	$(PY) -m fa2lab sweep $(GPU_SWEEPS) || status=1; \
	$(PY) -m fa2lab report && exit $$status

bench: $(STAMP)
	$(PY) -m fa2lab bench-cpu

env-sync:
	$(PYTHON) tools/sync_environment.py

clean-venv:
	rm -rf $(VENV)
