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
