PY ?= python3

.PHONY: install demo test lint bench

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
