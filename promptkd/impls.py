"""Which implementation runs an op: the ``impl`` names and floating dtypes shared by the KD loss
(``promptkd.kd.api``) and prefix attention (``promptkd.attention.api``), and the one picker both call."""

from __future__ import annotations

import torch

from . import launch
from .kernels.configs import ATTENTION_MAX_HEAD_DIM

#: The values of ``impl=`` (and of the trainer's ``loss_impl`` / ``attention_impl``).
IMPLS = ("auto", "reference", "torch", "triton")
#: Floating dtypes the ops take; the Triton kernels take all but float64.
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def pick_impl(impl: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str:
    """The implementation that runs: ``impl`` itself once checked, or for ``auto`` ``triton`` on CUDA
    where the kernels apply and ``torch`` otherwise. ``head_dim``: prefix attention's head dim (None for
    the KD loss); the attention kernels take at most ``ATTENTION_MAX_HEAD_DIM``. ``impl="triton"`` where
    the kernels cannot run is a ValueError saying why (TRITON_INTERPRET=1 runs them on CPU tensors)."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    head_dim_fits = head_dim is None or head_dim <= ATTENTION_MAX_HEAD_DIM
    if impl == "auto":
        return "triton" if device.type == "cuda" and dtype in TRITON_FLOATS and head_dim_fits else "torch"
    if impl == "triton":
        if not head_dim_fits:
            raise ValueError(f"impl='triton' supports head dims up to {ATTENTION_MAX_HEAD_DIM}, got {head_dim} "
                             "(impl='auto' or 'torch' takes larger ones)")
        if device.type != "cuda" and not launch.interpreting():
            raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
        if dtype not in TRITON_FLOATS:
            raise ValueError(f"impl='triton' supports float32, float16 and bfloat16, got {dtype}")
    return impl
