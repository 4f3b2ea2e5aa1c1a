"""Thin ``nn.Module`` wrappers that hold the keyword settings of the sparse-target losses, validated once."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .api import fused_linear_sparse_kd_loss_from_settings, sparse_kd_loss_from_settings
from .settings import SparseKDSettings


class FusedLinearSparseKDLoss(nn.Module):
    """Module form of :func:`promptkd.fused_linear_sparse_kd_loss`.

    ``FusedLinearSparseKDLoss(tail=False)(hidden, weight, teacher_ids, teacher_logprobs, labels, student_bias=...)``.
    The keyword settings are validated at construction (``self.settings``), ``impl`` at each call.
    """

    def __init__(self, *, tail: bool = True, temperature: float = 1.0, soft_weight: float = 1.0,
                 hard_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 vocab_size: int | None = None, student_logit_scale: float = 1.0, student_softcap: float | None = None,
                 impl: str = "auto"):
        super().__init__()
        self.settings = SparseKDSettings(tail=tail, temperature=temperature, soft_weight=soft_weight,
                                         hard_weight=hard_weight, ignore_index=ignore_index, reduction=reduction,
                                         vocab_size=vocab_size, student_logit_scale=student_logit_scale,
                                         student_softcap=student_softcap)
        self.impl = impl

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_ids: torch.Tensor,
                teacher_logprobs: torch.Tensor, labels: torch.Tensor | None = None, *,
                student_bias: torch.Tensor | None = None) -> torch.Tensor:
        return fused_linear_sparse_kd_loss_from_settings(student_hidden, student_weight, teacher_ids,
                                                         teacher_logprobs, labels, student_bias,
                                                         settings=self.settings, impl=self.impl)

    def extra_repr(self) -> str:
        kwargs = {**dataclasses.asdict(self.settings), "impl": self.impl}
        return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


class SparseKDLoss(FusedLinearSparseKDLoss):
    """Module form of :func:`promptkd.sparse_kd_loss`: ``SparseKDLoss()(student_logits, ids, logprobs, labels)``."""

    def forward(self, student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return sparse_kd_loss_from_settings(student_logits, teacher_ids, teacher_logprobs, labels,
                                            settings=self.settings, impl=self.impl)
