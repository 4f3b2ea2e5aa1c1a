"""The fused KD loss as PyTorch custom ops (namespace ``promptkd``): what ``torch.compile`` sees.

Dynamo cannot trace the chunked paths' native pass (ctypes), and fake tensors must never reach the
Triton launchers. As custom ops with fake implementations (shapes and dtypes only) and a registered
autograd formula, the loss is one opaque node of the graph, forward and backward, so a training step
compiles with ``fullgraph=True``. Every output of the ops is contiguous (the fake ones say so too).

    promptkd::kd_loss(xs, ws?, bs?, xt, wt?, bt?, labels?, *settings, impl, grads)
        -> (loss, dxs, dws, dbs, dxt, dwt, dbt, stats)
    promptkd::kd_loss_backward(grad, xs, ws?, bs?, xt, wt?, bt?, labels?, stats, *settings, impl, need)
        -> (dxs, dws, dbs, dxt, dwt, dbt)
    promptkd::checked_labels(labels, vocab_size, ignore_index) -> labels

Inputs as ``promptkd.kd.torch_impl.torch_forward`` takes them (flattened; the weights None for logits).
``settings``: the fields of a resolved ``KDSettings`` (divergence, beta, alpha, temperature, soft_weight,
hard_weight, ignore_index, reduction, vocab_size, student_logit_scale, teacher_logit_scale, student_softcap,
teacher_softcap; a softcap of 0.0 stands for None) as plain values; ``impl``: ``chunked``, ``torch`` or
``triton``. ``loss``: reduced ([]) or per token ([N], reduction ``none``). ``grads`` [6]: the inputs
whose gradients the forward computes and returns (the chunked strategy; the backward multiplies them
by the incoming gradient), empty tensors elsewhere. ``stats``: what the Triton backward reads, empty for
the other impls. ``kd_loss_backward`` recomputes (``torch``, ``triton``, and ``chunked`` where the forward
computed nothing), for the inputs flagged in ``need``, empty tensors elsewhere. ``checked_labels``: the CPU
label range check of the public functions under compile, where a host read would break the graph (the
real op runs on real tensors and raises the same ValueError); returns a copy of ``labels``.

Double backward stays refused in eager (``promptkd.autograd.first_order_only`` on the backward); a compiled
graph refuses it itself (AOTAutograd). Eager calls run the same ``_forward``, ``_save`` and ``_backward``
through ``_KDLoss``, an ``autograd.Function``, instead of the op, for two reasons: the op's autograd wrapper
costs Python time on every call (torch._library re-binds the 22 arguments: +0.2 to 0.3 ms per forward and
backward measured on this CPU, about 10% of a loss with N=64, V=1000), and TorchDispatchModes (op counters,
FlopCounterMode) would see one opaque op instead of the aten ops inside. Whenever the inputs are traced
(``promptkd.autograd.tracing``: torch.compile, opcheck, export) the op runs, forward and backward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import SimpleNamespace

import torch

from ..autograd import first_order_only, static_float, tracing
from .settings import KDSettings
from .tokens import finish_forward
from .torch_impl import alloc_grads, compute_dtype, torch_backward, torch_forward

Tensor = torch.Tensor
OP = {"chunked": "fused_linear_kd_loss / kd_loss (impl='chunked' / 'torch')",
      "torch": "fused_linear_kd_loss / kd_loss (impl='chunked' / 'torch')",
      "triton": "fused_linear_kd_loss / kd_loss (impl='triton')"}
#: Planes of the Triton statistics (kernels/kd_planes.GRAD), here so that fake tensors need no triton import.
TRITON_STAT_PLANES = 8


def check_label_range(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """ValueError unless every label of ``labels`` (flat) lies in [0, vocab) or equals ``ignore_index``.
    A host read: the public functions call it for CPU tensors only."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"flattened position {i} holds {int(labels[i])}")


@torch.library.custom_op("promptkd::checked_labels", mutates_args=())
def checked_labels(labels: Tensor, vocab_size: int, ignore_index: int) -> Tensor:
    check_label_range(labels, vocab_size, ignore_index)
    return labels.clone()


@checked_labels.register_fake
def _(labels, vocab_size, ignore_index):
    return torch.empty_like(labels)


# The loss reads the checked labels, but the check must run even where a graph would not: not dead code.
torch.fx.node.has_side_effect(torch.ops.promptkd.checked_labels.default)


def settings_args(settings: KDSettings) -> tuple:
    """A resolved ``KDSettings`` as the ops' plain arguments (floats constant under compile: ``static_float``)."""
    floats = (settings.beta, settings.alpha, settings.temperature, settings.soft_weight, settings.hard_weight)
    transforms = (settings.student_logit_scale, settings.teacher_logit_scale, settings.student_softcap or 0.0,
                  settings.teacher_softcap or 0.0)
    if torch.compiler.is_compiling():
        floats, transforms = tuple(map(static_float, floats)), tuple(map(static_float, transforms))
    return (settings.divergence, *floats, settings.ignore_index, settings.reduction, settings.vocab_size, *transforms)


@functools.lru_cache(maxsize=256)
def _settings(*args) -> KDSettings:
    """The ``KDSettings`` of :func:`settings_args`' values (a softcap of 0.0 is None)."""
    *head, student_softcap, teacher_softcap = args
    return KDSettings(*head, student_softcap=student_softcap or None, teacher_softcap=teacher_softcap or None)


def _empty(x: Tensor) -> Tensor:
    """The placeholder of an output that is not computed (each a fresh tensor: outputs may not alias)."""
    return x.new_empty(0)


def _reduce(settings: KDSettings, per_token: Tensor, labels: Tensor | None) -> Tensor:
    """``tokens.finish_forward`` (NaN for bad labels, 0 for ignored tokens, the reduction) with nothing to save:
    the autograd glue here saves what the backward needs."""
    return finish_forward(SimpleNamespace(save_for_backward=lambda *saved: None), settings, per_token, labels, ())


def _compute(xs, ws, bs, xt, wt, bt, labels, settings_impl: tuple, grads) -> tuple[Tensor, list, Tensor | None]:
    """(loss, the six gradients computed in forward or None, the Triton statistics or None): the work of
    ``promptkd::kd_loss``, shared by the op and the eager Function (which needs no placeholders)."""
    *fields, impl = settings_impl
    settings = _settings(*fields)
    inputs = (xs, ws, bs, xt, wt, bt)
    kept, stats = [None] * 6, None
    if impl == "triton":
        from .triton_impl import triton_forward, unit_stride

        per_token, stats = triton_forward(*(unit_stride(x) for x in inputs), labels, settings)
    else:
        per_token, gs, gt = torch_forward(*inputs, labels, settings, grads)
        kept = [*gs, *gt]
    return _reduce(settings, per_token, labels), kept, stats


def _forward(xs: Tensor, ws: Tensor | None, bs: Tensor | None, xt: Tensor, wt: Tensor | None, bt: Tensor | None,
             labels: Tensor | None, divergence: str, beta: float, alpha: float, temperature: float,
             soft_weight: float, hard_weight: float, ignore_index: int, reduction: str, vocab_size: int,
             student_logit_scale: float, teacher_logit_scale: float, student_softcap: float, teacher_softcap: float,
             impl: str, grads: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss, kept, stats = _compute(xs, ws, bs, xt, wt, bt, labels, (divergence, beta, alpha, temperature, soft_weight,
                                 hard_weight, ignore_index, reduction, vocab_size, student_logit_scale,
                                 teacher_logit_scale, student_softcap, teacher_softcap, impl), grads)
    return (loss.contiguous(), *(_empty(xs) if g is None else g.contiguous() for g in (*kept, stats)))


kd_loss_op = torch.library.custom_op("promptkd::kd_loss", _forward, mutates_args=())


@kd_loss_op.register_fake
def _(xs, ws, bs, xt, wt, bt, labels, divergence, beta, alpha, temperature, soft_weight, hard_weight, ignore_index,
      reduction, vocab_size, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap, impl, grads):
    n = xs.shape[0]
    triton = impl == "triton"
    dtype = torch.float32 if triton else compute_dtype(xs.dtype)
    loss = xs.new_empty((n,) if reduction == "none" else (), dtype=dtype)
    kept = [*alloc_grads(xs, ws, bs, grads[0:3]), *alloc_grads(xt, wt, bt, grads[3:6])]
    stats = xs.new_empty((TRITON_STAT_PLANES, n), dtype=torch.float32) if triton else _empty(xs)
    return (loss, *(_empty(xs) if g is None else g.new_empty(g.shape) for g in kept), stats)


def _gradients(grad, xs, ws, bs, xt, wt, bt, labels, stats, settings_impl: tuple, need) -> list:
    """The recomputed gradients (None where not in ``need``): the work of ``promptkd::kd_loss_backward``."""
    *fields, impl = settings_impl
    settings = _settings(*fields)
    inputs = (xs, ws, bs, xt, wt, bt)
    if impl == "triton":
        from .triton_impl import triton_backward, unit_stride

        return triton_backward(grad, *(unit_stride(x) for x in inputs), labels, stats, settings, need)
    return torch_backward(grad, *inputs, labels, settings, need)


def _recompute(grad: Tensor, xs: Tensor, ws: Tensor | None, bs: Tensor | None, xt: Tensor, wt: Tensor | None,
               bt: Tensor | None, labels: Tensor | None, stats: Tensor, divergence: str, beta: float, alpha: float,
               temperature: float, soft_weight: float, hard_weight: float, ignore_index: int, reduction: str,
               vocab_size: int, student_logit_scale: float, teacher_logit_scale: float, student_softcap: float,
               teacher_softcap: float, impl: str,
               need: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = _gradients(grad, xs, ws, bs, xt, wt, bt, labels, stats, (divergence, beta, alpha, temperature, soft_weight,
                     hard_weight, ignore_index, reduction, vocab_size, student_logit_scale, teacher_logit_scale,
                     student_softcap, teacher_softcap, impl), need)
    return tuple(_empty(xs) if g is None else g.contiguous() for g in out)


kd_loss_backward_op = torch.library.custom_op("promptkd::kd_loss_backward", _recompute, mutates_args=())


@kd_loss_backward_op.register_fake
def _(grad, xs, ws, bs, xt, wt, bt, labels, stats, divergence, beta, alpha, temperature, soft_weight, hard_weight,
      ignore_index, reduction, vocab_size, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap,
      impl, need):
    return tuple(x.new_empty(x.shape) if asked else _empty(xs)
                 for x, asked in zip((xs, ws, bs, xt, wt, bt), need, strict=True))


def _save(ctx, inputs: tuple, kept: tuple) -> None:
    """What the backward needs: the settings and impl, the inputs (also for the double-backward guard), the
    six gradients computed in forward and the Triton statistics (``kept``: empty tensors or None where none)."""
    ctx.args = inputs[7:21]  # settings and impl, as the backward op takes them
    ctx.in_forward = any(inputs[21])
    ctx.save_for_backward(*inputs[:7], *kept)


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _unit(grad: Tensor) -> bool:
    """Whether ``grad`` is exactly 1 (a plain ``loss.backward()``), read where that costs no device sync (CPU)
    and never while tracing (a data-dependent branch)."""
    return grad.device.type == "cpu" and not tracing(grad) and bool(grad == 1)


def _backward(ctx, grad: Tensor, *unused):
    """Gradients for the 22 inputs of ``promptkd::kd_loss`` (tensors first, None for the settings).

    Gradients computed in forward are multiplied by ``grad`` (returned as they are for a unit CPU ``grad``:
    the kept buffers are never modified, so a second backward with retain_graph sees them intact);
    otherwise the backward op recomputes."""
    saved = ctx.saved_tensors
    inputs, labels, kept, stats = saved[:6], saved[6], saved[7:13], saved[13]
    need = ctx.needs_input_grad[:6]
    if ctx.in_forward:
        unit = _unit(grad)
        grads = [(g if unit else g * grad.to(g.dtype)).to(x.dtype) if asked else None
                 for g, x, asked in zip(kept, inputs, need, strict=True)]
    else:
        if tracing(grad):
            out = kd_loss_backward_op(grad, *inputs, labels, stats, *ctx.args, list(need))
        else:  # eager: no op dispatch, no placeholders
            out = _gradients(grad, *inputs, labels, stats, ctx.args, need)
        grads = [g if asked else None for g, asked in zip(out, need, strict=True)]
    return (*grads, *(None,) * 16)


_first_order = {impl: first_order_only(op)(_backward) for impl, op in OP.items()}


def _dispatch_backward(ctx, grad, *unused):
    return _first_order[ctx.args[-1]](ctx, grad, *unused)


kd_loss_op.register_autograd(_dispatch_backward, setup_context=_setup_context)


class _KDLoss(torch.autograd.Function):
    """Eager autograd for ``promptkd::kd_loss``'s computation: the same forward, ``_save`` and backward as the
    op's registration, without the op's per-call Python overhead (see the module docstring). Returns the loss."""

    @staticmethod
    def forward(ctx, *inputs):
        loss, kept, stats = _compute(*inputs[:7], inputs[7:21], inputs[21])
        _save(ctx, inputs, (*kept, stats))
        return loss

    @staticmethod
    def backward(ctx, grad):
        return _dispatch_backward(ctx, grad)


def kd_loss(xs: Tensor, ws: Tensor | None, bs: Tensor | None, xt: Tensor, wt: Tensor | None, bt: Tensor | None,
            labels: Tensor | None, settings: KDSettings, impl: str) -> Tensor:
    """The loss of ``impl`` (chunked, torch, triton) on flattened inputs (see the module docstring), reduced per
    ``settings.reduction`` ([N] for none), float32 (float64 for float64 inputs under chunked / torch).
    Gradients flow to the inputs that require grad; ``chunked`` computes them in forward when the loss is
    reduced and grad mode is on (under no_grad nothing is computed for a backward that cannot come)."""
    inputs = (xs, ws, bs, xt, wt, bt)
    in_forward = impl == "chunked" and settings.reduction != "none" and torch.is_grad_enabled()
    grads = [in_forward and x is not None and x.requires_grad for x in inputs]
    if impl == "triton":  # unit stride outside the op, so that the tensors it saves are the ones it reads
        inputs = tuple(x if x is None or x.stride(-1) == 1 else x.contiguous() for x in inputs)
    args = (*inputs, labels, *settings_args(settings), impl, grads)
    if tracing(xs):
        return kd_loss_op(*args)[0]
    return _KDLoss.apply(*args)


__all__ = ["check_label_range", "checked_labels", "kd_loss", "kd_loss_backward_op", "kd_loss_op", "settings_args"]
