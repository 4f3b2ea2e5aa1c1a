"""Row statistics and logit gradients of the divergences, on one chunk of full-vocabulary rows.

Notation (per token row; a = student_logits / T, b = teacher_logits / T):
    lq = log_softmax(a), lp = log_softmax(b), q = exp(lq), p = exp(lp).
Every divergence is D = sum_v f(p_v, q_v). With Gp = p * df/dp and Gq = q * df/dq (elementwise),
cp = sum_v Gp and cq = sum_v Gq, the softmax Jacobian gives
    dD/da = Gq - q * cq,        dD/db = Gp - p * cp.
Per divergence (M is the mixture, lM = log M formed with logaddexp, never exp-then-log):
    forward_kl   f = p (lp - lq)           Gp = p (lp - lq + 1)        Gq = -p
    reverse_kl   f = q (lq - lp)           Gp = -q                     Gq = q (lq - lp + 1)
    jsd          M = b p + (1-b) q         Gp = b p (lp - lM)          Gq = (1-b) q (lq - lM)       D = cp + cq
    skew_fkl     M = a p + (1-a) q, w = (1-a) q / M:  f = p (lp - lM), Gp = p (lp - lM + w), Gq = -p w
    skew_rkl     M = (1-a) p + a q, w = (1-a) p / M:  f = q (lq - lM), Gp = -q w, Gq = q (lq - lM + w)
The Triton kernels (kernels/common.py) compute the same terms tile by tile.
"""

from __future__ import annotations

import torch

from .settings import KDSettings


def _log_mix(lp: torch.Tensor, lq: torch.Tensor, settings: KDSettings) -> torch.Tensor:
    lw_p, lw_q = settings.mix_log_weights
    return torch.logaddexp(lp + lw_p, lq + lw_q)


def elementwise_terms(lp: torch.Tensor, lq: torch.Tensor, settings: KDSettings):
    """(f, Gp, Gq) for every element of the [rows, V] chunk (see the module docstring)."""
    div = settings.divergence
    p, q = lp.exp(), lq.exp()
    if div == "forward_kl":
        f = p * (lp - lq)
        return f, f + p, -p
    if div == "reverse_kl":
        f = q * (lq - lp)
        return f, -q, f + q
    lm = _log_mix(lp, lq, settings)
    if div == "jsd":
        b = settings.beta
        gp, gq = b * p * (lp - lm), (1.0 - b) * q * (lq - lm)
        return gp + gq, gp, gq
    lw_p, lw_q = settings.mix_log_weights
    if div == "skew_forward_kl":
        w = torch.exp(lq + lw_q - lm)
        f = p * (lp - lm)
        return f, f + p * w, -p * w
    if div == "skew_reverse_kl":
        w = torch.exp(lp + lw_p - lm)
        f = q * (lq - lm)
        return f, -q * w, f + q * w
    raise AssertionError(div)


def row_stats(lp: torch.Tensor, lq: torch.Tensor, settings: KDSettings):
    """(D, cp, cq): the per-row divergence and the two sums the backward needs, each [rows]."""
    div = settings.divergence
    if div in ("forward_kl", "reverse_kl"):  # cp, cq follow from D: skip the [rows, V] terms
        x, lx, ly = (lp.exp(), lp, lq) if div == "forward_kl" else (lq.exp(), lq, lp)
        d = torch.sub(lx, ly).mul_(x).sum(-1)
        one = torch.ones_like(d)
        return (d, d + 1, -one) if div == "forward_kl" else (d, -one, d + 1)
    f, gp, gq = elementwise_terms(lp, lq, settings)
    return f.sum(-1), gp.sum(-1), gq.sum(-1)


def logit_grads(lp: torch.Tensor, lq: torch.Tensor, cp: torch.Tensor, cq: torch.Tensor, settings: KDSettings,
                need_a: bool = True, need_b: bool = True):
    """(dD/da or None, dD/db or None) for the [rows, V] chunk, given the row sums cp, cq of the forward."""
    div = settings.divergence
    if div in ("forward_kl", "reverse_kl"):  # dD/da = q - p, dD/db = p (lp - lq - D) and mirrored
        p, q = lp.exp(), lq.exp()
        if div == "forward_kl":
            da = q.sub_(p) if need_a else None
            db = torch.sub(lp, lq).sub_((cp - 1)[:, None]).mul_(p) if need_b else None
        else:
            db = p.sub_(q) if need_b else None
            da = torch.sub(lq, lp).sub_((cq - 1)[:, None]).mul_(q) if need_a else None
        return da, db
    _, gp, gq = elementwise_terms(lp, lq, settings)
    da = gq.sub_(lq.exp().mul_(cq[:, None])) if need_a else None
    db = gp.sub_(lp.exp().mul_(cp[:, None])) if need_b else None
    return da, db
