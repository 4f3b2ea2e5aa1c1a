# Targets: install, test (CPU: Triton interpreter + ahead-of-time GPU compiles), test-gpu, lint, bench.
PYTHON ?= python
PYTEST_WORKERS ?= 2

.PHONY: install test test-gpu lint bench bench-quick

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[test]'

# The whole suite runs on the CPU as CI runs it (Triton's interpreter, CUDA hidden); on a machine with
# a GPU, the tests marked gpu then run on it with compiled kernels (see tests/conftest.py).
test:
	CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) tests
	@if $(PYTHON) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(PYTHON) -m pytest -q -m gpu tests; fi

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
