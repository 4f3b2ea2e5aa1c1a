"""Plain-torch reference of offline distillation: full logits, textbook formulas (``impl="reference"``).

The oracle of the tests (evaluated in float64). The loss's gradients come from autograd, so they check the
hand-derived gradients of the fused implementations independently. It materializes [tokens, vocab] tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kd.reference import transform_logits
from .settings import SparseKDSettings


def topk_reference(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probabilities) [N, k] of the k largest logits of each row of ``logits`` [N, V] (a stable sort:
    ties to the lower id), under log_softmax(logits / T) in the logits' dtype."""
    ids = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]
    return ids, torch.log_softmax(logits / temperature, dim=1).gather(1, ids)


def sparse_kd_loss_reference(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                             labels: torch.Tensor | None, settings: SparseKDSettings) -> torch.Tensor:
    """Reference of :func:`promptkd.sparse_kd_loss` on logits [..., V'] (inputs already validated; ids int64)."""
    lead = student_logits.shape[:-1]
    vocab = settings.vocab_size or student_logits.shape[-1]
    s = transform_logits(student_logits[..., :vocab].reshape(-1, vocab), *settings.transform)
    ids = teacher_ids.reshape(s.shape[0], -1)
    valid = ids >= 0
    at = ids.clamp(min=0)
    lq_all = torch.log_softmax(s / settings.temperature, dim=1)
    lq = lq_all.gather(1, at)
    lp = torch.where(valid, teacher_logprobs.reshape(ids.shape).to(s.dtype), -math.inf)
    p = lp.exp()
    p_sum = p.sum(1)
    if settings.tail:
        on_ids = torch.zeros_like(s, dtype=torch.bool).scatter_(1, at, valid)
        lq_rest = torch.logsumexp(lq_all.masked_fill(on_ids, -math.inf), dim=1)
        rest_empty = on_ids.all(1) | (lq_rest == -math.inf)
        p_rest = torch.where(rest_empty, 0.0, (1.0 - p_sum).clamp(min=0.0))
        safe_rest = torch.where(p_rest > 0, lq_rest, 0.0)
        kept = p > 0
        div = torch.where(kept, p * (torch.where(kept, lp, 0.0) - lq), 0.0).sum(1)
        div = div + torch.where(p_rest > 0, p_rest * (torch.where(p_rest > 0, p_rest, 1.0).log() - safe_rest), 0.0)
    else:
        has_mass = p_sum > 0
        p_hat = p / torch.where(has_mass, p_sum, 1.0)[:, None]
        kept = p_hat > 0
        log_p_hat = torch.where(kept, p_hat, 1.0).log()
        div = torch.where(kept, p_hat * (log_p_hat - lq), 0.0).sum(1)
        div = torch.where(has_mass, div, 0.0)
    per_token = settings.soft_weight * div
    if labels is None:
        counted = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        labels = labels.reshape(-1)
        counted = labels != settings.ignore_index
    if settings.has_hard:
        ce = F.cross_entropy(s, labels, ignore_index=settings.ignore_index, reduction="none")
        per_token = per_token + settings.hard_weight * ce
    per_token = torch.where(counted, per_token, torch.zeros_like(per_token))
    if settings.reduction == "none":
        return per_token.reshape(lead)
    total = per_token.sum()
    if settings.reduction == "sum":
        return total
    return total / counted.sum().clamp_min(1)


def fused_linear_sparse_kd_loss_reference(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
                                          settings: SparseKDSettings, student_bias=None) -> torch.Tensor:
    """Reference of :func:`promptkd.fused_linear_sparse_kd_loss`: logits = hidden @ weight.T + bias, then the loss."""
    return sparse_kd_loss_reference(F.linear(student_hidden, student_weight, student_bias), teacher_ids,
                                    teacher_logprobs, labels, settings)
