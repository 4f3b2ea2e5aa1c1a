"""The row passes of offline distillation, on one chunk of full-vocabulary logit rows.

Notation, per row: s the logits (of the teacher for the targets, of the student for the loss), a = s / T,
lq = log_softmax(a) over the whole vocabulary, q = exp(lq).

:func:`topk_rows`    the ids of the k largest logits (ties to the lower id) and their lq.
:func:`sample_rows`  S draws from q per row by inverse transform (uniforms: ``promptkd.sparse.philox``),
                     returned as the distinct ids, most drawn first (ties to the lower id), with
                     log(count / S); width ``width`` >= S, padded with id -1 and -inf.
:func:`sparse_rows`  the loss on sparse targets (ids i with teacher log-probabilities lp_i, p_i = exp(lp_i);
                     ids of -1 carry nothing) and, given a per-row scale, its gradient over s:
    tail=True   the KL between the two distributions coarsened to the k ids and one bucket for the rest:
                D = sum_i p_i (lp_i - lq_i) + p_r (log p_r - log q_r),  p_r = max(0, 1 - sum_i p_i),
                q_r = sum of q off the ids, computed from the rest's own maximum and exponential sum
                (never 1 - sum q_i); dD/da = q - p on the ids and q_v (1 - p_r / q_r) off them.
    tail=False  the targets renormalised, p^_i = p_i / sum p: D = sum_i p^_i (log p^_i - lq_i),
                dD/da = q - p^ (on the ids: q_i - p^_i). A row without target mass has no soft term.
    loss = soft_weight * D + hard_weight * CE(s at T = 1, target); d/ds = d/da / T for the soft term.

Backends (``PROMPTKD_CPU_KERNELS``, as the KD loss's row pass): ``native`` (``kernels/cpu/sparse_rows.cpp``,
float32 CPU chunks) and ``torch`` (torch ops; any device and dtype); for the loss also ``triton``
(``kernels/sparse_rows.py``: float32 CUDA chunks, or CPU ones under ``TRITON_INTERPRET=1`` as the
``backend`` argument). ``auto`` takes native on the CPU where it is built, triton for the loss's float32 CUDA
chunks, torch ops elsewhere (the targets' CUDA chunks: ``torch.topk``, ``cumsum`` and ``searchsorted``).
"""

from __future__ import annotations

import functools
import math

import torch

from .. import launch
from ..kd import native
from ..kd import rows as kd_rows
from .philox import uniforms
from .settings import SparseKDSettings


@functools.cache
def _triton_kernels():
    """(kernels.sparse_rows module or None, why not)."""
    try:
        from ..kernels import sparse_rows as kernels
    except ImportError as e:  # Triton missing or broken
        return None, f"Triton does not import: {e}"
    return kernels, None


def pick_backend(x: torch.Tensor, backend: str | None = None, triton: bool = False) -> str:
    """``native``, ``torch`` or (``triton=True``: the loss's pass) ``triton`` for a chunk like ``x``: ``backend``
    (``auto``, ``native``, ``torch``, ``triton``; None reads ``PROMPTKD_CPU_KERNELS``); one asked for where it
    cannot run is an error saying why, as for the KD loss."""
    backend = kd_rows.configured_backend() if backend is None else backend
    allowed = kd_rows.ROW_BACKENDS if triton else kd_rows.BACKENDS
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    if backend == "triton":
        if x.dtype != torch.float32 or not (x.is_cuda or (x.device.type == "cpu" and launch.interpreting())):
            raise ValueError(f"the triton rows backend takes float32 CUDA chunks (CPU ones only under "
                             f"TRITON_INTERPRET=1), got {x.dtype} on {x.device}")
        if _triton_kernels()[0] is None:
            raise RuntimeError(f"the triton rows backend is unavailable: {_triton_kernels()[1]}")
        return "triton"
    if triton and backend == "auto" and x.is_cuda and x.dtype == torch.float32 and _triton_kernels()[0] is not None:
        return "triton"
    fits = x.device.type == "cpu" and x.dtype == torch.float32
    if backend == "native":
        if not fits:
            raise ValueError(f"the native CPU kernels take float32 CPU chunks, got {x.dtype} on {x.device}")
        if native.library() is None:
            raise RuntimeError(f"PROMPTKD_CPU_KERNELS=native, but {native.unavailable_reason()}")
        return "native"
    if backend == "torch" or not fits:
        return "torch"
    return "native" if kd_rows.pick_backend(x) == "native" else "torch"  # (warns once where the library is missing)


# ---- teacher targets ----

def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is the logits' descending order, ties to the lower id (float32 x)."""
    bits = (x + 0.0).view(torch.int32).long()  # + 0.0: -0.0 becomes +0.0, a tie with it
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order of the int bits = the floats' order
    ids = torch.arange(x.shape[1], device=x.device, dtype=torch.int64)
    return (bits << 32) | (x.shape[1] - 1 - ids)


def topk_rows(x: torch.Tensor, k: int, temperature: float,
              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [rows, k] int64, log-probabilities [rows, k]: float32, float64 for float64 x) of the k largest logits
    of each row of ``x`` [rows, V] (float32 or float64; not modified)."""
    if pick_backend(x, backend) == "native":
        return native.topk_rows(x, k, 1.0 / temperature)
    if x.dtype == torch.float32:
        ids = _order_keys(x).topk(k, dim=1).indices
    else:  # float64 (the reference): a stable sort keeps equal logits in id order
        ids = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
    a = x / temperature
    lp = a.gather(1, ids) - torch.logsumexp(a, dim=1, keepdim=True)
    return ids, lp


def sample_rows(x: torch.Tensor, samples: int, width: int, temperature: float, keys: torch.Tensor,
                counters: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [rows, width] int64, log(count / samples) [rows, width]) of ``samples`` draws per row of
    ``x`` [rows, V] (see the module docstring); row i draws with Philox key ``keys[i]``, counter ``counters[i]``."""
    if pick_backend(x, backend) == "native":
        return native.sample_rows(x, samples, width, 1.0 / temperature, keys, counters)
    rows, vocab = x.shape
    a = (x / temperature).double()
    cdf = (a - a.amax(1, keepdim=True)).exp_().cumsum_(1)
    total = cdf[:, -1:]
    drawn = torch.searchsorted(cdf, uniforms(keys, counters, samples).to(x.device) * total, right=True)
    drawn = drawn.clamp_(max=vocab - 1)
    bad = ~(torch.isfinite(total[:, 0]) & (total[:, 0] > 0))  # NaN or +inf logits: nothing to draw from
    # Distinct ids and their counts: group the sorted draws, count each group, order by (-count, id).
    drawn = drawn.sort(1).values
    starts = torch.ones_like(drawn, dtype=torch.bool)
    starts[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    group = starts.long().cumsum(1) - 1
    counts = torch.zeros(rows, samples, dtype=torch.int64, device=x.device).scatter_add_(1, group,
                                                                                       torch.ones_like(drawn))
    distinct = torch.full((rows, samples), -1, dtype=torch.int64, device=x.device).scatter_(1, group, drawn)
    rank = torch.where(counts > 0, counts * (vocab + 1) + (vocab - distinct), torch.zeros_like(counts))
    order = rank.argsort(1, descending=True)
    counts, distinct = counts.gather(1, order), distinct.gather(1, order)
    lp = torch.where(counts > 0, (counts.double() / samples).log(), -math.inf)
    lp = lp.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if width > samples:
        pad = width - samples
        distinct = torch.cat([distinct, distinct.new_full((rows, pad), -1)], 1)
        lp = torch.cat([lp, lp.new_full((rows, pad), -math.inf)], 1)
    distinct = torch.where(bad[:, None], -1, distinct)
    lp = torch.where(bad[:, None], math.nan, lp)
    return distinct, lp


# ---- the student's loss ----

def sparse_rows(s: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor | None,
                scale: torch.Tensor | None, settings: SparseKDSettings, backend: str | None = None):
    """(loss [rows], gradient or None) for one chunk: ``s`` [rows, V] student logits (float32 or float64, owned
    by the caller and free to be overwritten), ``ids`` [rows, k] int64 (distinct per row, in [0, V) or -1),
    ``lp`` [rows, k] teacher log-probabilities, ``targets`` [rows] int64 in [0, V) (read when
    ``settings.has_hard``), ``scale`` [rows] or None; with a scale the gradient is scale * d(loss)/ds
    (possibly in the storage of s)."""
    inv_t = 1.0 / settings.temperature
    picked = pick_backend(s, backend, triton=True)
    if picked == "native":
        loss = native.sparse_rows(s, ids, lp, targets if settings.has_hard else None, scale, settings.tail, inv_t,
                                  settings.soft_weight, settings.hard_weight)
        return loss, (s if scale is not None else None)
    if picked == "triton":
        return triton_sparse_rows(s, ids, lp, targets, scale, settings)
    return torch_sparse_rows(s, ids, lp, targets, scale, settings)


def triton_sparse_rows(s, ids, lp, targets, scale, settings: SparseKDSettings):
    """The ``triton`` backend of :func:`sparse_rows`: ``kernels/sparse_rows.sparse_rows_kernel`` over float32 rows
    (CUDA, or CPU under the interpreter), the gradient written over ``s``. No host synchronisation."""
    kernels = _triton_kernels()[0]
    if kernels is None:
        raise RuntimeError(f"the triton rows backend is unavailable: {_triton_kernels()[1]}")
    if s.stride(1) != 1:
        s = s.contiguous()
    rows, vocab = s.shape
    loss = launch.buffer((rows,), torch.float32, s.device)
    grad = scale is not None
    if rows == 0:
        return loss, (s if grad else None)
    k = ids.shape[1]
    cfg = kernels.pick(vocab)
    hard = settings.has_hard
    options = {} if launch.interpreting() else {"enable_fp_fusion": False}
    kernels.sparse_rows_kernel[(rows,)](
        s, ids.contiguous(), lp.to(torch.float32).contiguous(), targets.contiguous() if hard else ids,
        scale.to(torch.float32).contiguous() if grad else loss, loss, vocab, k, s.stride(0), 1.0 / settings.temperature,
        settings.soft_weight, settings.hard_weight, TAIL=settings.tail, HAS_HARD=hard, NEED_GRAD=grad,
        BLOCK_V=cfg.block_v, BLOCK_K=max(16, _next_power_of_2(k)), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **options)
    return loss, (s if grad else None)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def torch_sparse_rows(s, ids, lp, targets, scale, settings: SparseKDSettings):
    """The ``torch`` backend of :func:`sparse_rows` (row statistics in float64)."""
    inv_t = 1.0 / settings.temperature
    rows, vocab = s.shape
    valid = ids >= 0
    at = ids.clamp(min=0)
    a = s * inv_t
    a_ids = a.gather(1, at).double()
    on_ids = torch.zeros_like(s).scatter_add_(1, at, valid.to(s.dtype)) > 0
    rest = a.masked_fill(on_ids, -math.inf)
    rest_max = rest.amax(1)
    rest_empty = rest_max == -math.inf
    mr = torch.where(rest_empty, torch.zeros_like(rest_max), rest_max)
    e = (rest - mr[:, None]).exp_()  # 0 on the ids
    zr = e.sum(1, dtype=torch.float64)
    mr = mr.double()
    a_ids = torch.where(valid, a_ids, -math.inf)
    m = torch.maximum(torch.where(rest_empty, -math.inf, mr), a_ids.amax(1))
    z = torch.where(rest_empty, 0.0, (mr - m).exp() * zr) + (a_ids - m[:, None]).exp().sum(1)
    lse = m + z.log()
    lq_rest = torch.where(rest_empty, -math.inf, mr + zr.log() - lse)
    lq = a_ids - lse[:, None]
    lp = torch.where(valid, lp.double(), -math.inf)
    p_sum = lp.exp().sum(1)
    if settings.tail:
        soft = torch.ones_like(p_sum, dtype=torch.bool)
        log_norm = torch.zeros_like(p_sum)
        p_rest = torch.where(rest_empty, 0.0, (1.0 - p_sum).clamp(min=0.0))
    else:
        soft = (p_sum > 0) | p_sum.isnan()  # (a NaN target passes: a NaN loss)
        log_norm = torch.where(p_sum > 0, p_sum.log(), 0.0)
        p_rest = torch.zeros_like(p_sum)
    lp_hat = lp - log_norm[:, None]
    terms = torch.where(lp_hat > -math.inf, lp_hat.exp() * (lp_hat - lq), 0.0)
    terms = torch.where(lp_hat.isnan(), math.nan, terms)
    d = terms.sum(1) + torch.where(p_rest > 0, p_rest * (p_rest.log() - lq_rest), 0.0)
    d = torch.where(soft, d, 0.0)
    loss = settings.soft_weight * d
    hard = settings.has_hard
    if hard:
        lse1 = lse if inv_t == 1.0 else torch.logsumexp(s.double(), 1)
        loss = loss + settings.hard_weight * (lse1 - s.gather(1, targets[:, None])[:, 0].double())
    loss = loss.to(torch.float64 if s.dtype == torch.float64 else torch.float32)
    if scale is None:
        return loss, None
    sc = scale.double()
    ks, kh = sc * (settings.soft_weight * inv_t), sc * settings.hard_weight
    q_scale = (mr - lse).exp()
    c_soft = torch.where(soft, q_scale - torch.where(p_rest > 0, p_rest / zr, 0.0), 0.0)
    grad = e.mul_((ks * c_soft).to(s.dtype)[:, None])  # the rest; 0 on the ids
    on_ids_grad = torch.where(soft[:, None] & valid, ks[:, None] * (lq.exp() - lp_hat.exp()), 0.0)
    grad.scatter_add_(1, at, on_ids_grad.to(s.dtype))
    if hard:
        softmax1 = (s.double() - lse1[:, None]).exp_()
        grad.add_((kh[:, None] * softmax1).to(s.dtype))
        grad.scatter_add_(1, targets[:, None], (-kh[:, None]).to(s.dtype))
    return loss, grad
