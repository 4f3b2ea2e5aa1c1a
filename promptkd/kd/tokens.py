"""Per-token bookkeeping shared by the ``torch`` and ``triton`` implementations: which tokens count,
which labels are bad, the reduction, and its gradient per token. No host synchronisation anywhere.

A counted token whose label lies outside [0, vocab_size) gets a NaN loss (and so
a NaN reduced loss) and NaN gradient rows: where no host check ran (``promptkd.kd.api`` checks labels
on CPU tensors only), no finite but wrong value comes out.
"""

from __future__ import annotations

import math

import torch

from .settings import KDSettings


def _bad_labels(labels: torch.Tensor | None, settings: KDSettings) -> torch.Tensor | None:
    """[N] bool: counted tokens whose label lies outside [0, vocab_size) (None without labels). Also with
    hard_weight == 0: such a label is a caller's mistake (a padding value that is not ``ignore_index``,
    another vocabulary) whatever the loss uses it for, and the CPU check refuses it too."""
    if labels is None:
        return None
    return (labels != settings.ignore_index) & ((labels < 0) | (labels >= settings.vocab_size))


def _reduce(per_token: torch.Tensor, counted: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if counted is None:  # every token counts: a Python number, no device copy
        return total / max(per_token.numel(), 1)
    return total / counted.sum().clamp_min(1).to(total.dtype)


def finish_forward(ctx, settings: KDSettings, per_token: torch.Tensor, labels: torch.Tensor | None,
                   saved: tuple) -> torch.Tensor:
    """The end of an autograd Function's forward: ``per_token`` [N] losses get NaN for a bad label and 0
    for an ignored token; ``ctx`` keeps ``settings`` and saves ``saved``; returns the reduced loss."""
    bad = _bad_labels(labels, settings)
    if bad is not None:
        per_token = torch.where(bad, torch.full_like(per_token, math.nan), per_token)
    counted = None if labels is None else labels != settings.ignore_index
    if counted is not None:
        per_token = torch.where(counted, per_token, torch.zeros_like(per_token))
    ctx.settings = settings
    ctx.save_for_backward(*saved)
    return _reduce(per_token, counted, settings.reduction)


def row_scale(grad_out: torch.Tensor, labels, settings: KDSettings, n: int, dtype: torch.dtype) -> torch.Tensor:
    """d(loss)/d(per-token loss) as an [N] device vector of ``dtype``: 0 for ignored tokens, NaN for a
    bad label."""
    counted = torch.ones(n, dtype=dtype, device=grad_out.device) if labels is None else \
        (labels != settings.ignore_index).to(dtype)
    if settings.reduction == "mean":
        counted = counted / counted.sum().clamp_min(1)
    scale = counted * grad_out.to(dtype)
    bad = _bad_labels(labels, settings)
    return scale if bad is None else torch.where(bad, torch.full_like(scale, math.nan), scale)
