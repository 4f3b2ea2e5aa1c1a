"""``sampled_reverse_kl_loss``: the on-policy reverse KL from the tokens the student sampled and the teacher's
log-probability of each (what a served teacher returns for a sequence: ``prompt_logprobs=0`` is enough).

The estimator. At a position with context c the student q sampled y ~ q(. | c); the teacher p scored it. Then

    r(y) = log q(y | c) - log p(y | c)                  E_{y~q}[r(y)] = KL(q || p)  (at c)

and, since E_{y~q}[grad log q(y)] = 0,

    grad KL(q || p) = E_{y~q}[ grad (q log q - q log p) summed ] = E_{y~q}[ r(y) grad log q(y) ]   (score function)

so the per-token loss ``r + sg(r) * log q(y) - sg(r * log q(y))`` has the value r (an unbiased estimate of the
KL at that position: what is logged) and the gradient r grad log q(y) (an unbiased estimate of the KL's
gradient). This is the token-level estimator of on-policy distillation (GKD with lambda = 1, the student's
samples scored by the teacher): like ``rkl``'s exact reverse KL at the sampled positions it treats each
position's context as given (later positions' dependence on earlier samples is not differentiated). It needs
the samples to be the student's own distribution: sampling temperature 1, no top-k / top-p truncation, and
the weights that sampled them. Its variance is larger than the exact reverse KL's (which needs the teacher's
full distribution: a local teacher, or a served one's hidden states); it needs one teacher number per token.

log q(y | c) comes from the student's hidden states and output weight through the fused sparse loss (its
cross-entropy term: no [tokens, vocab] logits), with the student's logit transform.
"""

from __future__ import annotations

import torch

from ..kd.api import check_tensor
from ..kd.settings import REDUCTIONS
from .api import fused_linear_sparse_kd_loss


def sampled_reverse_kl_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, sampled_ids: torch.Tensor,
                            teacher_logprobs: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                            student_bias: torch.Tensor | None = None, vocab_size: int | None = None,
                            student_logit_scale: float = 1.0, student_softcap: float | None = None,
                            impl: str = "auto") -> torch.Tensor:
    """On-policy reverse KL(q || p) estimated from sampled tokens (see the module docstring for the estimator).

    Shapes: student_hidden [..., D], student_weight [V, D], student_bias [V]; ``sampled_ids`` [...] (the token
    the student sampled at each position, the next token of its own sequence; ``ignore_index`` where nothing
    counts) and ``teacher_logprobs`` [...] (the teacher's log-probability of that token; ignored where the id
    is ``ignore_index``). The value per token is log q(y) - log p(y); ``reduction``: ``mean`` over counted
    tokens (0 when none counts), ``sum``, or ``none`` (0 at ignored positions). The gradient goes to the
    student's hidden states, weight and bias; none to ``teacher_logprobs`` (it must not require grad).
    ``vocab_size``, ``student_logit_scale`` / ``student_softcap`` and ``impl`` are
    :func:`promptkd.fused_linear_sparse_kd_loss`'s."""
    check_tensor("sampled_ids", sampled_ids)
    check_tensor("teacher_logprobs", teacher_logprobs)
    if sampled_ids.dtype.is_floating_point or sampled_ids.dtype.is_complex or sampled_ids.dtype == torch.bool:
        raise TypeError(f"sampled_ids must be an integer tensor, got {sampled_ids.dtype}")
    if not teacher_logprobs.dtype.is_floating_point:
        raise TypeError(f"teacher_logprobs must be a floating tensor (log-probabilities), got {teacher_logprobs.dtype}")
    if teacher_logprobs.requires_grad:
        raise ValueError("teacher_logprobs requires grad, but the sampled reverse KL gives no gradient to the "
                         "teacher; pass teacher_logprobs.detach()")
    if not isinstance(student_hidden, torch.Tensor) or student_hidden.shape[:-1] != sampled_ids.shape:
        shape = tuple(student_hidden.shape) if isinstance(student_hidden, torch.Tensor) else None
        raise ValueError(f"sampled_ids must have student_hidden's leading shape, got {tuple(sampled_ids.shape)} "
                         f"for student_hidden {shape}")
    if teacher_logprobs.shape != sampled_ids.shape:
        raise ValueError(f"teacher_logprobs must have sampled_ids' shape {tuple(sampled_ids.shape)}, got "
                         f"{tuple(teacher_logprobs.shape)}")
    if teacher_logprobs.device != sampled_ids.device:
        raise ValueError(f"teacher_logprobs is on {teacher_logprobs.device}, sampled_ids on {sampled_ids.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    counted = sampled_ids != ignore_index
    # The student's cross-entropy on its own tokens: one target per token carrying all the mass (logprob 0), with
    # no soft term, so the sparse loss's per-token value is -log q(y).
    ids = torch.where(counted, sampled_ids, torch.full_like(sampled_ids, -1))[..., None]
    zero = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    ce = fused_linear_sparse_kd_loss(student_hidden, student_weight, ids, zero, sampled_ids, tail=True,
                                     soft_weight=0.0, hard_weight=1.0, ignore_index=ignore_index, reduction="none",
                                     student_bias=student_bias, vocab_size=vocab_size,
                                     student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                                     impl=impl)
    log_q = -ce
    teacher = torch.where(counted, teacher_logprobs.to(log_q.dtype), torch.zeros((), dtype=log_q.dtype,
                                                                                 device=log_q.device))
    r = torch.where(counted, log_q.detach() - teacher, torch.zeros((), dtype=log_q.dtype, device=log_q.device))
    surrogate = r * log_q
    per_token = r + surrogate - surrogate.detach()
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp(min=1)
