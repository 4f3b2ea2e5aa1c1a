# Targets: install, test (CPU: Triton interpreter + ahead-of-time GPU compiles), test-gpu, lint, bench.
PYTHON ?= python
PYTEST_WORKERS ?= 2

.PHONY: install test test-gpu lint bench bench-quick

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[test]'

test:
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) tests

test-gpu:
	$(PYTHON) -m pytest -q -m gpu tests

lint:
	ruff check .

bench:
	$(PYTHON) bench/bench_kd_loss.py
	$(PYTHON) bench/bench_prefix_attention.py

bench-quick:
	$(PYTHON) bench/bench_kd_loss.py --quick
	$(PYTHON) bench/bench_prefix_attention.py --quick
