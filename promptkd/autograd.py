"""Rules shared by the public functions and the custom autograd Functions: double backward, autocast, tracing.

Double backward. The fused implementations (``torch``, ``triton``) hand-derive first-order gradients;
differentiating those gradients again (``create_graph=True`` followed by another backward, a
Hessian-vector product) is refused with a RuntimeError instead of returning a wrong or zero second
derivative. ``backward(create_graph=True)`` itself still works and gives the usual gradients, as long
as nobody differentiates them. ``impl="reference"`` is plain autograd and supports double backward.

Autocast. With autocast enabled for the inputs' device type, the public functions cast the floating
inputs that autocast would cast (floating, not float64) to ``torch.get_autocast_dtype(device_type)``
before their dtype checks, as autocast does for matmuls and scaled_dot_product_attention, and run
the op, forward and backward, with autocast disabled: backward recomputation sees exactly the values
the forward saw. The casts are autograd ops, so gradients reach the leaves in their own dtype.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def double_backward_message(op: str) -> str:
    return (f"{op}: double backward is not supported (a gradient of this op's gradient was requested, e.g. "
            "backward(create_graph=True) or autograd.grad(create_graph=True) followed by another backward, or a "
            "Hessian-vector product); impl='reference' (plain autograd) supports it")


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on gradients (passed as a tuple, so they are outputs but not inputs); its inputs are the
    tensors those gradients depend on. Differentiating the gradients reaches its backward, which raises."""

    @staticmethod
    def forward(ctx, op: str, grads: tuple, *deps):
        ctx.op = op
        return grads

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(double_backward_message(ctx.op))


def _guard(op: str, grads, deps):
    """``grads`` unchanged in value, but differentiating any of them raises. ``deps``: every tensor the
    gradients are a function of (the Function's inputs, the incoming gradients); those requiring grad link
    the guard into the graph, so a second-order backward towards them cannot skip it."""
    grads = tuple(grads)
    deps = [t for t in deps if isinstance(t, torch.Tensor) and t.requires_grad]
    where = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not deps or not where:
        return grads
    # detach: a fresh autograd identity, never a view (views made in a Function may not be modified in place)
    guarded = _NoDoubleBackward.apply(op, tuple(grads[i].detach() for i in where), *deps)
    out = list(grads)
    for i, g in zip(where, guarded, strict=True):
        out[i] = g
    return tuple(out)


def autocast_off(device_type: str):
    """A context with autocast disabled for ``device_type`` (nothing to do where autocast is off)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def first_order_only(op: str):
    """Decorator of an ``autograd.Function``'s ``backward``: first-order gradients only, autocast off.

    The body runs under ``no_grad`` and with autocast disabled for the gradients' device type (a
    user may call ``.backward()`` inside an autocast block). Under ``create_graph=True`` (grad mode is
    on in backward) the gradients are returned through a node whose backward raises a RuntimeError
    naming ``op``: the first-order values are unchanged, and any attempt to differentiate them (even
    summed with other, differentiable terms) fails loudly instead of treating them as constants.
    The Function must ``save_for_backward`` every input that can require grad.
    """

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            create_graph = torch.is_grad_enabled()
            device_type = next(g.device.type for g in grad_outputs if isinstance(g, torch.Tensor))
            with torch.no_grad(), autocast_off(device_type):
                grads = backward(ctx, *grad_outputs)
            if not create_graph:
                return grads
            deps = (*ctx.saved_tensors, *grad_outputs)
            if any(ctx.needs_input_grad) and not any(isinstance(t, torch.Tensor) and t.requires_grad for t in deps):
                raise AssertionError(f"{op}: no saved input requires grad; the Function must save its inputs")
            return _guard(op, grads, deps)

        return wrapper

    return decorate


class _FirstOrder(torch.autograd.Function):
    """Identity (views) whose backward passes the gradients on through ``_guard`` under create_graph."""

    @staticmethod
    def forward(ctx, op: str, *tensors):
        ctx.op = op
        ctx.save_for_backward(*tensors)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        if not torch.is_grad_enabled():
            return None, *grads
        return None, *_guard(ctx.op, grads, (*ctx.saved_tensors, *grads))


def first_order(op: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Identity on ``tensors`` for a plain-autograd implementation whose second derivative is missing
    or wrong: the gradients that flow back through it may not be differentiated again (RuntimeError
    naming ``op``, as :func:`first_order_only`). Tensors that do not require grad pass untouched (so
    nothing downstream computes a gradient for them), and so does everything without grad mode."""
    where = [i for i, t in enumerate(tensors) if t.requires_grad]
    if not torch.is_grad_enabled() or not where:
        return tensors
    out = list(tensors)
    for i, t in zip(where, _FirstOrder.apply(op, *(tensors[i] for i in where)), strict=True):
        out[i] = t
    return tuple(out)


def tracing(x: torch.Tensor) -> bool:
    """Whether ``x`` is traced rather than computed: under ``torch.compile`` (Dynamo, and AOTAutograd tracing
    the backward) or any other tracer (fake or functional tensors: ``torch.library.opcheck``, export). There a
    custom op must run (the tracer sees its fake implementation), never its body, and no host read may branch."""
    return torch.compiler.is_compiling() or type(x) not in (torch.Tensor, torch.nn.Parameter)


def static_float(x):
    """``x``, but a float that ``torch.compile`` made symbolic (it changed between calls: automatic dynamic
    shapes) becomes its value again, guarded: each value compiles once. The ops' settings are constants of
    the graph (validated with ``math.isfinite``, baked into the custom ops' arguments); anything else passes."""
    if isinstance(x, float) and torch.compiler.is_compiling():
        return float.fromhex(x.hex())  # a method Dynamo evaluates on the value: specialises
    return x


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """``torch.get_autocast_dtype`` of the device's type where autocast is enabled for it, else None."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def autocast_target(dtype: torch.dtype, cast: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor of ``dtype`` gets from ``autocast_inputs(cast, ...)``: ``cast`` for floating
    dtypes other than float64 (autocast leaves float64 alone), else ``dtype`` itself."""
    if cast is None or not dtype.is_floating_point or dtype == torch.float64:
        return dtype
    return cast


def autocast_inputs(cast: torch.dtype | None, *tensors):
    """The tensors, floating ones other than float64 cast to ``cast`` (None: unchanged), as autocast casts
    the inputs of a matmul; autograd ops, so gradients return in each leaf's dtype. Anything else (None,
    integer tensors) passes through."""
    return tuple(x if x is None else x.to(autocast_target(x.dtype, cast)) for x in tensors)
