"""``fused_linear_sparse_kd_loss`` and ``sparse_kd_loss``: the student's loss on sparse teacher targets (top-k or
sampled ids with their log-probabilities, as ``fused_linear_topk`` or a teacher cache gives them). Builds the
settings, checks the tensors (a ValueError / TypeError naming the argument, before any work), flattens and
dispatches. ``*_from_settings``: the same on settings already validated (what the modules call).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..autograd import autocast_dtype, autocast_inputs, autocast_off, autocast_target, static_float, tracing
from ..kd.api import check_float, check_labels, check_tensor
from .checks import bad_rows, check_target_values
from .ops import checked_sparse_targets
from .ops import sparse_kd_loss as sparse_kd_loss_op
from .reference import fused_linear_sparse_kd_loss_reference, sparse_kd_loss_reference
from .settings import SUM_TOLERANCE, SparseKDSettings

#: The values of the sparse loss's ``impl=``: ``auto`` is ``chunked`` on every device (CUDA included: torch's
#: GEMMs per chunk, the row pass in torch ops there).
SPARSE_IMPLS = ("auto", "reference", "chunked", "torch")
FLOAT_SETTINGS = ("temperature", "soft_weight", "hard_weight", "student_logit_scale")


def _settings(tail, temperature, soft_weight, hard_weight, ignore_index, reduction, vocab_size,
              student_logit_scale=1.0, student_softcap=None) -> SparseKDSettings:
    if torch.compiler.is_compiling():
        temperature, soft_weight, hard_weight, student_logit_scale = map(
            static_float, (temperature, soft_weight, hard_weight, student_logit_scale))
        if student_softcap is not None:
            student_softcap = static_float(student_softcap)
    return SparseKDSettings(tail=tail, temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
                            ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size,
                            student_logit_scale=student_logit_scale, student_softcap=student_softcap)


def _static_settings(settings: SparseKDSettings) -> SparseKDSettings:
    if not torch.compiler.is_compiling():
        return settings
    fields = {name: static_float(getattr(settings, name)) for name in FLOAT_SETTINGS}
    if settings.student_softcap is not None:
        fields["student_softcap"] = static_float(settings.student_softcap)
    return replace(settings, **fields)


def pick_sparse_impl(impl: str) -> str:
    if not isinstance(impl, str) or impl not in SPARSE_IMPLS:
        hint = " (the sparse loss has no Triton kernel: 'chunked' runs on CUDA too)" if impl == "triton" else ""
        raise ValueError(f"impl must be one of {SPARSE_IMPLS}, got {impl!r}{hint}")
    return "chunked" if impl == "auto" else impl


def check_targets(ids, lp, lead: torch.Size, device: torch.device) -> int:
    """Types, dtypes, shapes and devices of teacher_ids / teacher_logprobs; returns k."""
    check_tensor("teacher_ids", ids)
    check_tensor("teacher_logprobs", lp)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor, got {ids.dtype}")
    if not lp.dtype.is_floating_point:
        raise TypeError(f"teacher_logprobs must be a floating tensor (log-probabilities), got {lp.dtype}")
    if ids.ndim != len(lead) + 1 or ids.shape[:-1] != lead:
        raise ValueError(f"teacher_ids must have shape [*lead, k] with the student's leading shape {tuple(lead)}, "
                         f"got {tuple(ids.shape)}")
    if lp.shape != ids.shape:
        raise ValueError(f"teacher_logprobs must have teacher_ids' shape {tuple(ids.shape)}, got {tuple(lp.shape)}")
    if ids.shape[-1] < 1:
        raise ValueError("teacher_ids must hold at least one target per token (k >= 1)")
    for name, x in (("teacher_ids", ids), ("teacher_logprobs", lp)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device}, the student's inputs on {device}")
    if lp.requires_grad:
        raise ValueError("teacher_logprobs requires grad, but the sparse KD loss gives no gradient to its targets; "
                         "pass teacher_logprobs.detach()")
    return ids.shape[-1]


def _flat_targets(ids, lp, vocab: int):
    """(ids [N, k] int64, lp [N, k], bad rows [N] or None): checked with a ValueError on CPU tensors; elsewhere
    the unusable rows are marked (their loss and gradient become NaN) and their ids made safe to index with."""
    k = ids.shape[-1]
    ids, lp = ids.reshape(-1, k).long(), lp.reshape(-1, k)
    tolerance = SUM_TOLERANCE[str(lp.dtype).removeprefix("torch.")]
    if ids.device.type == "cpu":
        if ids.numel():
            if tracing(ids):  # a host read would break the graph: the op checks the real tensors
                ids = checked_sparse_targets(ids, lp, vocab, tolerance)
            else:
                check_target_values(ids, lp, vocab, tolerance)
        return ids, lp, None
    bad = bad_rows(ids, lp, vocab, tolerance)
    return torch.where((ids < -1) | (ids >= vocab), -1, ids), lp, bad


def _finish(loss: torch.Tensor, lead: torch.Size, settings: SparseKDSettings) -> torch.Tensor:
    return loss.reshape(lead) if settings.reduction == "none" else loss


def fused_linear_sparse_kd_loss(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor, labels: torch.Tensor | None = None, *, tail: bool = True,
    temperature: float = 1.0, soft_weight: float = 1.0, hard_weight: float = 0.0, ignore_index: int = -100,
    reduction: str = "mean", student_bias: torch.Tensor | None = None, vocab_size: int | None = None,
    student_logit_scale: float = 1.0, student_softcap: float | None = None, impl: str = "auto",
) -> torch.Tensor:
    """Distillation loss on sparse teacher targets, straight from the student's hidden states and output weight.

    The [tokens, vocab] logits ``hidden @ weight.T + bias`` exist one chunk of tokens at a time (``chunked``,
    ``torch``); ``chunked`` computes the gradients while a chunk's logits are at hand: three logit-sized GEMMs
    per chunk for the hidden states and weight, the cost of cross-entropy.

    Shapes: student_hidden [..., D], student_weight [V, D], student_bias [V]; teacher_ids [..., k] integer and
    teacher_logprobs [..., k] floating (``SparseTargets`` of :func:`promptkd.fused_linear_topk`, or a teacher
    cache), with the student's leading shape; labels [...] integer.

    With q = softmax(student_logits / T) over the full vocabulary and p_i = exp(teacher_logprobs_i) on the ids
    (an id of -1 carries nothing; its log-probability is ignored), per token:

    - ``tail=True`` (top-k targets): the exact KL between the two distributions coarsened to k + 1 buckets,
      the ids and the rest: sum_i p_i log(p_i / q_i) + p_r log(p_r / q_r), p_r = 1 - sum_i p_i (0 when it rounds
      below 0), q_r = 1 - sum_i q_i computed from the rest of the row's own log-sum (never by subtracting
      rounded numbers). It is the full forward KL when the teacher's tail is empty, and never compares
      distributions normalised over different supports. Gradient w.r.t. the logits: (q - p~) / T, where p~
      is p on the ids and p_r q / q_r off them.
    - ``tail=False`` (sampled targets, or top-k renormalised): p^ = p / sum_i p_i on the ids,
      sum_i p^_i (log p^_i - log q_i); gradient (q - p^) / T, whose expectation over sampled targets is the full
      forward KL's. A token whose ids carry no mass has no soft term.

    Then ``soft_weight * D + hard_weight * CE(student logits at T = 1, label)``, with ``ignore_index``, the
    reductions, ``vocab_size`` (how many leading rows of the weight are real tokens) and the "no T^2 factor" rule
    exactly as :func:`promptkd.fused_linear_kd_loss`. The result is float32 (float64 for float64 inputs).

    ``student_logit_scale`` (> 0) and ``student_softcap`` (> 0 or None): the student model's own logit transform,
    as in :func:`promptkd.fused_linear_kd_loss`: the logits above are ``softcap * tanh(scale * z / softcap)`` of
    z = hidden @ weight.T + bias (``scale * z`` without a cap), the cross-entropy's included, and the gradients
    flow through it. (The teacher's transform is already in its targets: :func:`promptkd.fused_linear_topk`'s
    ``logit_scale`` / ``softcap``.)

    Targets are checked before any work: ids outside [0, vocab_size) other than -1, an id repeated within a
    token, a NaN log-probability, or probabilities summing above 1 + tolerance (1e-4 for float32
    log-probabilities, 2e-2 for float16, 5e-2 for bfloat16: they were rounded) raise a ValueError naming the
    argument and the row on CPU tensors; on other devices (a check would synchronise) such a token's loss and
    gradient are NaN. Labels follow the rules of :func:`promptkd.fused_linear_kd_loss`.

    Gradients flow to student_hidden, student_weight and student_bias where they require grad (only those);
    none to the targets (``teacher_logprobs`` that requires grad is refused). Autocast, double backward and
    torch.compile (custom ops ``promptkd::sparse_kd_loss`` and its backward) follow the KD loss's rules.

    ``impl``: ``reference`` (full logits, plain torch), ``chunked`` (token chunks, gradients in forward;
    recomputed in backward for ``reduction="none"``), ``torch`` (token chunks, recomputed in backward),
    ``auto`` (``chunked``, on every device). The row pass runs in native C++ on the CPU (``promptkd info``),
    in torch ops elsewhere.
    """
    settings = _settings(tail, temperature, soft_weight, hard_weight, ignore_index, reduction, vocab_size,
                         student_logit_scale, student_softcap)
    return fused_linear_sparse_kd_loss_from_settings(student_hidden, student_weight, teacher_ids, teacher_logprobs,
                                                     labels, student_bias, settings=settings, impl=impl)


def fused_linear_sparse_kd_loss_from_settings(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels,
                                              student_bias, *, settings: SparseKDSettings, impl: str) -> torch.Tensor:
    """:func:`fused_linear_sparse_kd_loss` with its keyword settings already validated in ``settings``."""
    settings = _static_settings(settings)
    check_tensor("student_hidden", student_hidden)
    check_tensor("student_weight", student_weight)
    check_tensor("student_bias", student_bias, optional=True)
    device = student_hidden.device
    cast = autocast_dtype(device)
    check_float("student_hidden", student_hidden, None, None)
    dtype = autocast_target(student_hidden.dtype, cast)
    if student_hidden.ndim < 1:
        raise ValueError("student_hidden must have at least one dimension [..., D]")
    check_float("student_weight", student_weight, dtype, device, ndim=2, cast=cast)
    lead, d = student_hidden.shape[:-1], student_hidden.shape[-1]
    if student_weight.shape[1] != d:
        raise ValueError(f"student_weight must be [V, {d}] to match student_hidden, got {tuple(student_weight.shape)}")
    v = student_weight.shape[0]
    if student_bias is not None:
        check_float("student_bias", student_bias, dtype, device, ndim=1, cast=cast)
        if student_bias.shape[0] != v:
            raise ValueError(f"student_bias must have shape [{v}], got {tuple(student_bias.shape)}")
    check_targets(teacher_ids, teacher_logprobs, lead, device)
    settings = _resolve_vocab(v, settings)
    labels = check_labels(labels, lead, settings.vocab_size, settings, device)
    impl = pick_sparse_impl(impl)
    ids, lp, bad = _flat_targets(teacher_ids, teacher_logprobs, settings.vocab_size)

    student_hidden, student_weight, student_bias = autocast_inputs(cast, student_hidden, student_weight, student_bias)
    with autocast_off(device.type):
        if impl == "reference":
            loss = fused_linear_sparse_kd_loss_reference(student_hidden, student_weight, ids, lp,
                                                         None if labels is None else labels.reshape(lead), settings,
                                                         student_bias)
            return _nan_rows(loss, bad, lead, settings)
        x = student_hidden.reshape(-1, d)
        return _finish(sparse_kd_loss_op(x, student_weight, student_bias, ids, lp, labels, bad, settings, impl),
                       lead, settings)


def _resolve_vocab(v: int, settings: SparseKDSettings) -> SparseKDSettings:
    if settings.vocab_size is None:
        return replace(settings, vocab_size=v)
    if settings.vocab_size > v:
        raise ValueError(f"vocab_size={settings.vocab_size} exceeds the student's vocabulary ({v})")
    return settings


def _nan_rows(loss, bad, lead, settings: SparseKDSettings):
    """The reference's loss with unusable rows made NaN (off the CPU, as the chunked paths do)."""
    if bad is None:
        return loss
    if settings.reduction == "none":
        return torch.where(bad.reshape(lead), torch.full_like(loss, float("nan")), loss)
    return torch.where(bad.any(), torch.full_like(loss, float("nan")), loss)


def sparse_kd_loss(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None, *, tail: bool = True, temperature: float = 1.0, soft_weight: float = 1.0,
    hard_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean", vocab_size: int | None = None,
    student_logit_scale: float = 1.0, student_softcap: float | None = None, impl: str = "auto",
) -> torch.Tensor:
    """The loss of :func:`fused_linear_sparse_kd_loss` on student logits you already have ([..., V]).

    Same formulas, keywords, target and label rules; the gradient goes to the logits when they require grad.
    ``student_logit_scale`` / ``student_softcap`` transform the given logits first (for logits taken before a
    model's own transform). Autocast leaves the logits in their dtype (the loss is computed in float32 anyway).
    """
    settings = _settings(tail, temperature, soft_weight, hard_weight, ignore_index, reduction, vocab_size,
                         student_logit_scale, student_softcap)
    return sparse_kd_loss_from_settings(student_logits, teacher_ids, teacher_logprobs, labels, settings=settings,
                                        impl=impl)


def sparse_kd_loss_from_settings(student_logits, teacher_ids, teacher_logprobs, labels, *,
                                 settings: SparseKDSettings, impl: str) -> torch.Tensor:
    """:func:`sparse_kd_loss` with its keyword settings already validated in ``settings``."""
    settings = _static_settings(settings)
    check_tensor("student_logits", student_logits)
    check_float("student_logits", student_logits, None, None)
    if student_logits.ndim < 1:
        raise ValueError("student_logits must have at least one dimension [..., V]")
    device, lead = student_logits.device, student_logits.shape[:-1]
    check_targets(teacher_ids, teacher_logprobs, lead, device)
    settings = _resolve_vocab(student_logits.shape[-1], settings)
    labels = check_labels(labels, lead, settings.vocab_size, settings, device)
    impl = pick_sparse_impl(impl)
    ids, lp, bad = _flat_targets(teacher_ids, teacher_logprobs, settings.vocab_size)
    with autocast_off(device.type):
        if impl == "reference":
            loss = sparse_kd_loss_reference(student_logits, ids, lp, None if labels is None else labels.reshape(lead),
                                            settings)
            return _nan_rows(loss, bad, lead, settings)
        x = student_logits.reshape(-1, student_logits.shape[-1])
        return _finish(sparse_kd_loss_op(x, None, None, ids, lp, labels, bad, settings, impl), lead, settings)
