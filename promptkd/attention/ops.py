"""Prefix attention's Triton path as PyTorch custom ops (namespace ``promptkd``): what ``torch.compile`` sees.

Fake tensors must never reach the Triton launchers: as custom ops with fake implementations and a
registered autograd formula, the kernels are opaque nodes of a compiled graph, forward and backward.
The ``torch`` implementation needs no op: it is plain torch (scaled_dot_product_attention), which
Dynamo traces and Inductor may fuse.

    promptkd::prefix_attention_triton(q, k, v, prefix_k, prefix_v, lengths?, group, key_padding_mask?, scale,
                                      softcap) -> (out, lse)
    promptkd::prefix_attention_triton_backward(grad, q, k, v, prefix_k, prefix_v, out, lse, lengths?, group,
                                               key_padding_mask?, scale, softcap, need)
        -> (dq, dk, dv, dprefix_k, dprefix_v)
    promptkd::checked_index(x, name, low, high) -> x

Inputs as ``promptkd.attention.triton_impl.prepare`` lays them out; ``lse`` [B, Hq, N] float32 is what the
backward reads; the backward computes the gradients flagged in ``need`` (empty tensors elsewhere); a
``softcap`` of 0.0 is none. Every output is contiguous. ``checked_index``: the range check of a CPU
``group_index`` / ``prefix_lengths`` tensor under compile, where a host read would break the graph;
returns an int64 copy.

Double backward stays refused in eager (``promptkd.autograd.first_order_only``); a compiled graph refuses it
itself (AOTAutograd). Eager calls run the same ``_forward``, ``_save`` and ``_backward`` through
``_PrefixAttention``, an ``autograd.Function``, for the reasons ``promptkd.kd.ops`` gives (the op's Python
overhead per call; dispatch modes see the kernels' aten ops); traced inputs (``promptkd.autograd.tracing``)
run the op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..autograd import first_order_only, tracing

Tensor = torch.Tensor
OP = "prefix_attention (impl='triton')"


def check_index_range(name: str, x: Tensor, low: int, high: int) -> None:
    """ValueError unless every value of the CPU tensor ``x`` lies in [low, high] (a host read)."""
    if x.numel():
        lo, hi = int(x.min()), int(x.max())
        if lo < low or hi > high:
            raise ValueError(f"{name} values must lie in [{low}, {high}], got {lo if lo < low else hi}")


@torch.library.custom_op("promptkd::checked_index", mutates_args=())
def checked_index(x: Tensor, name: str, low: int, high: int) -> Tensor:
    check_index_range(name, x, low, high)
    return x.to(torch.int64, copy=True)


@checked_index.register_fake
def _(x, name, low, high):
    return x.new_empty(x.shape, dtype=torch.int64)


# A check whose result goes unused (group_index with one prefix group) must still run: not dead code.
torch.fx.node.has_side_effect(torch.ops.promptkd.checked_index.default)


def _forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, lengths: Tensor | None,
             group: Tensor, key_padding_mask: Tensor | None, scale: float, softcap: float) -> tuple[Tensor, Tensor]:
    from .triton_impl import triton_forward

    out, lse = triton_forward(q, k, v, prefix_k, prefix_v, lengths, group, key_padding_mask, scale, softcap or None)
    return out.contiguous(), lse.contiguous()


attention_op = torch.library.custom_op("promptkd::prefix_attention_triton", _forward, mutates_args=())


@attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, lengths, group, key_padding_mask, scale, softcap):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _recompute(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, out: Tensor,
               lse: Tensor, lengths: Tensor | None, group: Tensor, key_padding_mask: Tensor | None, scale: float,
               softcap: float, need: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .triton_impl import triton_backward

    grads = triton_backward(grad, q, k, v, prefix_k, prefix_v, out, lse, lengths, group, key_padding_mask, scale, need,
                            softcap or None)
    return tuple(q.new_empty(0) if g is None else g.contiguous() for g in grads)


attention_backward_op = torch.library.custom_op("promptkd::prefix_attention_triton_backward", _recompute,
                                                mutates_args=())


@attention_backward_op.register_fake
def _(grad, q, k, v, prefix_k, prefix_v, out, lse, lengths, group, key_padding_mask, scale, softcap, need):
    return tuple(x.new_empty(x.shape) if asked else q.new_empty(0)
                 for x, asked in zip((q, k, v, prefix_k, prefix_v), need, strict=True))


def _save(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, prefix_k, prefix_v, lengths, group, key_padding_mask, scale, softcap = inputs
    ctx.scale, ctx.softcap = scale, softcap
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, *output, lengths, group, key_padding_mask)


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output)
    ctx.mark_non_differentiable(output[1])


@first_order_only(OP)
def _backward(ctx, grad: Tensor, *unused):
    """Gradients for the 10 inputs of ``promptkd::prefix_attention_triton`` (None for the index tensors, scale and
    softcap)."""
    q, k, v, prefix_k, prefix_v, out, lse, lengths, group, key_padding_mask = ctx.saved_tensors
    need = ctx.needs_input_grad[:5]
    args = (grad, q, k, v, prefix_k, prefix_v, out, lse, lengths, group, key_padding_mask, ctx.scale)
    if tracing(grad):
        grads = attention_backward_op(*args, ctx.softcap, list(need))
    else:  # eager: no op dispatch, no placeholders
        from .triton_impl import triton_backward

        grads = triton_backward(*args, list(need), ctx.softcap or None)
    return (*(g if asked else None for g, asked in zip(grads, need, strict=True)), None, None, None, None, None)


attention_op.register_autograd(_backward, setup_context=_setup_context)


class _PrefixAttention(torch.autograd.Function):
    """Eager autograd for ``promptkd::prefix_attention_triton``'s computation: the same forward, ``_save`` and
    backward as the op's registration, without the op's per-call Python overhead. Returns the output."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _save(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)


def prefix_attention_triton(q, k, v, prefix_k, prefix_v, lengths, group, key_padding_mask, scale,
                            softcap: float | None = None) -> Tensor:
    """The fused kernels on arguments checked and normalised by ``promptkd.attention.api`` (lengths int64 [G]
    or None, group int64 [B], key_padding_mask bool [B, N] or None, on the inputs' device; scale a float;
    softcap a float > 0 or None)."""
    from .triton_impl import empty_output, prepare  # imports triton only when asked for

    args = prepare(q, k, v, prefix_k, prefix_v, lengths, group, key_padding_mask)
    if q.numel() == 0:  # no query, or no query head: nothing to attend and zero gradients
        return empty_output(q, k, v, prefix_k, prefix_v)
    floats = (float(scale), float(softcap or 0.0))
    if tracing(q):
        return attention_op(*args, *floats)[0]
    return _PrefixAttention.apply(*args, *floats)
