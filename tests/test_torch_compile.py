"""torch.compile: a training step calling fused_linear_kd_loss and prefix_attention compiles with
fullgraph=True (no graph break) and gives the eager loss and gradients; bad labels and group indices
raise the eager ValueError from the compiled graph; double backward is still refused; the custom ops
(promptkd/kd/ops.py, promptkd/attention/ops.py) pass torch.library.opcheck (schema, fake tensors,
autograd registration, AOT dispatch with dynamic shapes).

Backends: ``aot_eager`` (Dynamo + AOTAutograd, eager kernels: fast) for most cases, Inductor (a C++
compiler on the CPU) for one. The Triton cases run the kernels in the interpreter on CPU tensors
(aot_eager) and are skipped where kernels compile for a GPU; there the ``gpu`` test compiles with
Inductor on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import promptkd
from promptkd.attention import ops as attention_ops
from promptkd.kd import ops as kd_ops

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method:DeprecationWarning")
B, N, D, DT, HD, V, P = 2, 5, 16, 12, 8, 37, 3  # V odd; teacher hidden size differs from the student's
KD_KW = dict(hard_weight=0.3, temperature=2.0, beta=0.3, alpha=0.2)
TIGHT = dict(aot_eager=dict(rtol=1e-6, atol=1e-7), inductor=dict(rtol=1e-5, atol=1e-6))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Model(torch.nn.Module):
    """A student layer with prefix attention (two prefix groups of lengths P and P - 1, grouped-query heads,
    left padding) and a linear teacher, then the fused KD loss on both heads."""

    def __init__(self, kd_impl: str, attention_impl: str, divergence: str, reduction: str, device="cpu"):
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def param(*shape, scale=1.0):
            return torch.nn.Parameter((torch.randn(*shape, generator=g) * scale).to(device))

        self.wq, self.wk, self.wv = param(2 * HD, D, scale=D ** -0.5), param(HD, D, scale=D ** -0.5), param(HD, D)
        self.prefix_k, self.prefix_v = param(2, 1, P, HD), param(2, 1, P, HD)
        self.wo = param(D, 2 * HD, scale=(2 * HD) ** -0.5)
        self.student_weight, self.student_bias = param(V, D, scale=D ** -0.5), param(V, scale=0.5)
        self.wt = param(DT, D, scale=D ** -0.5)
        self.teacher_weight, self.teacher_bias = param(V + 2, DT, scale=DT ** -0.5), param(V + 2, scale=0.5)
        self.kd_impl, self.attention_impl = kd_impl, attention_impl
        self.divergence, self.reduction = divergence, reduction

    def forward(self, x, labels, keep):
        q = (x @ self.wq.T).reshape(B, N, 2, HD).transpose(1, 2)  # [B, 2, N, HD]: strided, like a projection
        k = (x @ self.wk.T)[:, None]
        v = (x @ self.wv.T)[:, None]
        att = promptkd.prefix_attention(q, k, v, self.prefix_k, self.prefix_v, prefix_lengths=[P, P - 1],
                                        group_index=[1, 0], key_padding_mask=keep, impl=self.attention_impl)
        hidden = x + att.transpose(1, 2).reshape(B, N, 2 * HD) @ self.wo.T
        loss = promptkd.fused_linear_kd_loss(
            hidden, self.student_weight, torch.tanh(x @ self.wt.T), self.teacher_weight, labels,
            student_bias=self.student_bias, teacher_bias=self.teacher_bias, vocab_size=V, divergence=self.divergence,
            reduction=self.reduction, impl=self.kd_impl, **KD_KW)
        if self.reduction == "none":  # a per-token upstream gradient that is not 1
            loss = (loss * torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)).sum()
        return loss * 1.25


def batch(device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, D, generator=g).to(device)
    labels = torch.randint(0, V, (B, N), generator=g)
    labels[:, ::3] = -100
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, :2] = False  # left padding: sample 1's first two keys
    labels[~keep] = -100
    return x, labels.to(device), keep.to(device)


def loss_and_grads(model, step, x, labels, keep):
    model.zero_grad(set_to_none=True)
    loss = step(x, labels, keep)
    loss.backward()
    return {"loss": loss.detach(), **{name: p.grad.clone() for name, p in model.named_parameters()}}


def check_step(kd_impl, attention_impl, divergence, reduction, backend, device="cpu"):
    """The compiled step (fullgraph) against eager: loss and every parameter's gradient."""
    model = Model(kd_impl, attention_impl, divergence, reduction, device)
    data = batch(device)
    eager = loss_and_grads(model, model, *data)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = loss_and_grads(model, compiled, *data)
    for key, ref in eager.items():
        assert ref.isfinite().all() and (key == "loss" or ref.abs().max() > 0), key
        torch.testing.assert_close(got[key], ref, **TIGHT[backend], msg=lambda m, key=key: f"{key}: {m}")
    return model, compiled, data


CASES = [  # (kd impl, attention impl, divergence, reduction)
    ("chunked", "torch", "jsd", "mean"),  # gradients computed in forward, scaled in backward
    ("torch", "torch", "skew_reverse_kl", "none"),  # recompute, per-token loss
    ("triton", "triton", "forward_kl", "sum"),  # the interpreter on CPU tensors
]


@pytest.mark.parametrize(("kd_impl", "attention_impl", "divergence", "reduction"), CASES,
                         ids=["-".join(c) for c in CASES])
def test_compiled_step_matches_eager(kd_impl, attention_impl, divergence, reduction):
    model, compiled, data = check_step(kd_impl, attention_impl, divergence, reduction, "aot_eager")
    # Double backward stays refused under compile (AOTAutograd's own RuntimeError), never a silent value.
    params = list(model.parameters())
    with pytest.raises(RuntimeError):
        grads = torch.autograd.grad(compiled(*data), params, create_graph=True)
        torch.autograd.grad(sum(g.sum() for g in grads), params)


def test_compiled_step_inductor():
    """Inductor (generated C++ around the opaque ops): impl auto (chunked on the CPU), mean."""
    check_step("auto", "auto", "reverse_kl", "mean", "inductor")


def test_bad_labels_raise_the_eager_error():
    """The host range check of CPU labels runs inside the compiled graph (promptkd::checked_labels) and
    raises the eager ValueError; good labels still run (no recompilation needed for new values)."""
    model = Model("chunked", "torch", "jsd", "mean")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, labels, keep = batch()
    compiled(x, labels, keep)
    for value in (V, -5):
        bad = labels.clone()
        bad[1, 4] = value
        with pytest.raises(ValueError) as eager:
            model(x, bad, keep)
        with pytest.raises(ValueError) as got:
            compiled(x, bad, keep)
        assert str(got.value) == str(eager.value) and "flattened position 9" in str(got.value)


def test_new_sizes_and_settings_between_calls():
    """A token count and a hard_weight (a scheduled weight) that change between calls: Dynamo recompiles (the
    count turns dynamic, each weight value is a constant of its graph) and every call matches eager."""
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(V, D, generator=g).requires_grad_(), torch.randn(V, DT, generator=g)]

    def loss(hs, ht, labels, hard_weight):
        return promptkd.fused_linear_kd_loss(hs, weights[0], ht, weights[1], labels, hard_weight=hard_weight,
                                             divergence="skew_forward_kl", impl="torch")

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for n, hard_weight in ((7, 0.1), (11, 0.2), (13, 0.2)):
        hs, ht = torch.randn(n, D, generator=g).requires_grad_(), torch.randn(n, DT, generator=g)
        labels = torch.randint(0, V, (n,), generator=g)
        got, want = ([fn(hs, ht, labels, hard_weight), *torch.autograd.grad(fn(hs, ht, labels, hard_weight),
                                                                            [hs, weights[0]])]
                     for fn in (compiled, loss))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TIGHT["aot_eager"])


def _reference_and_logits(x, labels, group):
    """kd_loss on logits, the reference impl (labels checked by the op as well) and a CPU group_index tensor."""
    s, t = x @ x.transpose(-1, -2), (x * 2) @ x.transpose(-1, -2)  # [B, N, N] logits
    loss = promptkd.kd_loss(s, t, labels.remainder(N), divergence="jsd", hard_weight=0.5)
    loss = loss + promptkd.fused_linear_kd_loss(x, x[0], x, x[0], labels.remainder(N), impl="reference",
                                                hard_weight=0.5)
    q = x[:, None]
    return loss + promptkd.prefix_attention(q, q, q, q[:1, :, :2], q[:1, :, :2], group_index=group).sum()


def test_no_graph_break_anywhere():
    x, labels, _ = batch()
    group = torch.zeros(B, dtype=torch.int64)
    explained = torch._dynamo.explain(_reference_and_logits)(x, labels, group)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(_reference_and_logits, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, labels, group), _reference_and_logits(x, labels, group))
    bad = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"group_index values must lie in \[0, 0\], got 3"):
        compiled(x, labels, bad)
    with pytest.raises(ValueError, match=r"group_index values must lie in \[0, 0\], got 3"):
        _reference_and_logits(x, labels, bad)


# ---- torch.library.opcheck on each custom op ----

def _kd_inputs(logits=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if logits:
        return (torch.randn(6, 11, generator=g).requires_grad_(), None, None,
                torch.randn(6, 11, generator=g).requires_grad_(), None, None)
    return (torch.randn(6, 5, generator=g).requires_grad_(), torch.randn(11, 5, generator=g).requires_grad_(),
            torch.randn(11, generator=g).requires_grad_(), torch.randn(6, 4, generator=g),
            torch.randn(11, 4, generator=g).requires_grad_(), None)


def _settings(divergence, reduction, vocab=11, transforms=(1.0, 1.0, 0.0, 0.0)):
    """promptkd::kd_loss's settings arguments (see promptkd.kd.ops.settings_args); ``transforms``: the
    student's and teacher's logit scales and softcaps (0.0: none)."""
    return (divergence, 0.3, 0.2, 2.0, 1.0, 0.4, -100, reduction, vocab, *transforms)


LABELS = torch.tensor([3, -100, 0, 10, 7, -100])
PLAIN, CAPPED = (1.0, 1.0, 0.0, 0.0), (0.5, 1.5, 3.0, 2.0)
OP_CASES = [  # (impl, reduction, logits, grads in forward, logit transforms)
    ("chunked", "mean", False, True, PLAIN),
    ("chunked", "sum", True, True, PLAIN),
    ("torch", "none", False, False, PLAIN),
    ("triton", "mean", False, False, PLAIN),
    ("chunked", "mean", False, True, CAPPED),
    ("torch", "none", True, False, CAPPED),
]


@pytest.mark.parametrize(("impl", "reduction", "logits", "in_forward", "transforms"), OP_CASES,
                         ids=[f"{c[0]}-{c[1]}-{'logits' if c[2] else 'hidden'}{'-capped' if c[4] == CAPPED else ''}"
                              for c in OP_CASES])
def test_opcheck_kd_ops(impl, reduction, logits, in_forward, transforms):
    inputs = _kd_inputs(logits)
    grads = [in_forward and x is not None and x.requires_grad for x in inputs]
    settings = _settings("jsd", reduction, transforms=transforms)
    torch.library.opcheck(kd_ops.kd_loss_op, (*inputs, LABELS, *settings, impl, grads))
    plain = tuple(None if x is None else x.detach() for x in inputs)
    stats = kd_ops.kd_loss_op(*plain, LABELS, *settings, impl, [False] * 6)[-1]
    grad = torch.rand(6 if reduction == "none" else ()) + 0.5
    need = [x is not None and x.requires_grad for x in inputs]
    torch.library.opcheck(kd_ops.kd_loss_backward_op, (grad, *plain, LABELS, stats, *settings, impl, need))


def test_opcheck_label_and_index_checks():
    torch.library.opcheck(kd_ops.checked_labels, (LABELS, 11, -100))
    torch.library.opcheck(attention_ops.checked_index, (torch.tensor([0, 2, 1], dtype=torch.int32), "g", 0, 2))


def _attention_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((3, 2, 5, HD), (3, 1, 5, HD), (3, 1, 5, HD), (2, 1, P, HD), (2, 1, P, HD))
    q, k, v, pk, pv = (torch.randn(s, generator=g).requires_grad_() for s in shapes)
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[2, :3] = False
    return q, k, v, pk, pv, torch.tensor([P, 1]), torch.tensor([1, 0, 1]), keep


@pytest.mark.parametrize("softcap", [0.0, 1.5], ids=["no-cap", "cap"])
def test_opcheck_triton_attention_ops(softcap):
    inputs = _attention_inputs()
    torch.library.opcheck(attention_ops.attention_op, (*inputs, HD ** -0.5, softcap))
    plain = tuple(x.detach() for x in inputs)
    out, lse = attention_ops.attention_op(*plain, HD ** -0.5, softcap)
    grad = torch.randn(out.shape)
    torch.library.opcheck(attention_ops.attention_backward_op,
                          (grad, *plain[:5], out, lse, *plain[5:], HD ** -0.5, softcap,
                           [True, False, True, True, False]))


@pytest.mark.gpu
def test_gpu_compiled_step_inductor():
    """On CUDA: the Triton kernels inside an Inductor-compiled step, against eager."""
    check_step("triton", "triton", "jsd", "mean", "inductor", device="cuda")
