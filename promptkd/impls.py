"""Which implementation runs an op: the ``impl`` names and floating dtypes shared by the KD loss
(``promptkd.kd.api``) and prefix attention (``promptkd.attention.api``), and the one picker both call."""

from __future__ import annotations

import torch

from . import launch
from .kernels.configs import ATTENTION_MAX_HEAD_DIM

#: The values of the KD loss's ``impl=`` (and of the trainer's ``loss_impl``).
IMPLS = ("auto", "reference", "chunked", "torch", "triton")
#: The values of prefix attention's ``impl=`` (and of the trainer's ``attention_impl``).
ATTENTION_IMPLS = ("auto", "reference", "torch", "triton")
#: Floating dtypes the ops take; the Triton kernels take all but float64.
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def pick_impl(impl: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str:
    """The implementation that runs: ``impl`` itself once checked, or for ``auto`` ``triton`` on CUDA
    where the kernels apply, otherwise ``chunked`` (KD loss) or ``torch`` (attention). ``head_dim``:
    prefix attention's head dim (None for the KD loss); the attention kernels take at most
    ``ATTENTION_MAX_HEAD_DIM``. ``impl="triton"`` where the kernels cannot run is a ValueError saying why
    (TRITON_INTERPRET=1 runs them on CPU tensors)."""
    allowed = IMPLS if head_dim is None else ATTENTION_IMPLS
    if not isinstance(impl, str) or impl not in allowed:
        raise ValueError(f"impl must be one of {allowed}, got {impl!r}")
    head_dim_fits = head_dim is None or head_dim <= ATTENTION_MAX_HEAD_DIM
    if impl == "auto":
        if device.type == "cuda" and dtype in TRITON_FLOATS and head_dim_fits:
            return "triton"
        return "chunked" if head_dim is None else "torch"
    if impl == "triton":
        if not head_dim_fits:
            raise ValueError(f"impl='triton' supports head dims up to {ATTENTION_MAX_HEAD_DIM}, got {head_dim} "
                             "(impl='auto' or 'torch' takes larger ones)")
        if device.type != "cuda" and not launch.interpreting():
            raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
        if dtype not in TRITON_FLOATS:
            raise ValueError(f"impl='triton' supports float32, float16 and bfloat16, got {dtype}")
    return impl
