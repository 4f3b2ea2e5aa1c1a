"""Thin ``nn.Module`` wrappers that hold the keyword settings of the loss functions, validated once."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .api import fused_linear_kd_loss_from_settings, kd_loss_from_settings
from .settings import KDSettings


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`promptkd.fused_linear_kd_loss`.

    ``FusedLinearKDLoss(divergence="jsd", beta=0.5)(hs, ws, ht, wt, labels, student_bias=..., teacher_bias=...)``.
    The keyword settings are validated at construction (``self.settings``, a ``KDSettings``), ``impl`` at each call.
    """

    def __init__(self, *,
                 divergence: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
                 soft_weight: float = 1.0, hard_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 vocab_size: int | None = None, student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                 student_softcap: float | None = None, teacher_softcap: float | None = None, impl: str = "auto"):
        super().__init__()
        self.settings = KDSettings(divergence=divergence, beta=beta, alpha=alpha, temperature=temperature,
                                   soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index,
                                   reduction=reduction, vocab_size=vocab_size, student_logit_scale=student_logit_scale,
                                   teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                                   teacher_softcap=teacher_softcap)
        self.impl = impl

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, labels: torch.Tensor | None = None, *,
                student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
        return fused_linear_kd_loss_from_settings(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                  labels, student_bias, teacher_bias, settings=self.settings,
                                                  impl=self.impl)

    def extra_repr(self) -> str:
        kwargs = {**dataclasses.asdict(self.settings), "impl": self.impl}
        return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


class KDLoss(FusedLinearKDLoss):
    """Module form of :func:`promptkd.kd_loss`.

    ``KDLoss(divergence="reverse_kl")(student_logits, teacher_logits, labels)``.
    """

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return kd_loss_from_settings(student_logits, teacher_logits, labels, settings=self.settings, impl=self.impl)
