"""The chunked paths of offline distillation (CPU, and CUDA through torch's GEMMs): chunks of token rows.

Each chunk holds full-vocabulary rows of logits in one [rows, V] float32 buffer of ``LOSS_CHUNKS`` (the loss)
or ``TARGET_CHUNKS`` (the targets) times ``promptkd.kd.torch_impl.CHUNK_BYTES`` (``PROMPTKD_CHUNK_MB``), so the
extra memory is one bounded chunk whatever N is; the row passes are ``promptkd.sparse.rows``.

Targets: per chunk one GEMM (the teacher's head) and the top-k or sampling pass; their one buffer is
``TARGET_CHUNKS`` times ``CHUNK_BYTES`` (they keep no gradients).

The loss, ``chunked`` (gradient in forward, when the loss is reduced and an input requires grad): per chunk
the logit GEMM, the row pass that yields the losses and the logit gradient, and the GEMMs that turn it into
the hidden, weight and bias gradients the inputs need: three logit-sized GEMMs for hidden and weight, as
cross-entropy. ``torch`` (recompute): the forward computes losses only; the backward recomputes each chunk's
logits (``reduction="none"``, calls without a gradient, or on request).
"""

from __future__ import annotations

import math

import torch

from .. import launch
from ..kd import torch_impl as kd_torch
from ..kd.tokens import row_scale
from .rows import sample_rows, sparse_rows, topk_rows
from .settings import SparseKDSettings

#: How many KD chunks (``CHUNK_BYTES`` each) one buffer of the targets and of the loss holds. The GEMMs run faster
#: on taller chunks (the teacher's head, N=4096, D=576, V=49152 on 2 cores: 2.12 s in chunks of 341 rows, 1.85 s
#: in chunks of 1365); the targets keep no gradient buffers, and the loss has one logits buffer where the KD loss
#: has two (the same working memory at LOSS_CHUNKS = 2).
TARGET_CHUNKS = 4
LOSS_CHUNKS = 2


def chunk_rows(vocab: int, chunks: int) -> int:
    """Rows of a buffer of ``chunks`` KD chunks for a vocabulary of ``vocab`` (at least 1)."""
    return max(1, chunks * kd_torch.CHUNK_BYTES // (4 * vocab))


def _chunks(n: int, vocab: int, chunks: int):
    step = chunk_rows(vocab, chunks)
    for r0 in range(0, n, step):
        yield slice(r0, min(n, r0 + step))


def _buffer(x: torch.Tensor, n: int, vocab: int, chunks: int) -> torch.Tensor:
    return torch.empty(min(n, chunk_rows(vocab, chunks)), vocab, dtype=kd_torch.compute_dtype(x.dtype), device=x.device)


def targets_forward(x, w, b, k: int, temperature: float, vocab: int, samples: int, keys, counters,
                    logit_scale: float = 1.0, softcap: float | None = None):
    """Teacher targets of flattened hidden states x [N, D] (logits x [N, V'] when ``w`` is None): (ids [N, k]
    int64, log-probabilities [N, k] float32, float64 for float64 inputs); top-k when ``samples`` is 0, else
    ``samples`` draws per row with Philox keys / counters [N]. Each chunk's logits are transformed first
    (``logit_scale``, ``softcap``: ``promptkd.kd.torch_impl.transform_``), as the teacher's own are."""
    n = x.shape[0]
    lp_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    ids = torch.empty(n, k, dtype=torch.int64, device=x.device)
    lp = launch.buffer((n, k), lp_dtype, x.device)
    buffer = _buffer(x, n, vocab, TARGET_CHUNKS)
    for rows in _chunks(n, vocab, TARGET_CHUNKS):
        logits = kd_torch.chunk_logits(x, w, b, rows, vocab, buffer)
        kd_torch.transform_(logits, logit_scale, softcap, None)
        if samples:
            ids[rows], lp[rows] = sample_rows(logits, samples, k, temperature, keys[rows], counters[rows])
        else:
            ids[rows], lp[rows] = topk_rows(logits, k, temperature)
    return ids, lp


def _targets(labels, settings: SparseKDSettings):
    return labels.clamp(0, settings.vocab_size - 1) if settings.has_hard else None


def _run_chunks(x, w, b, ids, lp, targets, scale, settings: SparseKDSettings, need, grads, per_token=None):
    n, vocab = x.shape[0], settings.vocab_size
    buffer = _buffer(x, n, vocab, LOSS_CHUNKS)
    derivative = kd_torch.derivative_buffer(buffer, settings.transform, scale is not None and any(need))
    for rows in _chunks(n, vocab, LOSS_CHUNKS):
        logits = kd_torch.chunk_logits(x, w, b, rows, vocab, buffer)
        factor = kd_torch.transform_(logits, *settings.transform, derivative)
        loss, grad = sparse_rows(logits, ids[rows], lp[rows], None if targets is None else targets[rows],
                                 None if scale is None else scale[rows], settings)
        if per_token is not None:
            per_token[rows] = loss
        if grad is not None:
            kd_torch.side_grads(kd_torch.chain_(grad, factor), x, w, b, rows, need, grads)


def _nan_where(bad: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if bad is None else torch.where(bad, torch.full_like(x, math.nan), x)


def sparse_forward(x, w, b, ids, lp, labels, bad, settings: SparseKDSettings, grads) -> tuple[torch.Tensor, list]:
    """The forward of ``chunked`` / ``torch`` on flattened inputs: x [N, D] with its weight [V', D] and bias, or
    logits [N, V'] when the weight is None; ids [N, k] int64; lp [N, k]; labels int64 [N] or None; ``bad``
    [N] bool or None: rows whose targets are unusable (``promptkd.sparse.checks``), NaN loss and gradient;
    ``settings.vocab_size`` resolved. ``grads``: which of (x, w, b) get the gradient of the reduced loss
    computed here. Returns (per-token losses [N], float32 or float64, before the label rules of
    ``promptkd.kd.tokens``; [dx, dw, db], None where not computed)."""
    n = x.shape[0]
    dtype = kd_torch.compute_dtype(x.dtype)
    per_token = launch.buffer((n,), dtype, x.device)
    scale, out = None, [None] * 3
    if any(grads):
        scale = _nan_where(bad, row_scale(torch.ones((), dtype=dtype, device=x.device), labels, settings, n, dtype))
        out = kd_torch.alloc_grads(x, w, b, grads)
    _run_chunks(x, w, b, ids, lp, _targets(labels, settings), scale, settings, grads, out, per_token)
    return _nan_where(bad, per_token), out


def sparse_backward(grad_out, x, w, b, ids, lp, labels, bad, settings: SparseKDSettings, need) -> list:
    """Recompute: the gradients of ``grad_out`` (a scalar, or [N] for ``reduction="none"``) for the inputs
    flagged in ``need``, each in its input's dtype; None for the others."""
    out = kd_torch.alloc_grads(x, w, b, need)
    if any(need):
        scale = _nan_where(bad, row_scale(grad_out, labels, settings, x.shape[0], kd_torch.compute_dtype(x.dtype)))
        _run_chunks(x, w, b, ids, lp, _targets(labels, settings), scale, settings, need, out)
    return [None if g is None else g.to(ref.dtype) for g, ref in zip(out, (x, w, b), strict=True)]
