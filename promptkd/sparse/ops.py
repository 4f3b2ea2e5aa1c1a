"""Offline distillation's ops as PyTorch custom ops (namespace ``promptkd``): what ``torch.compile`` sees.

    promptkd::sparse_kd_loss(x, w?, b?, ids, lp, labels?, bad?, *settings, impl, grads) -> (loss, dx, dw, db)
    promptkd::sparse_kd_loss_backward(grad, x, w?, b?, ids, lp, labels?, bad?, *settings, impl, need) -> (dx, dw, db)
    promptkd::checked_sparse_targets(ids, lp, vocab_size, tolerance) -> ids
    promptkd::linear_topk(x, w?, b?, k, temperature, vocab_size, samples, keys?, counters?, logit_scale,
                          softcap) -> (ids, lp)

Inputs as ``promptkd.sparse.torch_impl`` takes them (flattened; the weight None for logits; ``bad`` the rows
with unusable targets, off the CPU). ``settings``: the
fields of a resolved ``SparseKDSettings`` (tail, temperature, soft_weight, hard_weight, ignore_index,
reduction, vocab_size, student_logit_scale, student_softcap; a softcap of 0.0 stands for None, in
``linear_topk`` too); ``impl``: ``chunked`` or ``torch``; ``grads`` [3]: the inputs whose gradients the
forward computes (the chunked strategy), empty tensors elsewhere. ``checked_sparse_targets`` is the CPU check
of the targets under compile (the real op raises the eager ValueError; marked side-effectful).

Eager calls run the same forward and backward through ``_SparseKDLoss`` (an ``autograd.Function``), as the KD
loss does (``promptkd.kd.ops``: the op wrapper's per-call cost, and dispatch modes seeing aten ops); the op
runs whenever the inputs are traced. Double backward is refused in eager (``first_order_only``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import SimpleNamespace

import torch

from ..autograd import first_order_only, static_float, tracing
from ..kd.tokens import finish_forward
from ..kd.torch_impl import alloc_grads, compute_dtype
from .checks import check_target_values
from .settings import SparseKDSettings
from .torch_impl import sparse_backward, sparse_forward, targets_forward

Tensor = torch.Tensor
OP = "fused_linear_sparse_kd_loss / sparse_kd_loss"


@torch.library.custom_op("promptkd::checked_sparse_targets", mutates_args=())
def checked_sparse_targets(ids: Tensor, lp: Tensor, vocab_size: int, tolerance: float) -> Tensor:
    check_target_values(ids, lp, vocab_size, tolerance)
    return ids.clone()


@checked_sparse_targets.register_fake
def _(ids, lp, vocab_size, tolerance):
    return torch.empty_like(ids)


torch.fx.node.has_side_effect(torch.ops.promptkd.checked_sparse_targets.default)


def settings_args(settings: SparseKDSettings) -> tuple:
    """A resolved ``SparseKDSettings`` as the ops' plain arguments (a softcap of None is 0.0; floats constant
    under compile)."""
    floats = (settings.temperature, settings.soft_weight, settings.hard_weight)
    transform = (settings.student_logit_scale, settings.student_softcap or 0.0)
    if torch.compiler.is_compiling():
        floats, transform = tuple(map(static_float, floats)), tuple(map(static_float, transform))
    return (settings.tail, *floats, settings.ignore_index, settings.reduction, settings.vocab_size, *transform)


@functools.lru_cache(maxsize=256)
def _settings(*args) -> SparseKDSettings:
    """The ``SparseKDSettings`` of :func:`settings_args`' values (a softcap of 0.0 is None)."""
    *head, student_softcap = args
    return SparseKDSettings(*head, student_softcap=student_softcap or None)


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _compute(x, w, b, ids, lp, labels, bad, fields: tuple, grads) -> tuple[Tensor, list]:
    settings = _settings(*fields)
    per_token, kept = sparse_forward(x, w, b, ids, lp, labels, bad, settings, grads)
    loss = finish_forward(SimpleNamespace(save_for_backward=lambda *saved: None), settings, per_token, labels, ())
    return loss, kept


def _forward(x: Tensor, w: Tensor | None, b: Tensor | None, ids: Tensor, lp: Tensor, labels: Tensor | None,
             bad: Tensor | None, tail: bool, temperature: float, soft_weight: float, hard_weight: float,
             ignore_index: int, reduction: str, vocab_size: int, student_logit_scale: float, student_softcap: float,
             impl: str, grads: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, kept = _compute(x, w, b, ids, lp, labels, bad, (tail, temperature, soft_weight, hard_weight, ignore_index,
                                                     reduction, vocab_size, student_logit_scale, student_softcap),
                          grads)
    return (loss.contiguous(), *(_empty(x) if g is None else g.contiguous() for g in kept))


sparse_kd_loss_op = torch.library.custom_op("promptkd::sparse_kd_loss", _forward, mutates_args=())


@sparse_kd_loss_op.register_fake
def _(x, w, b, ids, lp, labels, bad, tail, temperature, soft_weight, hard_weight, ignore_index, reduction, vocab_size,
      student_logit_scale, student_softcap, impl, grads):
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=compute_dtype(x.dtype))
    kept = alloc_grads(x, w, b, grads)
    return (loss, *(_empty(x) if g is None else g.new_empty(g.shape) for g in kept))


def _recompute(grad: Tensor, x: Tensor, w: Tensor | None, b: Tensor | None, ids: Tensor, lp: Tensor,
               labels: Tensor | None, bad: Tensor | None, tail: bool, temperature: float, soft_weight: float,
               hard_weight: float, ignore_index: int, reduction: str, vocab_size: int, student_logit_scale: float,
               student_softcap: float, impl: str, need: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    settings = _settings(tail, temperature, soft_weight, hard_weight, ignore_index, reduction, vocab_size,
                         student_logit_scale, student_softcap)
    out = sparse_backward(grad, x, w, b, ids, lp, labels, bad, settings, need)
    return tuple(_empty(x) if g is None else g.contiguous() for g in out)


sparse_kd_loss_backward_op = torch.library.custom_op("promptkd::sparse_kd_loss_backward", _recompute, mutates_args=())


@sparse_kd_loss_backward_op.register_fake
def _(grad, x, w, b, ids, lp, labels, bad, tail, temperature, soft_weight, hard_weight, ignore_index, reduction,
      vocab_size, student_logit_scale, student_softcap, impl, need):
    return tuple(t.new_empty(t.shape) if asked else _empty(x) for t, asked in zip((x, w, b), need, strict=True))


def _save(ctx, inputs: tuple, kept: tuple) -> None:
    ctx.args = inputs[7:17]  # settings and impl, as the backward op takes them
    ctx.in_forward = any(inputs[17])
    ctx.save_for_backward(*inputs[:7], *kept)


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _unit(grad: Tensor) -> bool:
    return grad.device.type == "cpu" and not tracing(grad) and bool(grad == 1)


@first_order_only(OP)
def _backward(ctx, grad: Tensor, *unused):
    saved = ctx.saved_tensors
    inputs, targets, kept = saved[:3], saved[3:7], saved[7:10]  # targets: ids, lp, labels, bad
    need = ctx.needs_input_grad[:3]
    if ctx.in_forward:
        unit = _unit(grad)
        grads = [(g if unit else g * grad.to(g.dtype)).to(x.dtype) if asked else None
                 for g, x, asked in zip(kept, inputs, need, strict=True)]
    else:
        if tracing(grad):
            out = sparse_kd_loss_backward_op(grad, *inputs, *targets, *ctx.args, list(need))
        else:
            out = sparse_backward(grad, *inputs, *targets, _settings(*ctx.args[:-1]), need)
        grads = [g if asked else None for g, asked in zip(out, need, strict=True)]
    return (*grads, *(None,) * 15)


sparse_kd_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _SparseKDLoss(torch.autograd.Function):
    """Eager autograd for ``promptkd::sparse_kd_loss``'s computation (see the module docstring)."""

    @staticmethod
    def forward(ctx, *inputs):
        loss, kept = _compute(*inputs[:7], inputs[7:16], inputs[17])
        _save(ctx, inputs, tuple(kept))
        return loss

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)


def sparse_kd_loss(x: Tensor, w: Tensor | None, b: Tensor | None, ids: Tensor, lp: Tensor, labels: Tensor | None,
                   bad: Tensor | None, settings: SparseKDSettings, impl: str) -> Tensor:
    """The loss of ``impl`` (chunked, torch) on flattened inputs, reduced per ``settings.reduction``. Gradients
    flow to x, w, b where they require grad; ``chunked`` computes them in forward when the loss is reduced and
    grad mode is on."""
    inputs = (x, w, b)
    in_forward = impl == "chunked" and settings.reduction != "none" and torch.is_grad_enabled()
    grads = [in_forward and t is not None and t.requires_grad for t in inputs]
    args = (*inputs, ids, lp, labels, bad, *settings_args(settings), impl, grads)
    if tracing(x):
        return sparse_kd_loss_op(*args)[0]
    return _SparseKDLoss.apply(*args)


# ---- teacher targets ----

def _topk_compute(x: Tensor, w: Tensor | None, b: Tensor | None, k: int, temperature: float, vocab_size: int,
                  samples: int, keys: Tensor | None, counters: Tensor | None, logit_scale: float,
                  softcap: float) -> tuple[Tensor, Tensor]:
    return targets_forward(x, w, b, k, temperature, vocab_size, samples, keys, counters, logit_scale, softcap or None)


linear_topk_op = torch.library.custom_op("promptkd::linear_topk", _topk_compute, mutates_args=())


@linear_topk_op.register_fake
def _(x, w, b, k, temperature, vocab_size, samples, keys, counters, logit_scale, softcap):
    lp_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[0], k), dtype=torch.int64), x.new_empty((x.shape[0], k), dtype=lp_dtype)


def linear_topk(x: Tensor, w: Tensor | None, b: Tensor | None, k: int, temperature: float, vocab_size: int,
                samples: int, keys: Tensor | None, counters: Tensor | None, logit_scale: float = 1.0,
                softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Teacher targets of flattened inputs (``promptkd.sparse.torch_impl.targets_forward``), through the custom
    op when traced. No gradient: the results are targets."""
    softcap = softcap or 0.0
    if tracing(x):
        temperature, logit_scale, softcap = map(static_float, (temperature, logit_scale, softcap))
        return linear_topk_op(x, w, b, k, temperature, vocab_size, samples, keys, counters, logit_scale, softcap)
    with torch.no_grad():
        return _topk_compute(x, w, b, k, temperature, vocab_size, samples, keys, counters, logit_scale, softcap)
