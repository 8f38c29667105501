# `make demo` runs the demo; `make test` runs the tests. Both create .venv and install on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install clean-venv

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# the main job: a small sweep on the photos (one executed notebook per quantizer), then the table from MLflow
demo: $(STAMP)
	$(BIN)/python -m vqlab.sweep demo
	$(BIN)/python -m vqlab.report demo-photos --notebook

# two pytest-xdist workers: the suite's subprocesses and notebooks wait on I/O and startup a good share
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=20

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
