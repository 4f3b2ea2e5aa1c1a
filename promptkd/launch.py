"""What the Triton launchers (KD loss and prefix attention) share: output buffers that tests can
poison, ceiling division, whether kernels run in Triton's interpreter, and the device's SM count."""

from __future__ import annotations

import functools
import os

import torch

#: Tests set this to float("nan") so any buffer element a kernel forgets to write shows up.
POISON: float | None = None


def buffer(shape, dtype, device) -> torch.Tensor:
    """An uninitialised buffer for a kernel to fill (filled with POISON when tests set it)."""
    if POISON is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, POISON, dtype=dtype, device=device)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
