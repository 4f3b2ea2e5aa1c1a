"""The fused elementwise pass of the chunked KD loss, on one chunk of full-vocabulary logit rows.

:func:`kd_rows` takes the student and teacher logits of a chunk of tokens ([rows, V] float32, or
float64 for float64 inputs; fresh tensors the pass may overwrite) and returns each row's loss
``soft_weight * D(p, q) + hard_weight * CE(student logits, target)``. Given a per-row ``scale``, it
also returns ``scale * d(loss)/d(logits)`` for the sides asked for, computed while the logits are at
hand (the chunked strategy: no recomputation in backward). Formulas: ``promptkd.kd.math``.

Backends (``PROMPTKD_CPU_KERNELS``, default ``auto``, chooses among the first three for CPU chunks):
    native  C++ (``kernels/cpu/kd_rows.cpp``, OpenMP, vectorised): one cache-resident pass per row,
            the gradients written over the logits. CPU float32 only.
    torch   torch ops on the chunk (a handful of [rows, V] temporaries); any device and dtype.
    auto    CPU: native where it applies and is built, torch otherwise; when the library is missing,
            one warning says why (``promptkd info`` says it too). CUDA: triton for float32 chunks
            where Triton imports, torch otherwise (float64 chunks always run on torch ops).
    triton  a Triton kernel (``kernels/kd_rows.py``): one program per row, two or three sweeps over
            it, the gradients written over the logits. CUDA float32 chunks; what ``auto`` picks there.
            Only as the ``backend`` argument (not a ``PROMPTKD_CPU_KERNELS`` value), where it may also
            run CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from .. import launch
from . import native
from .math import logit_grads, row_stats
from .settings import DIVERGENCE_CODES, KDSettings

#: The values of ``PROMPTKD_CPU_KERNELS``.
BACKENDS = ("auto", "native", "torch")
#: The values of :func:`kd_rows`'s ``backend`` argument.
ROW_BACKENDS = (*BACKENDS, "triton")
_warned = False


def configured_backend() -> str:
    """``PROMPTKD_CPU_KERNELS``, checked."""
    value = os.environ.get("PROMPTKD_CPU_KERNELS", "auto")
    if value not in BACKENDS:
        raise ValueError(f"PROMPTKD_CPU_KERNELS must be one of {BACKENDS}, got {value!r}")
    return value


@functools.cache
def _triton_kernels():
    """(kernels.kd_rows module or None, why not)."""
    try:
        from ..kernels import kd_rows as kernels
    except ImportError as e:  # Triton missing or broken
        return None, f"Triton does not import: {e}"
    return kernels, None


def pick_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The backend that runs the pass on a chunk like ``x``: ``native``, ``torch`` or ``triton``.

    ``backend`` None reads ``PROMPTKD_CPU_KERNELS``. ``native`` or ``triton`` asked for where it cannot
    run (a missing library or Triton, the wrong device or dtype) is a RuntimeError / ValueError saying why."""
    backend = configured_backend() if backend is None else backend
    if backend not in ROW_BACKENDS:
        raise ValueError(f"backend must be one of {ROW_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if x.dtype != torch.float32 or not (x.is_cuda or (x.device.type == "cpu" and launch.interpreting())):
            raise ValueError(f"the triton rows backend takes float32 CUDA chunks (CPU ones only under "
                             f"TRITON_INTERPRET=1), got {x.dtype} on {x.device}")
        if _triton_kernels()[0] is None:
            raise RuntimeError(f"the triton rows backend is unavailable: {_triton_kernels()[1]}")
        return "triton"
    if x.is_cuda and backend == "auto":
        return "triton" if x.dtype == torch.float32 and _triton_kernels()[0] is not None else "torch"
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
    picked = pick_backend(s, backend)
    if picked == "native":
        loss = native.kd_rows(s, t, targets, scale, settings, need_s, need_t)
        grad = scale is not None
        return loss, (s if grad and need_s else None), (t if grad and need_t else None)
    if picked == "triton":
        return triton_rows(s, t, targets, scale, settings, need_s, need_t)
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


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def triton_rows(s, t, targets, scale, settings: KDSettings, need_s: bool, need_t: bool):
    """The ``triton`` backend of :func:`kd_rows`: ``kernels/kd_rows.kd_rows_kernel`` over float32 rows (CUDA,
    or CPU under the interpreter), the gradients written over ``s`` / ``t``. No host synchronisation."""
    kernels = _triton_kernels()[0]
    if kernels is None:
        raise RuntimeError(f"the triton rows backend is unavailable: {_triton_kernels()[1]}")
    grad = scale is not None
    need_s, need_t = grad and need_s, grad and need_t
    s, t = _unit_columns(s), _unit_columns(t)
    rows, vocab = s.shape
    loss = launch.buffer((rows,), torch.float32, s.device)
    if rows == 0:
        return loss, (s if need_s else None), (t if need_t else None)
    cfg = kernels.pick(vocab)
    lw_p, lw_q = settings.mix_log_weights
    hard = settings.has_hard
    options = {} if launch.interpreting() else {"enable_fp_fusion": False}  # rounds a = s / T as torch does
    kernels.kd_rows_kernel[(rows,)](
        s, t, targets.contiguous() if hard else s, scale.to(torch.float32).contiguous() if grad else s, loss,
        vocab, s.stride(0), t.stride(0), 1.0 / settings.temperature, lw_p, lw_q, settings.soft_weight,
        settings.hard_weight, DIVERGENCE=DIVERGENCE_CODES[settings.divergence], HAS_HARD=hard, NEED_S=need_s,
        NEED_T=need_t, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **options)
    return loss, (s if need_s else None), (t if need_t else None)
