"""``impl="chunked"`` and ``impl="torch"``: the CPU (and fallback) paths, chunked over tokens.

Each chunk holds full-vocabulary rows of student and teacher logits, at most ``CHUNK_BYTES`` per
[rows, V] float32 tensor, so the extra memory is one bounded chunk whatever N is. Per chunk: the two
logit GEMMs (torch: MKL / oneDNN), each side's logit transform where one is set (a scale, a softcap:
in place, a capped side that needs its gradient keeping its derivative in one more chunk buffer), then
one fused elementwise pass (``promptkd.kd.rows``: native C++
or torch ops) that yields each token's loss and, where gradients are computed, the logit gradients,
which GEMMs turn into hidden, weight and bias gradients for the inputs that require them only.

``chunked`` (gradient in forward): when the loss is reduced (``mean`` / ``sum``) and an input requires
grad, the forward computes the gradients of the reduced loss while each chunk's logits are at hand
and keeps them; the backward only multiplies them by the incoming gradient. 4 logit-sized GEMMs for
student gradients (6 with teacher gradients), against 6 (8) when the logits are recomputed. The
gradient buffers exist from the forward on (they would exist in the backward anyway).

``torch`` (recompute): the forward computes losses only and keeps nothing but the inputs; the
backward recomputes each chunk's logits. Used for ``reduction="none"`` (a per-token incoming gradient
is not known in forward), for calls that need no gradient, and on request where memory is tightest
(several losses built before one backward each hold their gradients under ``chunked``).

The autograd glue (what is saved, scaling the kept gradients, the first-order rule) and the custom ops that
torch.compile sees are in ``promptkd.kd.ops``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .rows import kd_rows
from .settings import KDSettings
from .tokens import row_scale

#: Bytes of one float32 [rows, V] chunk tensor; rows = max(1, CHUNK_BYTES // (4 * V)). Two such
#: tensors (student and teacher logits) are the loss's working memory beyond the gradients:
#: ``PROMPTKD_CHUNK_MB`` sets it (smaller: less memory, more passes over the weight gradient).
CHUNK_BYTES = int(float(os.environ.get("PROMPTKD_CHUNK_MB", "64")) * 2**20)


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_logits(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, rows: slice, vocab: int,
            buffer: torch.Tensor) -> torch.Tensor:
    """Float32 (float64 for float64 inputs) logits of ``rows``: x[rows] @ weight[:V].T + bias[:V], or x[rows, :V],
    written into the leading rows of ``buffer`` (one [chunk rows, V] tensor reused by every chunk of a call:
    no allocation per chunk) and returned as a view of it, never a view of the caller's tensors."""
    out = buffer[: rows.stop - rows.start]
    if weight is None:
        return out.copy_(x[rows, :vocab])
    w, b = weight[:vocab], None if bias is None else bias[:vocab]
    if x.dtype != out.dtype:
        return out.copy_(F.linear(x[rows], w, b))
    if b is None:
        return torch.mm(x[rows], w.t(), out=out)
    return torch.addmm(b, x[rows], w.t(), out=out)


def _buffers(xs, n: int, vocab: int):
    """The two chunk buffers of a call (student, teacher logits)."""
    rows = min(n, _chunk_rows(vocab))
    dtype = compute_dtype(xs.dtype)
    return (torch.empty(rows, vocab, dtype=dtype, device=xs.device),
            torch.empty(rows, vocab, dtype=dtype, device=xs.device))


def side_grads(dz: torch.Tensor, x, weight, bias, rows: slice, needs, grads):
    """Adds the gradients of one chunk's logit gradient dz [rows, V] to ``grads`` = [dx, dweight, dbias]."""
    vocab = dz.shape[1]
    if weight is None:  # logits input
        if needs[0]:
            grads[0][rows, :vocab] = dz
        return
    dz_in = dz.to(x.dtype)
    if needs[0]:
        torch.mm(dz_in, weight[:vocab], out=grads[0][rows])
    if needs[1]:
        grads[1][:vocab].addmm_(dz_in.t().to(grads[1].dtype), x[rows].to(grads[1].dtype))
    if bias is not None and needs[2]:
        grads[2][:vocab] += dz.sum(0).to(grads[2].dtype)


def alloc_grads(x, weight, bias, needs):
    """Gradient buffers for the inputs that need them; weight/bias accumulate in >= float32."""
    acc = compute_dtype(x.dtype)
    out = [None, None, None]
    if needs[0]:
        out[0] = torch.zeros_like(x) if weight is None else torch.empty_like(x)
    if weight is not None and needs[1]:
        out[1] = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    if bias is not None and needs[2]:
        out[2] = torch.zeros(bias.shape, dtype=acc, device=bias.device)
    return out


def _targets(labels, settings: KDSettings):
    """Labels clamped into [0, V) (bad ones are made NaN by the row scale / finish_forward), or None."""
    return labels.clamp(0, settings.vocab_size - 1) if settings.has_hard else None


def _chunks(n: int, vocab: int):
    step = _chunk_rows(vocab)
    for r0 in range(0, n, step):
        yield slice(r0, min(n, r0 + step))


def derivative_buffer(buffer: torch.Tensor, transform: tuple[float, float | None], wanted: bool):
    """Where :func:`transform_` writes a capped side's derivative: a tensor like the chunk ``buffer`` when
    ``wanted`` (that side's gradient is computed) and the side has a softcap, else None (none is needed)."""
    return torch.empty_like(buffer) if wanted and transform[1] is not None else None


def transform_(z: torch.Tensor, scale: float, softcap: float | None, derivative: torch.Tensor | None):
    """In place on a chunk's logits z [rows, V]: z <- softcap * tanh(scale * z / softcap) (scale * z without a
    cap), the model's own final logit transform. Returns what :func:`chain_` multiplies the gradient with
    respect to the transformed logits by: scale * (1 - tanh^2) written into ``derivative`` (a buffer from
    :func:`derivative_buffer`; its leading rows) for a capped side, else the float ``scale``."""
    if scale != 1.0:
        z.mul_(scale)
    if softcap is None:
        return scale
    z.div_(softcap).tanh_()
    out = None
    if derivative is not None:
        out = derivative[: z.shape[0]].copy_(z)
        out.mul_(z).neg_().add_(1.0)
        if scale != 1.0:
            out.mul_(scale)
    z.mul_(softcap)
    return out


def chain_(dz: torch.Tensor, factor) -> torch.Tensor:
    """dz *= d(transformed logits)/d(logits) (``factor`` from :func:`transform_`), in place; returns dz."""
    if isinstance(factor, torch.Tensor):
        return dz.mul_(factor)
    return dz if factor is None or factor == 1.0 else dz.mul_(factor)


def _run_chunks(xs, ws, bs, xt, wt, bt, targets, scale, settings: KDSettings, need, gs, gt, per_token=None):
    """Every chunk: both sides' logits and their transforms (``settings.transform``), the elementwise pass
    (``kd_rows``) with ``scale`` (None: losses only), then the logit gradients (through the transforms) into
    ``gs`` / ``gt`` for the inputs in ``need``; row losses into ``per_token``."""
    n, vocab = xs.shape[0], settings.vocab_size
    need_s, need_t = any(need[0:3]), any(need[3:6])
    buf_s, buf_t = _buffers(xs, n, vocab)
    form_s, form_t = settings.transform("student"), settings.transform("teacher")
    der_s = derivative_buffer(buf_s, form_s, need_s and scale is not None)
    der_t = derivative_buffer(buf_t, form_t, need_t and scale is not None)
    for rows in _chunks(n, vocab):
        s, t = chunk_logits(xs, ws, bs, rows, vocab, buf_s), chunk_logits(xt, wt, bt, rows, vocab, buf_t)
        ks, kt = transform_(s, *form_s, der_s), transform_(t, *form_t, der_t)
        loss, ds, dt = kd_rows(s, t, None if targets is None else targets[rows],
                               None if scale is None else scale[rows], settings, need_s, need_t)
        if per_token is not None:
            per_token[rows] = loss
        if ds is not None:
            side_grads(chain_(ds, ks), xs, ws, bs, rows, need[0:3], gs)
        if dt is not None:
            side_grads(chain_(dt, kt), xt, wt, bt, rows, need[3:6], gt)


def torch_forward(xs, ws, bs, xt, wt, bt, labels, settings: KDSettings, grads) -> tuple[torch.Tensor, list, list]:
    """The forward of ``chunked`` / ``torch`` on flattened inputs (x [N, D] with its weight [V', D] and bias, or
    logits [N, V'] when the weight is None; labels int64 [N] or None; ``settings.vocab_size`` resolved).

    ``grads``: which of the six inputs (xs, ws, bs, xt, wt, bt) get the gradient of the reduced loss computed
    here (the chunked strategy: d(loss)/d(per-token loss) is known in forward), none for recompute. Returns
    (per-token losses [N] in float32, float64 for float64 inputs, before the label rules of
    ``promptkd.kd.tokens``; [dxs, dws, dbs]; [dxt, dwt, dbt]), None where not computed; hidden and logit
    gradients in their input's dtype, weight and bias gradients in the compute dtype.
    """
    n = xs.shape[0]
    dtype = compute_dtype(xs.dtype)
    per_token = torch.empty(n, dtype=dtype, device=xs.device)
    scale, gs, gt = None, [None] * 3, [None] * 3
    if any(grads):
        scale = row_scale(torch.ones((), dtype=dtype, device=xs.device), labels, settings, n, dtype)
        gs, gt = alloc_grads(xs, ws, bs, grads[0:3]), alloc_grads(xt, wt, bt, grads[3:6])
    _run_chunks(xs, ws, bs, xt, wt, bt, _targets(labels, settings), scale, settings, grads, gs, gt, per_token)
    return per_token, gs, gt


def torch_backward(grad_out, xs, ws, bs, xt, wt, bt, labels, settings: KDSettings, need) -> list:
    """Recompute: the gradients of ``grad_out`` (a scalar, or [N] for ``reduction="none"``) for the inputs
    flagged in ``need``, each in its input's dtype; None for the others."""
    gs, gt = alloc_grads(xs, ws, bs, need[0:3]), alloc_grads(xt, wt, bt, need[3:6])
    if any(need):
        scale = row_scale(grad_out, labels, settings, xs.shape[0], compute_dtype(xs.dtype))
        _run_chunks(xs, ws, bs, xt, wt, bt, _targets(labels, settings), scale, settings, need, gs, gt)
    return [None if g is None else g.to(ref.dtype) for g, ref in zip((*gs, *gt), (xs, ws, bs, xt, wt, bt), strict=True)]
