"""Where each test's Triton kernels run.

Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 is set
here, before any kernel is defined, since Triton reads it when a kernel is decorated). With CUDA,
kernels compile for the GPU, and the tests that run them on CPU tensors (marked ``interpret``:
explicitly, or as a test whose name or parameters say "triton" without being a ``gpu`` test) are
skipped with that reason. ``make test`` runs the whole suite with CUDA hidden and the interpreter on
(as CI does), then, on a machine with a GPU, the ``gpu`` tests, which need CUDA and compiled kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _threads_per_worker() -> int | None:
    """The cores each xdist worker may use: the machine's, shared out over the workers (None without xdist)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(workers))


# Each worker would otherwise start one torch / OpenMP thread per core: with two workers on two cores, four
# threads spinning on two cores made the CPU loss tests 25x slower than alone (0.5 s instead of 0.02 s each).
# The workers' threads share the cores out instead; subprocesses the tests start inherit the same count. The
# results do not depend on it (every native row pass is per row), and tests/test_native.py runs the native
# kernels with two threads in a process of their own.
THREADS = _threads_per_worker()
if THREADS is not None:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


def _runs_triton_on_cpu(item) -> bool:
    if "interpret" in item.keywords:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "triton" in item.originalname or any(value == "triton" for value in params.values())


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers added here
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords:
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
            elif INTERPRETING:
                item.add_marker(pytest.mark.skip(reason="needs compiled kernels: run without TRITON_INTERPRET"))
        elif _runs_triton_on_cpu(item):
            item.add_marker(pytest.mark.interpret)
            if not INTERPRETING:
                item.add_marker(pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 "
                                                        "(make test runs the suite so, with CUDA hidden)"))
