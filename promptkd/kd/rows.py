"""The fused elementwise pass of the chunked KD loss, on one chunk of full-vocabulary logit rows.

:func:`kd_rows` takes the student and teacher logits of a chunk of tokens ([rows, V] float32, or
float64 for float64 inputs; fresh tensors the pass may overwrite) and returns each row's loss
``soft_weight * D(p, q) + hard_weight * CE(student logits, target)``. Given a per-row ``scale``, it
also returns ``scale * d(loss)/d(logits)`` for the sides asked for, computed while the logits are at
hand (the chunked strategy: no recomputation in backward). Formulas: ``promptkd.kd.math``.

Backends (``PROMPTKD_CPU_KERNELS``, default ``auto``):
    native  C++ (``kernels/cpu/kd_rows.cpp``, OpenMP, vectorised): one cache-resident pass per row,
            the gradients written over the logits. CPU float32 only.
    torch   torch ops on the chunk (a handful of [rows, V] temporaries); any device and dtype.
    auto    native where it applies and is built, torch otherwise; when the library is missing, one
            warning says why (``promptkd info`` says it too).
"""

from __future__ import annotations

import os
import warnings

import torch

from . import native
from .math import logit_grads, row_stats
from .settings import KDSettings

BACKENDS = ("auto", "native", "torch")
_warned = False


def configured_backend() -> str:
    """``PROMPTKD_CPU_KERNELS``, checked."""
    value = os.environ.get("PROMPTKD_CPU_KERNELS", "auto")
    if value not in BACKENDS:
        raise ValueError(f"PROMPTKD_CPU_KERNELS must be one of {BACKENDS}, got {value!r}")
    return value


def pick_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The backend that runs the pass on a chunk like ``x``: ``native`` or ``torch``.

    ``backend`` None reads ``PROMPTKD_CPU_KERNELS``. ``native`` asked for where it cannot run (a missing
    library, a CUDA tensor, not float32) is a RuntimeError / ValueError saying why."""
    backend = configured_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    fits = x.device.type == "cpu" and x.dtype == torch.float32
    if backend == "native":
        if not fits:
            raise ValueError(f"the native CPU kernels take float32 CPU chunks, got {x.dtype} on {x.device}")
        if native.library() is None:
            raise RuntimeError(f"PROMPTKD_CPU_KERNELS=native, but {native.unavailable_reason()}")
        return "native"
    if not fits:
        return "torch"
    if native.library() is None:
        global _warned
        if not _warned:
            _warned = True
            warnings.warn(f"promptkd: the native CPU kernels are unavailable ({native.unavailable_reason()}); "
                          "the chunked KD loss uses torch ops instead (slower). Set PROMPTKD_CPU_KERNELS=torch "
                          "to choose that without this warning.", RuntimeWarning, stacklevel=3)
        return "torch"
    return "native"


def kd_rows(s: torch.Tensor, t: torch.Tensor, targets: torch.Tensor | None, scale: torch.Tensor | None,
            settings: KDSettings, need_s: bool, need_t: bool, backend: str | None = None):
    """(loss [rows], ds or None, dt or None) for one chunk.

    ``s``, ``t``: [rows, V] logits of the student and teacher (V = ``settings.vocab_size``), float32 or
    float64, unit column stride, owned by the caller and free to be overwritten. ``targets``: [rows]
    int64 labels clamped to [0, V) (used when ``settings.has_hard``). ``scale``: [rows] or None; with
    a scale, ds = scale * d(loss)/ds when ``need_s`` and dt = scale * d(loss)/dt when ``need_t``
    (possibly in the storage of s and t). Without one, only the loss is computed.
    """
    if pick_backend(s, backend) == "native":
        loss = native.kd_rows(s, t, targets, scale, settings, need_s, need_t)
        grad = scale is not None
        return loss, (s if grad and need_s else None), (t if grad and need_t else None)
    return torch_rows(s, t, targets, scale, settings, need_s, need_t)


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """In place: log_softmax of the rows of x, as (x - max) - log-sum (a single stored log-sum-exp would
    round the log-sum away next to a large maximum)."""
    x.sub_(x.amax(-1, keepdim=True))
    return x.sub_(x.exp().sum(-1, keepdim=True).log_())


def torch_rows(s, t, targets, scale, settings: KDSettings, need_s: bool, need_t: bool):
    """The ``torch`` backend of :func:`kd_rows`."""
    inv_t = 1.0 / settings.temperature
    grad = scale is not None
    need_s, need_t = grad and need_s, grad and need_t
    hard = settings.has_hard
    lq = _log_softmax_(s * inv_t if hard else s.mul_(inv_t))
    lp = _log_softmax_(t.mul_(inv_t))
    div, cp, cq = row_stats(lp, lq, settings)
    loss = settings.soft_weight * div
    log_probs = None
    if hard:
        log_probs = _log_softmax_(s) if inv_t != 1.0 else lq
        loss = loss - settings.hard_weight * log_probs.gather(1, targets[:, None])[:, 0]
    ds = dt = None
    if need_s or need_t:
        da, db = logit_grads(lp, lq, cp, cq, settings, need_s, need_t)
        sc = scale.to(s.dtype)[:, None]
        if need_s:
            ds = da.mul_(settings.soft_weight * inv_t)
            if hard:
                ds.add_(log_probs.exp(), alpha=settings.hard_weight)
                ds.scatter_add_(1, targets[:, None], torch.full_like(ds[:, :1], -settings.hard_weight))
            ds.mul_(sc)
        if need_t:
            dt = db.mul_(sc * (settings.soft_weight * inv_t))
    return loss, ds, dt
