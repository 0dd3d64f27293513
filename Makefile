# radchain: `make demo` runs the pipeline on the bundled synthetic corpus; `make test` runs the tests.
# Both create the virtual environment first (pip only: uv/poetry would fetch a multi-GB CUDA torch).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
RADCHAIN := $(VENV)/bin/radchain
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The pipeline on the demo corpus, then SFT -> GRPO -> evaluation of the small CPU model (a few minutes on
# 2 cores); it ends with the evaluation table, the chart's path and what its bars are.
demo: setup
	$(RADCHAIN) run --train --config small-cpu --max-examples 0 --max-eval-per-task 20

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/ingest.py --studies 20000

clean:
	rm -rf .radchain
