"""``fused_linear_kl_pair_loss``: KL(p || q) + anchor_scale * KL(p || a) with p's logits computed once.

PromptKD's prompt step is this loss with p the prompted teacher, q the student and a the teacher
without the prompt (the regulariser): two forward KLs that share their first distribution. As two
``fused_linear_kd_loss`` calls it computes p's logits twice and contracts p's logit gradient twice;
here each token chunk computes the three logit blocks once, runs the fused elementwise pass
(``promptkd.kd.rows``) once per term, adds the two logit gradients of p, and contracts that sum once.
With gradients to p's hidden states only (the prompt step): 4 logit-sized GEMMs instead of 6.

Why not one pass through the geometric-mixture identity? The gradient of the pair with respect to p's
logits equals (1 + anchor_scale) times that of KL(p || m), m proportional to q^w a^(1-w) with
w = 1 / (1 + anchor_scale), so one pass over (m, p) would give it; but that pass's loss is a surrogate
(the true value needs the log-partition functions of q and a: two more sweeps over the chunk), and the
gradients of q and a do not follow from it. The two passes give the true loss and every gradient for
one copy of p's chunk and one more sweep.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..autograd import autocast_dtype, autocast_inputs, autocast_off, autocast_target, first_order_only
from . import torch_impl
from .api import check_float, check_labels, check_tensor
from .reference import fused_linear_kd_loss_reference
from .rows import kd_rows
from .settings import KDSettings, number
from .tokens import finish_forward, row_scale
from .torch_impl import alloc_grads, chain_, chunk_logits, compute_dtype, derivative_buffer, side_grads, transform_

#: The values of ``fused_linear_kl_pair_loss``'s ``impl=``.
PAIR_IMPLS = ("auto", "reference", "chunked")
_SIDES = ("", "student_", "anchor_")  # argument prefixes of p, q and a


def fused_linear_kl_pair_loss(
    hidden: torch.Tensor, weight: torch.Tensor, student_hidden: torch.Tensor, student_weight: torch.Tensor,
    anchor_hidden: torch.Tensor, anchor_weight: torch.Tensor, labels: torch.Tensor | None = None, *,
    anchor_scale: float = 1.0, temperature: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
    bias: torch.Tensor | None = None, student_bias: torch.Tensor | None = None,
    anchor_bias: torch.Tensor | None = None, vocab_size: int | None = None, student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0, student_softcap: float | None = None, teacher_softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """KL(p || q) + anchor_scale * KL(p || a) per token, from hidden states and output-embedding weights.

    p = softmax((hidden @ weight.T + bias) / T), q the same of the ``student_*`` tensors, a of the
    ``anchor_*`` ones. In PromptKD's prompt step p is the prompted teacher, q the student and a the
    teacher without the prompt, with ``anchor_scale`` the decaying regulariser weight. Equal to
    ``fused_linear_kd_loss(student_hidden, student_weight, hidden, weight) + anchor_scale *
    fused_linear_kd_loss(anchor_hidden, anchor_weight, hidden, weight)`` (forward KL, the other keywords
    alike), but p's logits are computed once per token chunk and p's gradient contracted once.

    Shapes: hidden [..., D], weight [V, D]; the student and anchor pairs likewise, each with its own
    hidden size and the same leading shape; biases [V] of their weight; labels [...] integer, only a mask
    here (tokens equal to ``ignore_index`` count zero; the others must lie in [0, V), as for
    ``fused_linear_kd_loss``). All floating inputs share one dtype and device
    (after autocast, as for ``fused_linear_kd_loss``). ``vocab_size``: how many leading weight rows are
    real tokens, required when the three vocabularies differ. ``reduction``: ``mean`` (over counted
    tokens) or ``sum``; for per-token values call ``fused_linear_kd_loss`` twice. With
    ``anchor_scale == 0`` the anchor's logits are not computed and its inputs get zero gradients.

    Logit transforms as for ``fused_linear_kd_loss``: ``teacher_logit_scale`` / ``teacher_softcap`` apply to
    p's and the anchor's logits (both the teacher's), ``student_logit_scale`` / ``student_softcap`` to q's.

    The value is the true sum of the two divergences (no surrogate). Gradients flow to every input that
    requires grad, computed in the forward pass while each chunk's logits are at hand (``impl="chunked"``,
    what ``auto`` picks on every device) and scaled by the incoming gradient in backward. First-order only:
    differentiating the gradients again raises. ``impl="reference"`` is two plain-autograd losses on full
    logits.
    """
    settings = KDSettings(temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                          vocab_size=vocab_size, student_logit_scale=student_logit_scale,
                          teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                          teacher_softcap=teacher_softcap)
    anchor_scale = number("anchor_scale", anchor_scale)
    if anchor_scale < 0.0:
        raise ValueError(f"anchor_scale must be >= 0, got {anchor_scale}")
    if reduction == "none":
        raise ValueError("fused_linear_kl_pair_loss reduces the loss (reduction='mean' or 'sum'); for per-token "
                         "values call fused_linear_kd_loss once per term with reduction='none'")
    if not isinstance(impl, str) or impl not in PAIR_IMPLS:
        raise ValueError(f"impl must be one of {PAIR_IMPLS}, got {impl!r}")
    sides = ((hidden, weight, bias), (student_hidden, student_weight, student_bias),
             (anchor_hidden, anchor_weight, anchor_bias))
    for prefix, (x, w, b) in zip(_SIDES, sides, strict=True):
        check_tensor(prefix + "hidden", x)
        check_tensor(prefix + "weight", w)
        check_tensor(prefix + "bias", b, optional=True)
    device = hidden.device
    cast = autocast_dtype(device)
    check_float("hidden", hidden, None, None)
    if hidden.ndim < 1:
        raise ValueError("hidden must have at least one dimension [..., D]")
    dtype, lead = autocast_target(hidden.dtype, cast), hidden.shape[:-1]
    vocabs = []
    for prefix, (x, w, b) in zip(_SIDES, sides, strict=True):
        check_float(prefix + "hidden", x, dtype, device, cast=cast)
        check_float(prefix + "weight", w, dtype, device, ndim=2, cast=cast)
        if x.shape[:-1] != lead:
            raise ValueError(f"{prefix}hidden leading shape {tuple(x.shape[:-1])} differs from hidden's {tuple(lead)}")
        if w.shape[1] != x.shape[-1]:
            raise ValueError(f"{prefix}weight must be [V, {x.shape[-1]}] to match {prefix}hidden, "
                             f"got {tuple(w.shape)}")
        if b is not None:
            check_float(prefix + "bias", b, dtype, device, ndim=1, cast=cast)
            if b.shape[0] != w.shape[0]:
                raise ValueError(f"{prefix}bias must have shape [{w.shape[0]}], got {tuple(b.shape)}")
        vocabs.append(w.shape[0])
    if vocab_size is None:
        if len(set(vocabs)) > 1:
            raise ValueError(f"the vocabularies differ (weight {vocabs[0]}, student_weight {vocabs[1]}, "
                             f"anchor_weight {vocabs[2]}): pass vocab_size= to name how many leading rows are "
                             "real tokens")
        settings = replace(settings, vocab_size=vocabs[0])
    elif vocab_size > min(vocabs):
        raise ValueError(f"vocab_size={vocab_size} exceeds the smallest vocabulary ({min(vocabs)})")
    labels = check_labels(labels, lead, settings.vocab_size, settings, device)

    flat = autocast_inputs(cast, *(t for side in sides for t in side))
    with autocast_off(device.type):
        if impl == "reference":
            p, q, a = (flat[i:i + 3] for i in (0, 3, 6))
            mask = None if labels is None else labels.reshape(lead)
            anchored = replace(settings, student_logit_scale=teacher_logit_scale, student_softcap=teacher_softcap)
            return (fused_linear_kd_loss_reference(q[0], q[1], p[0], p[1], mask, settings, q[2], p[2])
                    + anchor_scale * fused_linear_kd_loss_reference(a[0], a[1], p[0], p[1], mask, anchored, a[2],
                                                                    p[2]))
        xs = [flat[i].reshape(-1, flat[i].shape[-1]) for i in (0, 3, 6)]
        args = (xs[0], flat[1], flat[2], xs[1], flat[4], flat[5], xs[2], flat[7], flat[8])
        return KLPairFunction.apply(*args, labels, settings, anchor_scale, torch.is_grad_enabled())


def _chunk_rows(vocab: int) -> int:
    """Rows per chunk: four [rows, V] buffers (p, its copy, q, a) in the bytes of the single loss's two."""
    return max(1, torch_impl.CHUNK_BYTES // (8 * vocab))


class KLPairFunction(torch.autograd.Function):
    """The chunked pair loss on flattened inputs (x [N, D] per side; labels [N] or None; ``settings`` with
    ``vocab_size`` resolved). ``grads``: compute gradients (in forward) for the inputs that require grad."""

    @staticmethod
    def forward(ctx, xp, wp, bp, xq, wq, bq, xa, wa, ba, labels, settings: KDSettings, anchor_scale: float,
                grads: bool):
        n, vocab = xp.shape[0], settings.vocab_size
        need = ctx.needs_input_grad[:9] if grads else (False,) * 9
        anchor = anchor_scale > 0.0
        if not anchor:
            need = (*need[:6], False, False, False)
        need_p, need_q, need_a = any(need[0:3]), any(need[3:6]), any(need[6:9])
        dtype = compute_dtype(xp.dtype)
        scale = None
        inputs = (xp, wp, bp, xq, wq, bq, xa, wa, ba)
        kept = [alloc_grads(*inputs[i:i + 3], need[i:i + 3]) for i in (0, 3, 6)]
        if any(need):
            scale = row_scale(torch.ones((), dtype=dtype, device=xp.device), labels, settings, n, dtype)
        second = replace(settings, soft_weight=anchor_scale)
        step = min(n, _chunk_rows(vocab))
        buf_p, buf_q = (torch.empty(step, vocab, dtype=dtype, device=xp.device) for _ in range(2))
        buf_p2, buf_a = (torch.empty(step if anchor else 0, vocab, dtype=dtype, device=xp.device) for _ in range(2))
        per_token = torch.empty(n, dtype=dtype, device=xp.device)
        teacher, student = settings.transform("teacher"), settings.transform("student")
        grad = scale is not None
        der_p, der_q, der_a = (derivative_buffer(buf, form, grad and wanted) for buf, form, wanted in
                               ((buf_p, teacher, need_p), (buf_q, student, need_q), (buf_a, teacher, need_a)))
        for r0 in range(0, n, step):
            rows = slice(r0, min(n, r0 + step))
            sc = None if scale is None else scale[rows]
            p = chunk_logits(xp, wp, bp, rows, vocab, buf_p)
            kp = transform_(p, *teacher, der_p)
            p2 = buf_p2[: rows.stop - r0].copy_(p) if anchor else None  # each pass may overwrite its p
            q = chunk_logits(xq, wq, bq, rows, vocab, buf_q)
            kq = transform_(q, *student, der_q)
            loss, dq, dp = kd_rows(q, p, None, sc, settings, need_q, need_p)
            if anchor:
                a = chunk_logits(xa, wa, ba, rows, vocab, buf_a)
                ka = transform_(a, *teacher, der_a)
                loss2, da, dp2 = kd_rows(a, p2, None, sc, second, need_a, need_p)
                loss = loss + loss2
                if da is not None:
                    side_grads(chain_(da, ka), xa, wa, ba, rows, need[6:9], kept[2])
                if dp is not None:
                    dp.add_(dp2)
            per_token[rows] = loss
            if dq is not None:
                side_grads(chain_(dq, kq), xq, wq, bq, rows, need[3:6], kept[1])
            if dp is not None:
                side_grads(chain_(dp, kp), xp, wp, bp, rows, need[0:3], kept[0])
        if not anchor and grads:  # anchor_scale == 0: the anchor's gradients are zero
            kept[2] = [torch.zeros_like(x) if asked else None
                       for x, asked in zip(inputs[6:9], ctx.needs_input_grad[6:9], strict=True)]
        return finish_forward(ctx, settings, per_token, labels, (*inputs, *kept[0], *kept[1], *kept[2]))

    @staticmethod
    @first_order_only("fused_linear_kl_pair_loss (impl='chunked')")
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        inputs, kept = saved[:9], saved[9:]
        unit = grad_out.device.type == "cpu" and bool(grad_out == 1)  # see torch_impl._scaled
        grads = [None if g is None else (g if unit else g * grad_out.to(g.dtype)).to(x.dtype)
                 for g, x in zip(kept, inputs, strict=True)]
        return (*grads, None, None, None, None)
