"""Thin ``nn.Module`` wrappers that hold the keyword settings of the loss functions."""

from __future__ import annotations

import torch
from torch import nn

from .api import fused_linear_kd_loss, kd_loss
from .settings import KDSettings


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`promptkd.fused_linear_kd_loss`.

    ``FusedLinearKDLoss(divergence="jsd", beta=0.5)(hs, ws, ht, wt, labels, student_bias=..., teacher_bias=...)``.
    The keyword settings are validated at construction.
    """

    def __init__(self, *, divergence: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1,
                 temperature: float = 1.0, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", vocab_size: int | None = None,
                 impl: str = "auto"):
        super().__init__()
        self.settings = KDSettings(divergence, beta, alpha, temperature, soft_weight, hard_weight, ignore_index,
                                   reduction, vocab_size)
        self.impl = impl

    def _kwargs(self) -> dict:
        s = self.settings
        return dict(divergence=s.divergence, beta=s.beta, alpha=s.alpha, temperature=s.temperature,
                    soft_weight=s.soft_weight, hard_weight=s.hard_weight, ignore_index=s.ignore_index,
                    reduction=s.reduction, vocab_size=s.vocab_size, impl=self.impl)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, labels: torch.Tensor | None = None, *,
                student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                    student_bias=student_bias, teacher_bias=teacher_bias, **self._kwargs())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._kwargs().items())


class KDLoss(FusedLinearKDLoss):
    """Module form of :func:`promptkd.kd_loss`.

    ``KDLoss(divergence="reverse_kl")(student_logits, teacher_logits, labels)``.
    """

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, labels, **self._kwargs())
