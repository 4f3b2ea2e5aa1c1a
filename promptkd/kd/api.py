"""``fused_linear_kd_loss`` and ``kd_loss``: build the settings, check the tensors, flatten, pick an
implementation (``promptkd.impls``) and dispatch. ``*_from_settings`` are the same functions on settings
already validated (a ``KDSettings``), what the modules call.

Formulas (p = softmax(teacher_logits / T), q = softmax(student_logits / T)):
    forward_kl       KL(p || q)
    reverse_kl       KL(q || p)
    jsd              beta KL(p || M) + (1 - beta) KL(q || M),  M = beta p + (1 - beta) q,  0 < beta < 1
    skew_forward_kl  KL(p || alpha p + (1 - alpha) q),  0 <= alpha < 1
    skew_reverse_kl  KL(q || (1 - alpha) p + alpha q),  0 <= alpha < 1
Per token: soft_weight * divergence + hard_weight * CE(student logits at T = 1, label), each side's
logits after its transform where one is set: softcap * tanh(logit_scale * z / softcap).

Autocast and double backward follow the rules of ``promptkd.autograd``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..autograd import autocast_dtype, autocast_inputs, autocast_off, autocast_target, static_float, tracing
from ..impls import FLOATS, pick_impl
from .ops import check_label_range, checked_labels
from .ops import kd_loss as kd_loss_op
from .reference import fused_linear_kd_loss_reference, kd_loss_reference
from .settings import KDSettings

#: The float fields of KDSettings (constants of a compiled graph: ``_static_settings``); the softcaps too
#: where set.
FLOAT_SETTINGS = ("beta", "alpha", "temperature", "soft_weight", "hard_weight", "student_logit_scale",
                  "teacher_logit_scale")
OPTIONAL_FLOAT_SETTINGS = ("student_softcap", "teacher_softcap")


def check_tensor(name: str, x, optional: bool = False):
    if x is None and optional:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _labels_checked_on_host(device: torch.device) -> bool:
    """Whether labels on ``device`` are range-checked here, with a ValueError: only where that costs no
    device synchronisation (CPU). Elsewhere the implementations make a bad counted label loud (NaN)."""
    return device.type == "cpu"


def check_labels(labels, lead: torch.Size, vocab: int, settings: KDSettings, device):
    if labels is None:
        if settings.has_hard:
            raise ValueError("labels are required when hard_weight > 0")
        return None
    check_tensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != lead:
        raise ValueError(f"labels must have the inputs' leading shape {tuple(lead)}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device}, the inputs on {device}")
    labels = labels.reshape(-1).long()
    # Elsewhere an out-of-range counted label makes that token's loss NaN (see fused_linear_kd_loss).
    if _labels_checked_on_host(labels.device) and labels.numel():
        if tracing(labels):  # a host read would break the graph: the op checks the real tensor
            return checked_labels(labels, vocab, settings.ignore_index)
        check_label_range(labels, vocab, settings.ignore_index)
    return labels


def _resolve_vocab(vs: int, vt: int, settings: KDSettings) -> KDSettings:
    if settings.vocab_size is None:
        if vs != vt:
            raise ValueError(
                f"student vocabulary ({vs}) and teacher vocabulary ({vt}) differ: pass vocab_size= "
                "to name how many leading rows are real tokens (the rest are padding)"
            )
        return replace(settings, vocab_size=vs)
    if settings.vocab_size > min(vs, vt):
        raise ValueError(f"vocab_size={settings.vocab_size} exceeds the smaller vocabulary ({min(vs, vt)})")
    return settings


def _settings(divergence, beta, alpha, temperature, soft_weight, hard_weight, ignore_index, reduction,
              vocab_size, student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None,
              teacher_softcap=None) -> KDSettings:
    """The keyword settings, validated; floats kept constant under torch.compile (``static_float``, before
    the validation reads them)."""
    floats = dict(beta=beta, alpha=alpha, temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
                  student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                  student_softcap=student_softcap, teacher_softcap=teacher_softcap)
    if torch.compiler.is_compiling():
        floats = {k: v if v is None else static_float(v) for k, v in floats.items()}
    return KDSettings(divergence=divergence, ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size,
                      **floats)


def _static_settings(settings: KDSettings) -> KDSettings:
    """``settings`` itself; under torch.compile with its floats kept constant (``static_float``: a module's
    settings that changed between calls would otherwise be symbolic)."""
    if not torch.compiler.is_compiling():
        return settings
    changes = {name: static_float(getattr(settings, name)) for name in FLOAT_SETTINGS}
    changes.update({name: static_float(getattr(settings, name)) for name in OPTIONAL_FLOAT_SETTINGS
                    if getattr(settings, name) is not None})
    return replace(settings, **changes)


def check_float(name: str, x: torch.Tensor, dtype, device, ndim=None, cast=None):
    """``cast``: the autocast dtype (None: autocast off); x's dtype is compared as autocast_target makes it."""
    if x.dtype not in FLOATS:
        raise ValueError(f"{name} must be a floating tensor (float32, float16, bfloat16, float64), got {x.dtype}")
    if dtype is not None and autocast_target(x.dtype, cast) != dtype:
        under = "" if cast is None else f" (under autocast to {cast})"
        raise ValueError(f"{name} has dtype {x.dtype}, expected {dtype} like student_hidden / student_logits{under}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} like student_hidden / student_logits")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")


def _finish(loss: torch.Tensor, lead: torch.Size, settings: KDSettings) -> torch.Tensor:
    return loss.reshape(lead) if settings.reduction == "none" else loss


def fused_linear_kd_loss(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, labels: torch.Tensor | None = None, *,
    divergence: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
    soft_weight: float = 1.0, hard_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
    student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None, student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None, teacher_softcap: float | None = None, impl: str = "auto",
) -> torch.Tensor:
    """Distillation loss straight from hidden states and output-embedding weights.

    The [tokens, vocab] logits ``hidden @ weight.T + bias`` are never materialized by the
    ``chunked``, ``torch`` and ``triton`` implementations: they are computed chunk by chunk (tile by
    tile on the GPU) and folded into per-token losses; ``chunked`` computes the gradients in the same
    pass (when the loss is reduced and a gradient is needed), the others recompute in backward.

    Shapes: student_hidden [..., Ds], student_weight [Vs, Ds], teacher_hidden [..., Dt] with the
    same leading shape, teacher_weight [Vt, Dt]; biases [Vs] / [Vt]; labels [...] integer.
    Ds may differ from Dt. All floating inputs share one dtype and device (after the autocast rule below).

    With p = softmax(teacher_logits / T) and q = softmax(student_logits / T), per token:
        soft_weight * D(p, q) + hard_weight * cross_entropy(student_logits, label)
    where D is ``divergence``: ``forward_kl`` KL(p||q); ``reverse_kl`` KL(q||p); ``jsd``
    beta KL(p||M) + (1-beta) KL(q||M), M = beta p + (1-beta) q, 0 < beta < 1;
    ``skew_forward_kl`` KL(p || alpha p + (1-alpha) q) and ``skew_reverse_kl``
    KL(q || (1-alpha) p + alpha q), 0 <= alpha < 1. The divergence is exactly the one at
    temperature T: there is **no T^2 factor** (multiply soft_weight by T**2 if you want it).
    The cross-entropy always uses temperature 1.

    Logit transforms, for models whose own logits are not ``hidden @ weight.T + bias``: each side's logits z
    become ``softcap * tanh(logit_scale * z / softcap)`` (``logit_scale * z`` with ``softcap=None``) before
    everything above, the cross-entropy included: ``student_logit_scale`` / ``teacher_logit_scale`` (> 0;
    Cohere's ``logit_scale``, Granite's 1 / ``logits_scaling``) and ``student_softcap`` / ``teacher_softcap``
    (> 0 or None; Gemma 2's ``final_logit_softcapping``), so the loss is the one the models' own logits give.
    Gradients flow through them (the cap's derivative is scale * (1 - tanh^2): a logit far past the cap gets
    almost none). Every implementation applies them (the fused Triton kernels in their logit tiles).

    Tokens whose label equals ``ignore_index`` count zero. ``reduction``: ``mean`` divides by the
    number of counted tokens (a device tensor: no host synchronisation), ``sum`` adds, ``none``
    returns one value per token in the leading shape (0 for ignored tokens). With no counted
    token the loss is 0 and all gradients are 0. The result is float32 (float64 for float64 inputs).

    If Vs != Vt, ``vocab_size`` says how many leading rows are real tokens; the remaining rows of
    either weight are padding: they get zero probability and zero gradient. ``vocab_size`` may
    also trim padding when Vs == Vt.

    Gradients flow to every input that requires grad (student hidden, weight, bias; teacher
    hidden, weight, bias), and only to those: no work is spent on the others.

    Labels: a token counts when its label is not ``ignore_index``; with ``hard_weight > 0`` the label is
    also the cross-entropy's target. Labels of counted tokens must lie in [0, vocab_size) whatever
    hard_weight is: on CPU tensors this is checked with a ValueError; elsewhere (a check would
    synchronise with the device) such a token gets a NaN loss, so the reduced loss is NaN too, and NaN
    gradient rows: never a finite, wrong value (a padding label that is not ``ignore_index`` would
    otherwise count silently).

    Autocast: when autocast is enabled for the inputs' device type, the floating inputs other than
    float64 are first cast to ``torch.get_autocast_dtype(device_type)`` (as autocast casts a matmul's
    inputs; the dtype checks apply to the cast dtypes), then the op runs with autocast disabled, forward
    and backward (also when ``.backward()`` is called inside the autocast block). The result equals
    the same call outside autocast on inputs cast explicitly; gradients reach the leaves in their dtype.

    Double backward: ``impl="reference"`` (plain autograd) supports it. ``chunked``, ``torch`` and ``triton`` give
    first-order gradients, also under ``create_graph=True``, but differentiating those gradients again
    raises a RuntimeError (never a silently wrong or zero second derivative).

    ``impl``: ``reference`` (full logits, plain torch), ``chunked`` (token chunks, gradients computed
    in forward; recomputed in backward for ``reduction="none"``), ``torch`` (token chunks, recomputed
    in backward: the least memory between forward and backward), ``triton`` (fused kernels, CUDA),
    ``auto`` (triton on CUDA, chunked otherwise). The chunked paths' elementwise pass runs in native
    C++ where built (``PROMPTKD_CPU_KERNELS``, ``promptkd info``; see ``promptkd.kd.rows``).

    torch.compile: ``chunked``, ``torch`` and ``triton`` run as custom ops (``promptkd::kd_loss`` and its
    backward, ``promptkd.kd.ops``) with fake implementations and a registered autograd formula, so a step
    calling this function compiles with ``fullgraph=True`` (no graph break) and gives the eager loss and
    gradients; ``reference`` is traced as plain torch. The CPU label check runs inside the graph
    (``promptkd::checked_labels``) and raises the same ValueError. The keyword settings are constants of
    the graph: a float that changes between calls (a scheduled ``hard_weight``) compiles once per value.
    Second derivatives through a compiled graph are torch's to refuse (AOTAutograd has no double
    backward); the first-order guard above is the eager rule.
    """
    settings = _settings(divergence, beta, alpha, temperature, soft_weight, hard_weight, ignore_index, reduction,
                         vocab_size, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
    return fused_linear_kd_loss_from_settings(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                              student_bias, teacher_bias, settings=settings, impl=impl)


def fused_linear_kd_loss_from_settings(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                       student_bias, teacher_bias, *, settings: KDSettings, impl: str) -> torch.Tensor:
    """:func:`fused_linear_kd_loss` with its keyword settings already validated in ``settings`` (what
    ``FusedLinearKDLoss`` holds): checks the tensors and ``impl``, then runs."""
    settings = _static_settings(settings)
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        check_tensor(name, x)
    check_tensor("student_bias", student_bias, optional=True)
    check_tensor("teacher_bias", teacher_bias, optional=True)
    device = student_hidden.device
    cast = autocast_dtype(device)  # checks see the dtypes after the autocast rule; casting waits for them
    check_float("student_hidden", student_hidden, None, None)
    dtype = autocast_target(student_hidden.dtype, cast)
    if student_hidden.ndim < 1:
        raise ValueError("student_hidden must have at least one dimension [..., Ds]")
    check_float("student_weight", student_weight, dtype, device, ndim=2, cast=cast)
    check_float("teacher_hidden", teacher_hidden, dtype, device, cast=cast)
    check_float("teacher_weight", teacher_weight, dtype, device, ndim=2, cast=cast)
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} differs from "
                         f"student_hidden's {tuple(lead)}")
    ds, dt = student_hidden.shape[-1], teacher_hidden.shape[-1]
    if student_weight.shape[1] != ds:
        raise ValueError(f"student_weight must be [Vs, {ds}] to match student_hidden, "
                         f"got {tuple(student_weight.shape)}")
    if teacher_weight.shape[1] != dt:
        raise ValueError(f"teacher_weight must be [Vt, {dt}] to match teacher_hidden, "
                         f"got {tuple(teacher_weight.shape)}")
    vs, vt = student_weight.shape[0], teacher_weight.shape[0]
    for name, bias, v in (("student_bias", student_bias, vs), ("teacher_bias", teacher_bias, vt)):
        if bias is not None:
            check_float(name, bias, dtype, device, ndim=1, cast=cast)
            if bias.shape[0] != v:
                raise ValueError(f"{name} must have shape [{v}], got {tuple(bias.shape)}")
    settings = _resolve_vocab(vs, vt, settings)
    labels = check_labels(labels, lead, settings.vocab_size, settings, device)
    impl = pick_impl(impl, device, dtype)

    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = autocast_inputs(
        cast, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    with autocast_off(device.type):
        if impl == "reference":
            return fused_linear_kd_loss_reference(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                  None if labels is None else labels.reshape(lead), settings,
                                                  student_bias, teacher_bias)
        xs, xt = student_hidden.reshape(-1, ds), teacher_hidden.reshape(-1, dt)
        args = (xs, student_weight, student_bias, xt, teacher_weight, teacher_bias, labels, settings)
        return _finish(_apply(impl, args), lead, settings)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None, *,
    divergence: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
    soft_weight: float = 1.0, hard_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
    vocab_size: int | None = None, student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None, teacher_softcap: float | None = None, impl: str = "auto",
) -> torch.Tensor:
    """The loss of :func:`fused_linear_kd_loss` on logits you already have: [..., Vs] and [..., Vt].

    Same formulas, keywords, label, double-backward and gradient rules; gradients go to both logits
    tensors when they require grad. The ``torch`` and ``triton`` implementations keep no [tokens, vocab]
    intermediate beyond the gradient itself.

    Autocast: the logits are not cast to the autocast dtype (the loss is computed in float32 anyway);
    when autocast is enabled for their device type, logits of two different floating dtypes are both
    cast to ``torch.promote_types`` of the two (outside autocast that is a ValueError), and the op runs
    with autocast disabled, forward and backward.
    """
    settings = _settings(divergence, beta, alpha, temperature, soft_weight, hard_weight, ignore_index, reduction,
                         vocab_size, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
    return kd_loss_from_settings(student_logits, teacher_logits, labels, settings=settings, impl=impl)


def kd_loss_from_settings(student_logits, teacher_logits, labels, *, settings: KDSettings, impl: str) -> torch.Tensor:
    """:func:`kd_loss` with its keyword settings already validated in ``settings`` (what ``KDLoss``
    holds): checks the tensors and ``impl``, then runs."""
    settings = _static_settings(settings)
    check_tensor("student_logits", student_logits)
    check_tensor("teacher_logits", teacher_logits)
    dtype, device = student_logits.dtype, student_logits.device
    check_float("student_logits", student_logits, None, None)
    if student_logits.ndim < 1:
        raise ValueError("student_logits must have at least one dimension [..., Vs]")
    promote = autocast_dtype(device) is not None
    if promote and teacher_logits.dtype in FLOATS:  # under autocast: the narrower logits go to the wider dtype
        dtype = torch.promote_types(dtype, teacher_logits.dtype)
    check_float("teacher_logits", teacher_logits, None if promote else dtype, device)
    lead = student_logits.shape[:-1]
    if teacher_logits.shape[:-1] != lead:
        raise ValueError(f"teacher_logits leading shape {tuple(teacher_logits.shape[:-1])} differs from "
                         f"student_logits's {tuple(lead)}")
    settings = _resolve_vocab(student_logits.shape[-1], teacher_logits.shape[-1], settings)
    labels = check_labels(labels, lead, settings.vocab_size, settings, device)
    impl = pick_impl(impl, device, dtype)

    student_logits, teacher_logits = student_logits.to(dtype), teacher_logits.to(dtype)  # no-ops but under autocast
    with autocast_off(device.type):
        if impl == "reference":
            return kd_loss_reference(student_logits, teacher_logits,
                                     None if labels is None else labels.reshape(lead), settings)
        xs = student_logits.reshape(-1, student_logits.shape[-1])
        xt = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        return _finish(_apply(impl, (xs, None, None, xt, None, None, labels, settings)), lead, settings)


def _apply(impl: str, args) -> torch.Tensor:
    return kd_loss_op(*args, impl)  # promptkd.kd.ops; imports triton only when impl is triton
