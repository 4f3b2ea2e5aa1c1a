"""``impl="torch"``: the CPU and fallback path, chunked over tokens, recomputing in backward.

Each chunk holds full-vocabulary rows of student and teacher logits, at most ``CHUNK_BYTES``
per [rows, V] float32 tensor, so the extra memory is O(N) row statistics plus one bounded chunk
(a handful of [rows, V] temporaries), whatever N is. The forward keeps five float32 numbers per
token (maximum and log-sum of exp for a = s/T, b = t/T and s, and the row sums cp, cq of
``promptkd.kd.math``; log-softmax is formed as (x - max) - log-sum, since one stored log-sum-exp
would round the log-sum away next to a large maximum); the
backward recomputes each chunk's logits and turns the logit gradient straight into hidden,
weight and bias gradients with GEMMs, for the inputs that require them only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..autograd import first_order_only
from .math import logit_grads, row_stats
from .settings import KDSettings
from .tokens import finish_forward, row_scale

#: Bytes of one float32 [rows, V] chunk tensor; rows = max(1, CHUNK_BYTES // (4 * V)).
CHUNK_BYTES = 16 << 20


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def _log_softmax_(x: torch.Tensor, m_out: torch.Tensor, ll_out: torch.Tensor) -> torch.Tensor:
    """In place: log_softmax of the rows of x as (x - max) - log-sum; max and log-sum go to m_out, ll_out.

    The backward recomputes (x - max) - log-sum with the same operations, so both see the same bits.
    """
    m_out.copy_(x.amax(-1))
    x.sub_(m_out[:, None])
    ll_out.copy_(x.exp().sum(-1).log_())
    return x.sub_(ll_out[:, None])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, rows: slice, vocab: int):
    """Float32 (float64 for float64 inputs) logits of ``rows``: x[rows] @ weight[:V].T + bias[:V], or x[rows, :V].

    Always a new tensor (callers work on it in place), never a view of the caller's logits.
    """
    if weight is None:
        return x[rows, :vocab].to(_compute_dtype(x.dtype), copy=True)
    z = F.linear(x[rows], weight[:vocab], None if bias is None else bias[:vocab])
    return z.to(_compute_dtype(x.dtype))


def _side_grads(dz: torch.Tensor, x, weight, bias, rows: slice, needs, grads):
    """Adds the gradients of one chunk's logit gradient dz [rows, V] to ``grads`` = [dx, dweight, dbias]."""
    vocab = dz.shape[1]
    if weight is None:  # logits input
        if needs[0]:
            grads[0][rows, :vocab] = dz
        return
    dz_in = dz.to(x.dtype)
    if needs[0]:
        grads[0][rows] = dz_in @ weight[:vocab]
    if needs[1]:
        grads[1][:vocab].addmm_(dz_in.t().to(grads[1].dtype), x[rows].to(grads[1].dtype))
    if bias is not None and needs[2]:
        grads[2][:vocab] += dz.sum(0).to(grads[2].dtype)


def _alloc_grads(x, weight, bias, needs):
    """Gradient buffers for the inputs that need them; weight/bias accumulate in >= float32."""
    acc = _compute_dtype(x.dtype)
    out = [None, None, None]
    if needs[0]:
        out[0] = torch.zeros_like(x) if weight is None else torch.empty_like(x)
    if weight is not None and needs[1]:
        out[1] = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    if bias is not None and needs[2]:
        out[2] = torch.zeros(bias.shape, dtype=acc, device=bias.device)
    return out


class TorchKDFunction(torch.autograd.Function):
    """Chunked KD loss over (hidden, weight, bias) pairs, or over logits when the weights are None.

    Inputs are flattened: x [N, D] (or logits [N, V']), labels [N] or None; ``settings.vocab_size``
    is resolved. Returns the loss reduced per ``settings.reduction`` ([N] for ``none``), in float32
    (float64 for float64 inputs). With hard_weight > 0, a counted token whose label lies outside
    [0, vocab_size) gets a NaN loss and NaN gradient rows (``promptkd.kd.tokens``). First-order only: double
    backward raises (``promptkd.autograd.first_order_only``).
    """

    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, labels, settings: KDSettings):
        n, vocab = xs.shape[0], settings.vocab_size
        inv_t = 1.0 / settings.temperature
        stats = torch.zeros(8, n, dtype=_compute_dtype(xs.dtype), device=xs.device)
        m_a, ll_a, m_b, ll_b, m_c, ll_c, cp, cq = stats
        per_token = torch.empty(n, dtype=stats.dtype, device=xs.device)
        step = _chunk_rows(vocab)
        for r0 in range(0, n, step):
            rows = slice(r0, min(n, r0 + step))
            s = _logits(xs, ws, bs, rows, vocab)
            t = _logits(xt, wt, bt, rows, vocab)
            lq = _log_softmax_(s * inv_t if settings.has_hard else s.mul_(inv_t), m_a[rows], ll_a[rows])
            lp = _log_softmax_(t.mul_(inv_t), m_b[rows], ll_b[rows])
            div, cp[rows], cq[rows] = row_stats(lp, lq, settings)
            per_token[rows] = settings.soft_weight * div
            if settings.has_hard:
                log_probs = _log_softmax_(s, m_c[rows], ll_c[rows])
                target = labels[rows].clamp(0, vocab - 1)[:, None]
                per_token[rows] -= settings.hard_weight * log_probs.gather(1, target)[:, 0]
        return finish_forward(ctx, settings, per_token, labels, (xs, ws, bs, xt, wt, bt, labels, stats))

    @staticmethod
    @first_order_only("fused_linear_kd_loss / kd_loss (impl='torch')")
    def backward(ctx, grad_out):
        xs, ws, bs, xt, wt, bt, labels, stats = ctx.saved_tensors
        settings: KDSettings = ctx.settings
        need = ctx.needs_input_grad
        need_s, need_t = any(need[0:3]), any(need[3:6])
        gs, gt = _alloc_grads(xs, ws, bs, need[0:3]), _alloc_grads(xt, wt, bt, need[3:6])
        if need_s or need_t:
            n, vocab = xs.shape[0], settings.vocab_size
            inv_t = 1.0 / settings.temperature
            m_a, ll_a, m_b, ll_b, m_c, ll_c, cp, cq = stats
            scale = row_scale(grad_out, labels, settings, n, stats.dtype)
            step = _chunk_rows(vocab)
            for r0 in range(0, n, step):
                rows = slice(r0, min(n, r0 + step))
                s = _logits(xs, ws, bs, rows, vocab)
                t = _logits(xt, wt, bt, rows, vocab)
                # log-softmax as in the forward, in place where the logits are not needed again
                lq = (s * inv_t if settings.has_hard else s.mul_(inv_t)).sub_(m_a[rows, None]).sub_(ll_a[rows, None])
                lp = t.mul_(inv_t).sub_(m_b[rows, None]).sub_(ll_b[rows, None])
                da, db = logit_grads(lp, lq, cp[rows], cq[rows], settings, need_s, need_t)
                sc = scale[rows, None]
                if need_s:
                    ds = da.mul_(settings.soft_weight * inv_t)
                    if settings.has_hard:
                        ds.add_(s.sub_(m_c[rows, None]).sub_(ll_c[rows, None]).exp_(), alpha=settings.hard_weight)
                        ds.scatter_add_(1, labels[rows].clamp(0, vocab - 1)[:, None],
                                        torch.full_like(ds[:, :1], -settings.hard_weight))
                    _side_grads(ds.mul_(sc), xs, ws, bs, rows, need[0:3], gs)
                if need_t:
                    _side_grads(db.mul_(sc * (settings.soft_weight * inv_t)), xt, wt, bt, rows, need[3:6], gt)
        gs = [None if g is None else g.to(ref.dtype) for g, ref in zip(gs, (xs, ws, bs), strict=True)]
        gt = [None if g is None else g.to(ref.dtype) for g, ref in zip(gt, (xt, wt, bt), strict=True)]
        return (*gs, *gt, None, None)
