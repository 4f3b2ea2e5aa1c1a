"""Plain-torch reference of the distillation losses: full logits, textbook formulas.

This is the oracle of the tests (evaluated in float64) and the ``impl="reference"`` path.
Its gradients come from autograd, so they check the hand-derived gradients of the fused
implementations independently. It materializes [tokens, vocab] tensors: use it for checking,
not for training large vocabularies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .settings import KDSettings


def transform_logits(z: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """A model's final logit transform: ``softcap * tanh(scale * z / softcap)``, ``scale * z`` without a cap."""
    if scale != 1.0:
        z = z * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def divergence_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         settings: KDSettings) -> torch.Tensor:
    """Per-row divergence of ``settings.divergence`` between softmax(teacher/T) and softmax(student/T).

    student_logits, teacher_logits: [N, V]. Returns [N] in the logits' dtype.
    p = softmax(teacher / T) and q = softmax(student / T); mixtures are formed in log space.
    """
    T = settings.temperature
    log_q = torch.log_softmax(student_logits / T, dim=-1)
    log_p = torch.log_softmax(teacher_logits / T, dim=-1)
    p, q = log_p.exp(), log_q.exp()

    def kl(log_x, x, log_y):  # KL(x || y) with x = exp(log_x)
        return (x * (log_x - log_y)).sum(-1)

    def log_mix(w_p, w_q):  # log(w_p * p + w_q * q), each weight in [0, 1]
        terms = [lx + torch.log(torch.tensor(w, dtype=lx.dtype)) for lx, w in ((log_p, w_p), (log_q, w_q)) if w > 0]
        return terms[0] if len(terms) == 1 else torch.logaddexp(*terms)

    div, beta, alpha = settings.divergence, settings.beta, settings.alpha
    if div == "forward_kl":
        return kl(log_p, p, log_q)
    if div == "reverse_kl":
        return kl(log_q, q, log_p)
    if div == "jsd":
        log_m = log_mix(beta, 1.0 - beta)
        return beta * kl(log_p, p, log_m) + (1.0 - beta) * kl(log_q, q, log_m)
    if div == "skew_forward_kl":
        return kl(log_p, p, log_mix(alpha, 1.0 - alpha))
    if div == "skew_reverse_kl":
        return kl(log_q, q, log_mix(1.0 - alpha, alpha))
    raise AssertionError(div)


def kd_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      settings: KDSettings) -> torch.Tensor:
    """Reference of :func:`promptkd.kd_loss` on logits [..., V] (inputs already validated).

    Per token: soft_weight * divergence(T) + hard_weight * CE(student logits at T=1, label), on each side's
    logits after its transform (``settings.transform``); tokens whose label is ``ignore_index`` count 0.
    ``mean`` divides by the number of counted tokens.
    """
    lead = student_logits.shape[:-1]
    V = settings.vocab_size or student_logits.shape[-1]
    s = transform_logits(student_logits[..., :V].reshape(-1, V), *settings.transform("student"))
    t = transform_logits(teacher_logits[..., :V].reshape(-1, V), *settings.transform("teacher"))
    per_token = settings.soft_weight * divergence_reference(s, t, settings)
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


def fused_linear_kd_loss_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                   settings: KDSettings, student_bias=None, teacher_bias=None) -> torch.Tensor:
    """Reference of :func:`promptkd.fused_linear_kd_loss`: logits = hidden @ weight.T + bias, then kd_loss."""
    student_logits = F.linear(student_hidden, student_weight, student_bias)
    teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    V = settings.vocab_size or student_weight.shape[0]
    return kd_loss_reference(student_logits[..., :V], teacher_logits[..., :V], labels, settings)
