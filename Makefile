# The README's two commands are `make run` and `make test`; everything else supports them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned first so pip never resolves torch to a multi-GB CUDA build on a CPU machine.
TORCH_SPEC ?= torch==2.13.0
ROWS ?= 2000000

.PHONY: setup run test lint typecheck pytest bench predict-demo docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

run: setup           ## the main job: train a digits classifier with 2 workers on a local Ray
	$(VENV)/bin/raytorch train jobs/train_digits.yaml

predict-demo: setup  ## batch inference over a generated parquet dataset (ROWS=...)
	$(VENV)/bin/raytorch predict jobs/predict_parquet.yaml data.rows=$(ROWS)

lint: setup          ## ruff, and the layers contract (a lower layer importing a higher one fails)
	$(VENV)/bin/ruff check raytorch tests benchmarks jobs
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff format --check raytorch tests benchmarks jobs

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	$(VENV)/bin/pytest

test: lint typecheck pytest

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

docs: setup          ## the API reference, from the docstrings: docs/api/index.html
	$(VENV)/bin/pdoc -o docs/api raytorch raytorch.core.errors
